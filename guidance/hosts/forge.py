"""The Forge 2.x adapter: everything goes on a clone of the run's UnetPatcher
(../shared/hosts/forge.md §1.2, §2-§5, §9).

`prepare` runs from `process_before_every_sampling` (once per sampler run, and twice more for the
hires pass): it plans the run, encodes the extra prompts like Forge encodes the main prompt, clones
`p.sd_model.forge_objects.unet`, installs the functions of `forge_patches.ForgePatches` and assigns
the clone back. `finish` puts the original UnetPatcher back. Any error inside a patched function
switches the run off (host CFG for the rest of the run), puts the original back and reports once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..params import METHOD_SWITCHES
from ..planning import plan_run, run_steps
from ..prompt_model import Tokenizer
from .common import (
    REFINER_NOTE,
    batch_images,
    check_encoded,
    record_plan,
    record_run,
    report,
    settings_for_pass,
    state_of,
)
from .forge_patches import ForgePatches

UNCOND_METHODS = ("concepts", "sega", "scfg")  # they steer against the uncond prediction


@dataclass
class ForgeRun:
    p: object
    original: object  # the UnetPatcher the pass started with
    clone: object  # ours, assigned to p.sd_model.forge_objects.unet
    patches: ForgePatches
    model: object = None  # p.sd_model when prepared: the refiner switch replaces it without a new hook call


def decline_reason(p) -> str | None:
    """Models without classic CFG or UNet cross-attention (forge.md §5.2): Flux, Chroma, SD3 and
    anything else whose diffusion model is not the SD1/SD2/SDXL UNet."""
    model = p.sd_model
    unet = getattr(getattr(model, "forge_objects", None), "unet", None)
    if unet is None:
        return "the loaded model has no Forge UNet patcher; Semantic Fidelity is off for this image."
    config = getattr(getattr(unet.model, "diffusion_model", None), "config", None)
    unet_like = isinstance(config, dict) and config.get("model_channels") is not None
    if getattr(model, "is_sd3", False) or getattr(model, "use_distilled_cfg_scale", False) or not unet_like:
        return (
            f"{type(model).__name__} models have no classic CFG UNet with cross-attention (Flux, Chroma, "
            "SD3 and the like); Semantic Fidelity is off and the image is generated normally."
        )
    return None


def _pass_has_uncond(p) -> bool:
    """Forge drops the uncond conditioning entirely when the pass's CFG scale is 1 (§3.2)."""
    if getattr(p, "is_hr_pass", False):
        return getattr(p, "hr_uc", True) is not None and float(getattr(p, "hr_cfg", 1.0)) != 1.0
    return getattr(p, "uc", True) is not None and float(p.cfg_scale) != 1.0


def _sd_conditioning(texts: list[str], width: int, height: int):
    try:
        from modules.prompt_parser import SdConditioning
    except ImportError:  # outside the WebUI (the test stand-in takes a plain list)
        return list(texts)
    return SdConditioning(texts, width=width, height=height)


def _rows(encoded, count: int) -> list:
    if isinstance(encoded, dict):
        return [{"crossattn": encoded["crossattn"][i], "vector": encoded["vector"][i]} for i in range(count)]
    return [encoded[i] for i in range(count)]


def encode_prompts(p, texts: list[str], cache: dict) -> list:
    """Each text through `p.sd_model.get_learned_conditioning` (emphasis, BREAK, embeddings, SDXL
    size embedding; forge.md §3.5), cached for the generation."""
    hires = getattr(p, "is_hr_pass", False)
    width = int(getattr(p, "hr_upscale_to_x", 0) or p.width) if hires else int(p.width)
    height = int(getattr(p, "hr_upscale_to_y", 0) or p.height) if hires else int(p.height)
    missing = [text for text in dict.fromkeys(texts) if (text, width, height) not in cache]
    if missing:
        encoded = p.sd_model.get_learned_conditioning(_sd_conditioning(missing, width, height))
        for text, row in zip(missing, _rows(encoded, len(missing)), strict=True):
            cache[(text, width, height)] = row
    return [cache[(text, width, height)] for text in texts]


def host_tokenizer(model) -> Tokenizer | None:
    """Forge's text processing engine as the prompt model's tokenizer (forge.md §3.6), or None."""
    return Tokenizer.of(
        getattr(model, "text_processing_engine", None) or getattr(model, "text_processing_engine_l", None)
    )


def _step_source(p):
    """(step, total) from the run's CFG denoiser, read at call time (the hires pass has its own)."""
    calls = [0]

    def step_and_total() -> tuple[int, int]:
        denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
        if denoiser is not None and getattr(denoiser, "total_steps", None):
            return int(denoiser.step), int(denoiser.total_steps)
        calls[0] += 1
        return calls[0] - 1, int(getattr(p, "steps", calls[0]) or calls[0])

    return step_and_total


class ForgeAdapter:
    host = "forge"
    decline = staticmethod(decline_reason)  # Forge Neo's adapter widens it

    def __init__(self):
        self._current: ForgeRun | None = None  # the run whose clone may still be assigned

    def register_callbacks(self) -> None:
        """Forge needs no global callbacks: everything lives on the run's UnetPatcher clone."""

    def reset(self) -> None:
        """Remove whatever an earlier generation left patched (one that raised skips finish)."""
        if self._current is not None:
            self._remove(self._current)

    def prepare(self, p, state) -> None:
        self.finish(p)  # the hires pass calls this again, before and after Forge resets the UNet
        settings = settings_for_pass(p, state, self.decline)
        if settings is None:
            return
        if not _pass_has_uncond(p):
            dropped = [method for method in UNCOND_METHODS if settings.method_enabled(method)]
            if dropped:
                report(p, f"CFG scale 1 leaves no unconditional prediction; {', '.join(dropped)} off for this pass.")
                settings = settings.replace(**{METHOD_SWITCHES[method]: False for method in dropped})
        if not settings.active_methods:
            return
        hires = getattr(p, "is_hr_pass", False)
        images = batch_images(p, prompts=getattr(p, "hr_prompts", None) if hires else None)
        planned = plan_run(settings, images, run_steps(p), tokenizer=host_tokenizer(p.sd_model))
        record_plan(p, planned)
        if not planned.acting:
            return
        cache = state.__dict__.setdefault("forge_encoded", {})
        texts = [row.text for row in planned.run.extra_rows]
        extra_conds = encode_prompts(p, texts, cache)
        check_encoded(texts, extra_conds)
        original = p.sd_model.forge_objects.unet
        clone = original.clone()
        patches = ForgePatches(
            planned, extra_conds, _step_source(p), lambda error: self._fail(p, error), lambda note: report(p, note)
        )
        patches.install(clone)
        state.active = self._current = ForgeRun(p=p, original=original, clone=clone, patches=patches, model=p.sd_model)
        p.sd_model.forge_objects.unet = clone

    def finish(self, p) -> None:
        state = state_of(p)
        run = getattr(state, "active", None) if state is not None else None
        if not isinstance(run, ForgeRun):
            return
        record_run(p, run.patches.planned)
        state.active = None
        if run.model is not None and p.sd_model is not run.model and run.patches.enabled:
            # Forge's refiner switch loads another model mid-run and calls no hook (forge.md §1.1): our
            # functions stayed on the first model's patcher from then on
            patches = run.patches
            report(p, REFINER_NOTE.format(step=patches.step + 2, total=max(patches.total_steps, 1)))
        self._remove(run)

    def _remove(self, run: ForgeRun) -> None:
        if self._current is run:
            self._current = None
        run.patches.finish()
        run.patches.enabled = False  # copies held by other extensions' clones act like the host
        objects = getattr(run.model or run.p.sd_model, "forge_objects", None)  # the model we patched
        if objects is not None and objects.unet is run.clone:
            objects.unet = run.original

    def _fail(self, p, error: Exception) -> None:
        state = state_of(p)
        if state is not None:
            state.failed = True
        self.finish(p)
        report(p, f"{type(error).__name__}: {error}. This image uses Forge's own CFG from here on.")
