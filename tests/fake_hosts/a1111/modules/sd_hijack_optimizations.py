"""`modules.sd_hijack_optimizations` (a1111.md §4.1, §4.4): the optimization base class and the SDP
CrossAttention forward."""

from __future__ import annotations

import ldm.modules.attention
import torch

from modules import shared
from modules.hypernetworks import hypernetwork

_ORIGINAL_FORWARD = ldm.modules.attention.CrossAttention.forward


class SdOptimization:
    name: str = None
    label: str | None = None
    cmd_opt: str | None = None
    priority: int = 0

    def title(self):
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self):
        return True

    def apply(self):
        pass

    def undo(self):
        ldm.modules.attention.CrossAttention.forward = _ORIGINAL_FORWARD


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    batch_size, sequence_length, inner_dim = x.shape
    h = self.heads
    q_in = self.to_q(x)
    context = x if context is None else context
    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    k_in, v_in = self.to_k(context_k), self.to_v(context_v)
    head_dim = inner_dim // h
    q, k, v = (t.view(batch_size, -1, h, head_dim).transpose(1, 2) for t in (q_in, k_in, v_in))
    dtype = q.dtype
    if shared.opts.upcast_attn:
        q, k, v = q.float(), k.float(), v.float()
    hidden = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    hidden = hidden.transpose(1, 2).reshape(batch_size, -1, h * head_dim).to(dtype)
    return self.to_out[1](self.to_out[0](hidden))


class SdOptimizationSdp(SdOptimization):
    name = "sdp"
    label = "scaled dot product"
    priority = 70

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward


def list_optimizers(res: list) -> None:
    res.append(SdOptimizationSdp())
