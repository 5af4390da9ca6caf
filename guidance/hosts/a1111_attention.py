"""A1111's attention, for the layers a run routes (../shared/hosts/a1111.md §4).

Two things live here:
- `semantic_fidelity_sdp_forward` and the optimization that installs it class-wide when a user
  selects it (registered through `on_list_optimizers`, priority below every builtin so "Automatic"
  never picks it);
- `UNetRouting`: during one sampler run, instance forwards on the routed CrossAttention modules
  (whatever optimization is active keeps serving the others) and on the UNet itself, which tells
  the router which rows each UNet call holds. Instance attributes survive the host's optimizer
  swaps; `remove` deletes every one of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..attention import attention

OPTIMIZATION_NAME = "Semantic Fidelity SDP"
OPTIMIZATION_PRIORITY = -10  # below every builtin, so "Automatic" keeps choosing the host's own


def _projections(module, x: torch.Tensor, context: torch.Tensor | None):
    """q, k, v through the module's own Linear layers (LoRA patches them) and the host's loaded
    hypernetworks, as the host's SDP forward computes them."""
    from modules import shared
    from modules.hypernetworks import hypernetwork

    context = x if context is None else context
    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    return module.to_q(x), module.to_k(context_k), module.to_v(context_v)


def _upcast() -> bool:
    from modules import shared

    return bool(getattr(shared.opts, "upcast_attn", False))


def semantic_fidelity_sdp_forward(self, x, context=None, mask=None, **kwargs):
    """The SDP forward through this extension's kernel (a CrossAttention class forward)."""
    if mask is not None:  # SD UNets never pass one; keep the host's handling for anything that does
        from modules import sd_hijack_optimizations

        return sd_hijack_optimizations.scaled_dot_product_attention_forward(self, x, context, mask, **kwargs)
    q, k, v = _projections(self, x, context)
    return self.to_out(attention(q, k, v, self.heads, upcast=_upcast()))


def make_optimization():
    """The registered optimization (an `SdOptimization` of the running host)."""
    import ldm.modules.attention
    from modules import sd_hijack_optimizations

    class SemanticFidelitySdp(sd_hijack_optimizations.SdOptimization):
        name = OPTIMIZATION_NAME
        label = "scaled dot product through Semantic Fidelity's kernel"
        cmd_opt = None
        priority = OPTIMIZATION_PRIORITY

        def is_available(self):
            return hasattr(torch.nn.functional, "scaled_dot_product_attention")

        def apply(self):
            ldm.modules.attention.CrossAttention.forward = semantic_fidelity_sdp_forward
            try:
                import sgm.modules.attention

                sgm.modules.attention.CrossAttention.forward = semantic_fidelity_sdp_forward
            except ImportError:  # pragma: no cover - hosts without sgm
                pass

    return SemanticFidelitySdp()


class UNetRouting:
    """Instance forwards for one run: the UNet call bookkeeping and, with a router, the routed
    attention layers.

    `rows_for_call(x)` is asked once per UNet call with the call's input rows; it returns the
    router's `CallRows` for them (calls come in row order: the host slices the batch
    in order and runs uncond last)."""

    def __init__(self, router, diffusion_model: torch.nn.Module, rows_for_call: Callable[[torch.Tensor], object]):
        self.router = router
        self.diffusion_model = diffusion_model
        self.rows_for_call = rows_for_call
        self.patched: list[torch.nn.Module] = []
        if router is not None:
            from ..attention_routing import LayerKey

            modules = {}
            for name, module in diffusion_model.named_modules():
                key = LayerKey.from_module_name(name)
                if key is not None:
                    modules[key] = module
            for key in router.routed_layers(modules):
                self._patch(modules[key], self._attention_forward(modules[key], key))
        self._patch(diffusion_model, self._unet_forward(diffusion_model))

    def _patch(self, module: torch.nn.Module, forward) -> None:
        module.forward = forward
        self.patched.append(module)

    def _attention_forward(self, module, key):
        router = self.router

        def forward(x, context=None, mask=None, **kwargs):
            q, k, v = _projections(module, x, context)
            return module.to_out(router.forward(key, q, k, v, module.heads, upcast=_upcast()))

        return forward

    def _unet_forward(self, unet):
        unet_class_forward = type(unet).forward
        router = self.router

        def forward(x, *args, **kwargs):
            rows = self.rows_for_call(x)
            if router is not None:
                router.begin_call(rows)
            return unet_class_forward(unet, x, *args, **kwargs)

        return forward

    def remove(self) -> None:
        if self.router is not None:
            self.router.end()
        for module in self.patched:
            module.__dict__.pop("forward", None)
        self.patched.clear()
