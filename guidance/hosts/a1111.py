"""The AUTOMATIC1111 adapter (1.9-1.10): extra rows through `on_cfg_denoiser`, CFG through an
instance override of `combine_denoised`, attention through instance forwards on the routed layers.
Contract: ../shared/hosts/a1111.md §2-§4 and §10.

Per sampler run (`prepare`, from `process_before_every_sampling`) the adapter plans the run, encodes
the extra prompts with the processing object's own cached encoder and patches the run's denoiser.
The global callbacks act only for the denoiser a run was prepared for. Any exception inside a hook
falls back to the host's own CFG for the image and removes every patch (`finish`).

Composition with other CFG tools: our `combine_denoised` calls the one that was in effect before it
(another extension's instance wrapper, or a sampler subclass's method such as sd-dynamic-
thresholding's) on the host's own rows and adds our guidance's difference from plain CFG. A tool that
replaces `combine_denoised` after us without calling it (sd-webui-incantations' S-CFG and PAG) is
found in `on_cfg_after_cfg`: our difference is added to its result there, with one note.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine import GuidanceError, combine_cfg
from ..planning import PlannedRun, plan_run, run_steps
from ..prompt_model import Tokenizer
from .a1111_attention import UNetRouting
from .a1111_conds import append_rows, conds_for_step, encode_extra_prompts
from .a1111_rows import step_inputs
from .common import (
    REFINER_NOTE,
    batch_images,
    check_encoded,
    console,
    record_plan,
    record_run,
    report,
    settings_for_pass,
    state_of,
)


@dataclass
class ActiveRun:
    """One sampler run's patches and per-call bookkeeping."""

    p: object
    denoiser: object
    planned: PlannedRun
    space: str
    model: object = None  # the model the run was prepared for (the refiner switch replaces it)
    schedules: list = field(default_factory=list)  # per extra row (same order as run.extra_rows)
    routing: UNetRouting | None = None
    # set by on_cfg_denoiser for the denoiser call in flight
    x_in: torch.Tensor | None = None
    sigma_in: torch.Tensor | None = None
    n_cond: int = 0
    first_cond_rows: tuple[int, ...] = ()
    next_row: int = 0  # first row of the next UNet call
    x_out: torch.Tensor | None = None  # the call's UNet output (on_cfg_denoised)
    combined: bool = False  # our combine_denoised ran for the call in flight
    # the combine_denoised in effect before ours: another extension's instance wrapper, else None (the
    # sampler class's own method); ours is the function we assigned, removed at the end
    previous_combine: object = None
    our_combine: object = None
    removed: bool = False

    used: tuple[bool, ...] = ()  # per extra row, whether the call in flight carries it (rows_used)
    _sources: dict = field(default_factory=dict)  # (n_cond, device, used) → index tensor

    @property
    def extra_count(self) -> int:
        """Extra rows in the call in flight: only those a method reads at this step."""
        return sum(self.used)

    def source_rows(self, n_cond: int, device) -> torch.Tensor:
        """Each carried extra row's image, as its row in the uncond block: made once per pattern of
        carried rows (they change at schedule boundaries only), not per step (a new index tensor each
        step would be a host-to-device copy in the hot path)."""
        key = (n_cond, device, self.used)
        if key not in self._sources:
            rows = [
                n_cond + row.image for row, used in zip(self.planned.run.extra_rows, self.used, strict=True) if used
            ]
            self._sources[key] = torch.tensor(rows, device=device)
        return self._sources[key]


def decline_reason(p) -> str | None:
    """Models and set-ups the methods cannot act on; the image is generated normally."""
    model = p.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":
        return "InstructPix2Pix models are not supported (their three-part batch has no room for extra rows)."
    if getattr(model, "is_sd3", False):
        return "SD3 has no classic cross-attention UNet; Semantic Fidelity is off for this image."
    try:
        from modules import sd_unet

        if sd_unet.current_unet is not None:
            return "an alternative UNet (e.g. TensorRT) is active; Semantic Fidelity is off for this image."
    except ImportError:  # pragma: no cover - very old hosts
        pass
    return None


def _prediction_space(denoiser) -> str:
    """k-diffusion samplers give x0 with sigma; DDIM/PLMS/UniPC give eps with a timestep."""
    names = {cls.__name__ for cls in type(denoiser).__mro__}
    return "eps" if "CFGDenoiserTimesteps" in names else "x0"


def _tokenizer_wrapper(model):
    """The host's text-encoder wrapper with `tokenize_line` (SDXL: its first embedder that has one)."""
    embedder = getattr(model, "cond_stage_model", None)
    wrapper = embedder
    if hasattr(embedder, "embedders"):
        wrapper = next((e for e in embedder.embedders if hasattr(e, "tokenize_line")), None)
    return wrapper if wrapper is not None and hasattr(wrapper, "tokenize_line") else None


def _tokenizer(model) -> Tokenizer | None:
    """The host's tokenizer for token columns (a1111.md §6.6), or None: the prompt model finds them."""
    return Tokenizer.of(_tokenizer_wrapper(model))


class A1111Adapter:
    host = "a1111"

    def __init__(self):
        self._cond_cache = [None, None]  # the processing object's cache protocol: [params, conds]
        # the run in progress, also reachable when its generation died with an exception (the host
        # then skips postprocess, pitfall 9) so that the next generation can remove its patches
        self._current: ActiveRun | None = None

    # -- registration (script import) ----------------------------------------------------------
    def register_callbacks(self) -> None:
        from modules import script_callbacks

        script_callbacks.on_cfg_denoiser(self._on_cfg_denoiser)
        script_callbacks.on_cfg_denoised(self._on_cfg_denoised)
        script_callbacks.on_cfg_after_cfg(self._on_cfg_after_cfg)
        script_callbacks.on_list_optimizers(self._on_list_optimizers)

    @staticmethod
    def _on_list_optimizers(optimizers: list) -> None:
        from .a1111_attention import make_optimization

        optimizers.append(make_optimization())

    # -- lifecycle ---------------------------------------------------------------------------
    def prepare(self, p, state) -> None:
        self.finish(p)  # the hires pass and every new batch get a fresh run
        settings = settings_for_pass(p, state, decline_reason)
        if settings is None:
            return
        prompts = getattr(p, "hr_prompts", None) if getattr(p, "is_hr_pass", False) else None
        images = batch_images(p, prompts=prompts)
        planned = plan_run(settings, images, run_steps(p), tokenizer=_tokenizer(p.sd_model))
        record_plan(p, planned)
        if not planned.acting:
            return
        denoiser = p.sampler.model_wrap_cfg
        active = ActiveRun(p=p, denoiser=denoiser, planned=planned, space=_prediction_space(denoiser), model=p.sd_model)
        if planned.run.extra_rows:
            texts = [row.text for row in planned.run.extra_rows]
            active.schedules = encode_extra_prompts(p, texts, self._cond_cache)
            check_encoded(texts, active.schedules)
        state.active = self._current = active
        active.previous_combine = denoiser.__dict__.get("combine_denoised")
        denoiser.combine_denoised = active.our_combine = self._combine_for(active)
        # the UNet wrapper counts each call's rows (skipped uncond shows as a short batch) and tells
        # the attention router, when there is one, which rows a call holds
        active.routing = UNetRouting(
            planned.router,
            p.sd_model.model.diffusion_model,
            self._rows_for(active),
            on_error=lambda note: report(p, note),
        )

    def finish(self, p) -> None:
        state = state_of(p)
        active = getattr(state, "active", None) if state is not None else None
        if active is not None:
            record_run(p, active.planned)
            state.active = None
            self._remove(active)

    def reset(self) -> None:
        """Remove whatever an earlier generation left patched (one that raised skips finish)."""
        if self._current is not None:
            self._remove(self._current)

    def _remove(self, active: ActiveRun) -> None:
        if self._current is active:
            self._current = None
        active.removed = True  # a copy another extension still holds now acts like what it wrapped
        attributes = active.denoiser.__dict__
        if attributes.get("combine_denoised") is active.our_combine:
            if active.previous_combine is not None:
                attributes["combine_denoised"] = active.previous_combine
            else:
                attributes.pop("combine_denoised")
        if active.routing is not None:
            active.routing.remove()

    def _fail(self, active: ActiveRun, error: Exception) -> None:
        state = state_of(active.p)
        if state is not None:
            state.failed = True
        self.finish(active.p)
        report(active.p, f"{type(error).__name__}: {error}. This image uses the host's plain CFG.")

    # -- sampling hooks ----------------------------------------------------------------------
    @staticmethod
    def _active_for(denoiser) -> ActiveRun | None:
        state = state_of(getattr(denoiser, "p", None))
        active = getattr(state, "active", None) if state is not None else None
        return active if active is not None and active.denoiser is denoiser else None

    def _on_cfg_denoiser(self, params) -> None:
        active = self._active_for(params.denoiser)
        if active is None:
            return
        if active.p.sd_model is not active.model:
            # the refiner switch (a1111.md pitfall 3): our rows and routed layers belong to the first model
            step = params.denoiser.step
            self.finish(active.p)
            report(active.p, REFINER_NOTE.format(step=step + 1, total=params.denoiser.total_steps))
            return
        try:
            self._add_extra_rows(active, params)
        except Exception as error:  # the host swallows callback errors: fall back explicitly
            self._fail(active, error)

    def _add_extra_rows(self, active: ActiveRun, params) -> None:
        denoiser = params.denoiser
        batch = params.text_uncond.shape[0]
        n_cond = params.text_cond.shape[0]
        cond = denoiser.sampler.sampler_extra_args["cond"]
        repeats = [len(sub_prompts) for sub_prompts in cond.batch]
        if len(repeats) != batch or sum(repeats) != n_cond:
            raise GuidanceError(f"unexpected batch layout: {n_cond} cond rows for {batch} images")
        x, sigma, image_cond = params.x, params.sigma, params.image_cond
        text_cond = params.text_cond
        run = active.planned.run
        # cost follows the schedule: only the extra rows a method reads at this step go to the UNet
        active.used = run.rows_used(denoiser.step, max(denoiser.total_steps, 1)) if run.extra_rows else ()
        if active.extra_count:
            # each extra row copies its image's uncond-block row (the image's own latent)
            sources = active.source_rows(n_cond, x.device)
            carried = [index for index, used in enumerate(active.used) if used]
            extra = conds_for_step(active.schedules, carried, denoiser.step)
            empty = getattr(denoiser.p.sd_model, "cond_stage_model_empty_prompt", None)
            text_cond = append_rows(text_cond, extra, empty)
            x = torch.cat([x[:n_cond], x[sources], x[n_cond:]])
            sigma = torch.cat([sigma[:n_cond], sigma[sources], sigma[n_cond:]])
            image_cond = torch.cat([image_cond[:n_cond], image_cond[sources], image_cond[n_cond:]])
        # every shape is checked above; only now is the batch changed, all at once (pitfall 8)
        params.x, params.sigma, params.image_cond, params.text_cond = x, sigma, image_cond, text_cond
        active.x_in, active.sigma_in = x, sigma
        active.x_out, active.combined = None, False
        active.n_cond = n_cond
        active.first_cond_rows = tuple(sum(repeats[:i]) for i in range(batch))
        active.next_row = 0

    def _rows_for(self, active: ActiveRun):
        from ..attention_routing import CallRows

        def rows_for_call(x: torch.Tensor):
            start = active.next_row
            count = x.shape[0]
            active.next_row += count
            if active.planned.router is None:
                return None
            batch = len(active.first_cond_rows)
            uncond_start = active.n_cond + active.extra_count

            def local(row: int) -> int | None:
                return row - start if start <= row < start + count else None

            return CallRows(
                step=active.denoiser.step,
                total_steps=max(active.denoiser.total_steps, 1),
                latent_size=tuple(x.shape[-2:]),
                uncond=tuple(local(uncond_start + i) for i in range(batch)),
                cond=tuple(local(row) for row in active.first_cond_rows),
            )

        return rows_for_call

    def _step_inputs(self, active: ActiveRun, x_out, conds_list, cond_scale):
        if active.x_in is None:
            raise GuidanceError("the denoiser ran without the extra rows callback")
        # the host drops the uncond rows before the UNet on skipped steps (NGMS, skip early CFG) and
        # appends copies of the first cond rows afterwards
        denoiser = active.denoiser
        return step_inputs(
            x_out,
            active.x_in,
            active.sigma_in,
            conds_list,
            active.extra_count,
            step=denoiser.step,
            total_steps=max(denoiser.total_steps, 1),
            cfg_scale=cond_scale,
            space=active.space,
            uncond_skipped=active.next_row == active.n_cond + active.extra_count,
            extra_used=active.used if active.used else None,
        )

    def _combine_for(self, active: ActiveRun):
        denoiser = active.denoiser

        def previous(x_out, conds_list, uncond, cond_scale):
            if active.previous_combine is not None:
                return active.previous_combine(x_out, conds_list, uncond, cond_scale)
            # read at call time: a tool may swap the denoiser's class after us (a sampler subclass)
            return type(denoiser).combine_denoised(denoiser, x_out, conds_list, uncond, cond_scale)

        def combine_denoised(x_out, conds_list, uncond, cond_scale):
            host_rows = host_rows_of(x_out, active)
            if active.removed:
                return previous(host_rows, conds_list, uncond, cond_scale)
            try:
                inputs = self._step_inputs(active, x_out, conds_list, cond_scale)
                guided = active.planned.run.step(inputs)
                self._report_notes(active)
                active.combined = True
                if active.previous_combine is None and _is_host_combine(type(denoiser).combine_denoised):
                    return guided
                plain = combine_cfg(inputs.uncond, inputs.cond, conds_list, cond_scale)
                return previous(host_rows, conds_list, uncond, cond_scale) + (guided - plain)
            except Exception as error:
                self._fail(active, error)
                return previous(host_rows, conds_list, uncond, cond_scale)

        return combine_denoised

    @staticmethod
    def _report_notes(active: ActiveRun) -> None:
        """What the methods noted during the step (e.g. S-CFG cannot act at CFG 0), once each."""
        for note in active.planned.run.take_notes():
            report(active.p, note)

    def _on_cfg_denoised(self, params) -> None:
        active = self._current
        if active is not None and active.x_in is not None and not active.removed:
            active.x_out = params.x

    def _on_cfg_after_cfg(self, params) -> None:
        """Another extension's combine_denoised ran instead of ours: add our guidance's difference
        from plain CFG to its result (masked like the host's inpainting blend)."""
        active = self._current
        if active is None or active.removed or active.x_in is None:
            return
        try:
            if not active.combined and active.x_out is not None:
                self._add_after_cfg(active, params)
        except Exception as error:
            self._fail(active, error)
        finally:
            active.x_in = active.x_out = None

    def _add_after_cfg(self, active: ActiveRun, params) -> None:
        denoiser, x_out = active.denoiser, active.x_out
        conds_list = denoiser.sampler.sampler_extra_args["cond"]
        from modules import prompt_parser

        conds_list, _ = prompt_parser.reconstruct_multicond_batch(conds_list, denoiser.step)
        skipped = active.next_row == active.n_cond + active.extra_count
        scale = 1.0 if skipped else float(active.p.cfg_scale) * getattr(denoiser, "cond_scale_miltiplier", 1.0)
        inputs = self._step_inputs(active, x_out, conds_list, scale)
        delta = active.planned.run.step(inputs) - combine_cfg(inputs.uncond, inputs.cond, conds_list, scale)
        self._report_notes(active)
        if getattr(denoiser, "mask", None) is not None and not getattr(denoiser, "mask_before_denoising", False):
            delta = delta * denoiser.nmask
        params.x = params.x + delta
        console(active.p, AFTER_OTHER_CFG)


# console only: our guidance acts in full, composed after the other tool's (as on Forge)
AFTER_OTHER_CFG = (
    "another extension replaced combine_denoised without calling ours; our guidance is added to its result."
)


def host_rows_of(x_out: torch.Tensor, active: ActiveRun) -> torch.Tensor:
    """The UNet output rows the host laid out (cond rows, uncond rows), without our extra rows."""
    count = active.extra_count
    if not count or x_out.shape[0] < active.n_cond + count:
        return x_out
    return torch.cat([x_out[: active.n_cond], x_out[active.n_cond + count :]])


def _is_host_combine(function) -> bool:
    """Whether `function` is A1111's own CFGDenoiser.combine_denoised (no subclass changed it)."""
    try:
        from modules.sd_samplers_cfg_denoiser import CFGDenoiser
    except ImportError:  # pragma: no cover - hosts without the module
        return False
    return function is CFGDenoiser.combine_denoised
