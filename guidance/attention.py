"""The attention kernel that both host adapters route the selected layers through.

Inputs are what a CrossAttention forward has after its q/k/v projections: (batch, tokens,
heads·dim) tensors and the head count (Forge's attention replace patches receive exactly these;
the A1111 adapter computes them with the module's own Linear layers so LoRA stays active). The fast
path is `torch.nn.functional.scaled_dot_product_attention`, numerically what the hosts' SDP
optimisation computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h·d) → (B, h, N, d)"""
    batch, tokens, width = tensor.shape
    return tensor.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(tensor: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) → (B, N, h·d)"""
    batch, heads, tokens, dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch, tokens, heads * dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Softmax(q·kᵀ/√d)·v per head, via SDPA. `upcast` computes in float32 (A1111's upcast_attn)
    and returns the input dtype."""
    dtype = q.dtype
    q, k, v = (split_heads(t, heads) for t in (q, k, v))
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return merge_heads(out).to(dtype)


def cross_attention_forward(
    module: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None
) -> torch.Tensor:
    """A CrossAttention forward (ldm or sgm module: `to_q`, `to_k`, `to_v`, `to_out`, `heads`)
    computed through `attention`. Self-attention when `context` is None."""
    context = x if context is None else context
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    return module.to_out(attention(q, k, v, module.heads))
