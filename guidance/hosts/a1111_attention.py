"""A1111's attention, for the layers a run routes (../shared/hosts/a1111.md §4).

Two things live here:
- `semantic_fidelity_sdp_forward` and the optimization that installs it class-wide when a user
  selects it (registered through `on_list_optimizers`, priority below every builtin so "Automatic"
  never picks it);
- `UNetRouting`: during one sampler run, instance forwards on the routed CrossAttention modules
  (whatever optimization is active keeps serving the others) and on the UNet itself, which tells
  the router which rows each UNet call holds. Instance attributes survive the host's optimizer
  swaps; `remove` deletes every one of them. A routed layer calls the module's class forward (the
  host's active optimization) on calls without attention work and after any error in the kernel,
  which also stops the router for the run and removes the layer patches (one note, `on_error`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..attention import attention
from .common import NONFINITE_NOTE

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


def attention_failure_note(error: Exception) -> str:
    """The one note of a failed attention kernel (console and infotext)."""
    what = "out of memory" if isinstance(error, torch.OutOfMemoryError) else f"{type(error).__name__}: {error}"
    return (
        f"S-CFG / attention regulation stopped ({what}); the rest of this image uses the host's own "
        "attention for every layer."
    )


def print_note(note: str) -> None:
    """The default `on_error`: the console only (the adapter passes one that also writes the infotext)."""
    print(f"Semantic Fidelity: {note}", file=sys.stderr)


class UNetRouting:
    """Instance forwards for one run: the UNet call bookkeeping and, with a router, the routed
    attention layers.

    `rows_for_call(x)` is asked once per UNet call with the call's input rows; it returns the
    router's `CallRows` for them (calls come in row order: the host slices the batch
    in order and runs uncond last). A routed layer whose step needs no attention work calls the
    module's class forward (the host's active optimization). An exception in the routed forward
    (an OOM above all) stops the router for the rest of the run: that call and every later one use
    the class forward, the layer patches are removed and `on_error` gets one note."""

    def __init__(
        self,
        router,
        diffusion_model: torch.nn.Module,
        rows_for_call: Callable[[torch.Tensor], object],
        on_error: Callable[[str], None] = print_note,
    ):
        self.router = router
        self.diffusion_model = diffusion_model
        self.rows_for_call = rows_for_call
        self.on_error = on_error
        self.patched: list[torch.nn.Module] = []
        self.layers: list[torch.nn.Module] = []
        self.failed = False
        self._routing = False  # whether the current UNet call routes attention
        if router is not None:
            from ..attention_routing import LayerKey

            modules = {}
            for name, module in diffusion_model.named_modules():
                key = LayerKey.from_module_name(name)
                if key is not None:
                    modules[key] = module
            for key in router.routed_layers(modules):
                self._patch(modules[key], self._attention_forward(modules[key], key))
                self.layers.append(modules[key])
        self._patch(diffusion_model, self._unet_forward(diffusion_model))

    def _patch(self, module: torch.nn.Module, forward) -> None:
        module.forward = forward
        self.patched.append(module)

    def _attention_forward(self, module, key):
        router = self.router

        def forward(x, context=None, mask=None, **kwargs):
            if self._routing:
                try:
                    q, k, v = _projections(module, x, context)
                    return module.to_out(router.forward(key, q, k, v, module.heads, upcast=_upcast()))
                except Exception as error:  # noqa: BLE001 - any failure: the host's attention
                    note = attention_failure_note(error)
                # outside the except block: the traceback (and the tensors its frames hold) is freed
                self._stop(note)
            return type(module).forward(module, x, context=context, mask=mask, **kwargs)

        return forward

    def _unet_forward(self, unet):
        def forward(x, *args, **kwargs):
            rows = self.rows_for_call(x)
            self._routing = self.router is not None and not self.failed and self._begin(rows)
            return type(unet).forward(unet, x, *args, **kwargs)

        return forward

    def _begin(self, rows) -> bool:
        """Tells the router which rows the call holds; whether any layer does attention work in it."""
        try:
            self.router.begin_call(rows)
            return self.router.active(rows.step, rows.total_steps)
        except Exception as error:  # noqa: BLE001
            note = attention_failure_note(error)
        self._stop(note)
        return False

    def _stop(self, note: str) -> None:
        """Ends the attention part for the rest of the run: no layer stays patched; one note."""
        self._routing = False
        if self.failed:
            return
        self.failed = True
        self.router.stop()
        for module in self.layers:
            module.__dict__.pop("forward", None)
        self.patched = [m for m in self.patched if m not in self.layers]
        self.layers.clear()
        self.on_error(note)

    def remove(self) -> None:
        """Deletes every instance forward; reports, once, non-finite values the run replaced."""
        if self.router is not None and self.patched:
            self.router.end()
            if not self.failed and self.router.nonfinite_seen():  # one read per run, after it
                self.on_error(NONFINITE_NOTE)
        for module in self.patched:
            module.__dict__.pop("forward", None)
        self.patched.clear()
        self.layers.clear()
