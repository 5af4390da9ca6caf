"""Forge Neo: Forge's adapter with Neo's differences (../shared/hosts/forge.md; Neo's own tree).

Neo keeps what the Forge adapter uses — `UnetPatcher.clone`, the pre-CFG list, the UNet function
wrapper and CFG function in `model_options`, attn1/attn2 replace patches looked up by 3-part then
2-part key, `calc_cond_uncond_batch` with ControlNet's `get_control` — and its `sampling_function`
joins per-call `extra_model_options` onto the patcher's options, which keeps our pre-CFG function.
What differs is which models it runs: beside SD1/SDXL UNets, DiTs and video models (Flux,
Flux.2-Klein, Qwen-Image, Wan, Chroma, Lumina, Anima, SD3-class) without UNet cross-attention layers
or (Flux-dev, Chroma) classic CFG. Neo's engines say which with `is_webui_legacy_model()` (SD1 or
SDXL); the others are declined with a note and generated normally.
"""

from __future__ import annotations

from . import forge


def decline_reason(p) -> str | None:
    """Forge's test (a UNet config with `model_channels`), then Neo's own family test."""
    reason = forge.decline_reason(p)
    if reason is not None:
        return reason
    model = p.sd_model
    legacy = getattr(model, "is_webui_legacy_model", None)
    if callable(legacy) and not legacy():
        return (
            f"{type(model).__name__} is not an SD1/SDXL UNet model, so it has no cross-attention UNet for "
            "Semantic Fidelity to steer; it is off and the image is generated normally."
        )
    return None


class NeoAdapter(forge.ForgeAdapter):
    host = "neo"
    decline = staticmethod(decline_reason)
