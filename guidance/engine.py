"""One `GuidanceRun` per sampler run: it owns every piece of per-run state and composes the methods.

The host adapter calls `GuidanceRun.step` once per denoiser call with the predictions of every row
(`StepInputs`). Predictions arrive in the host's own parameterisation: k-diffusion samplers give
denoised x0 estimates with sigma, timestep samplers give eps. Classifier-free guidance is linear, so
when no method acts at a step the run combines the rows in the host's space with exactly the host's
operations, in the host's order: the result is bit-identical to the host. Only when a method acts
are the rows converted to eps (where every method is defined), combined as in ARCHITECTURE.md and
converted back:

    d     = Σ_j w_j (eps_cond_j − eps_uncond)        AND sub-prompts, as the host weighs them
    d     = rate ⊙ d                                  region scales (S-CFG), when on
    eps   = eps_uncond + cfg_scale · d + Σ additive terms (concepts, SEGA edits)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .params import Settings

PREDICTION_SPACES = ("x0", "eps")


class GuidanceError(RuntimeError):
    """A problem inside a run; the host adapter falls back to its own CFG for the image."""


@dataclass(frozen=True)
class ImageInfo:
    """What a run knows about one image of the batch."""

    prompt: str
    seed: int = 0


@dataclass(frozen=True)
class ExtraRow:
    """One extra conditional row the host must add to the UNet batch for `image`."""

    image: int
    source: str  # the method that asked for it, e.g. "concepts" or "sega"
    text: str


@dataclass
class StepInputs:
    """Everything one denoiser call produced, in the host's parameterisation (`space`).

    `cond` holds the cond rows (AND sub-prompts of every image) and `conds_list[i]` lists
    `(row of cond, AND weight)` for image i, exactly like A1111's `reconstruct_multicond_batch`.
    `extra` holds the predictions of `GuidanceRun.extra_rows`, in that order; with `extra_used`
    (one flag per extra row, e.g. `GuidanceRun.rows_used` of the step) only those of the used rows.
    """

    uncond: torch.Tensor  # (B, C, H, W)
    cond: torch.Tensor  # (n_cond, C, H, W)
    conds_list: Sequence[Sequence[tuple[int, float]]]
    x: torch.Tensor  # (B, C, H, W): the noisy latent the predictions were made from
    sigma: torch.Tensor  # (B,): k-diffusion sigma (x0 space) or the timestep (eps space)
    step: int  # 0-based index within this sampler run
    total_steps: int
    cfg_scale: float
    extra: torch.Tensor | None = None  # (len(extra_rows), C, H, W)
    space: str = "x0"
    uncond_skipped: bool = False  # the host replaced uncond by a cond row (NGMS, skip early CFG)
    extra_used: tuple[bool, ...] | None = None  # None: `extra` holds every extra row


@dataclass
class ImageStep:
    """One image at one step, in eps space, handed to the methods."""

    image: int
    step: int
    total_steps: int
    cfg_scale: float
    eps_uncond: torch.Tensor  # (C, H, W)
    direction: torch.Tensor  # Σ_j w_j (eps_cond_j − eps_uncond), before region scales
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # source -> (k, C, H, W)

    def predictions(self, source: str, count: int, what: str) -> torch.Tensor:
        """The `count` extra-row predictions a method asked for, or a clear error naming `what`."""
        found = self.extra.get(source)
        if found is None or found.shape[0] != count:
            got = "none" if found is None else found.shape[0]
            raise GuidanceError(f"{what}: expected {count} predictions, got {got}")
        return found


class RegionScale(Protocol):
    """Scales the CFG direction per position (S-CFG)."""

    def active(self, step: int, total_steps: int) -> bool: ...

    def rate(self, image_step: ImageStep) -> torch.Tensor: ...  # broadcastable to (C, H, W)


class AdditiveTerm(Protocol):
    """Adds an eps-space term after CFG (concept steering, SEGA edits). One object per image, so
    each image keeps its own state."""

    source: str

    def extra_prompts(self) -> Sequence[str]: ...

    def active(self, step: int, total_steps: int) -> bool: ...

    def term(self, image_step: ImageStep) -> torch.Tensor | None: ...  # (C, H, W) or None

    # Optional: `rows_used(step, total_steps) -> Sequence[bool]`, one per extra prompt, whether
    # `term` reads that prompt's prediction at the step. Without it: all of them while `active`.


def schedule_index(fraction: float, total_steps: int) -> int:
    """A schedule point given as a fraction of the run, as a step index of this run (halves round
    up, so 0.5 of 5 steps is step 3 whatever Python's round-half-even would say)."""
    return int(fraction * total_steps + 0.5)


def combine_cfg(
    uncond: torch.Tensor, cond: torch.Tensor, conds_list: Sequence[Sequence[tuple[int, float]]], cfg_scale: float
) -> torch.Tensor:
    """The host's classifier-free guidance: A1111's `CFGDenoiser.combine_denoised`, operation for
    operation (clone the uncond rows, then add each sub-prompt's scaled difference in order)."""
    denoised = torch.clone(uncond)
    for image, conds in enumerate(conds_list):
        for row, weight in conds:
            denoised[image] += (cond[row] - uncond[image]) * (weight * cfg_scale)
    return denoised


class PredictionSpace:
    """Converts one step's predictions between the host's space and eps, per image."""

    def __init__(self, space: str, x: torch.Tensor, sigma: torch.Tensor):
        if space not in PREDICTION_SPACES:
            raise GuidanceError(f"unknown prediction space {space!r}")
        self.space = space
        self.x = x
        self.sigma = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def to_eps(self, prediction: torch.Tensor, image: int) -> torch.Tensor:
        if self.space == "eps":
            return prediction
        return (self.x[image] - prediction) / self.sigma[image]

    def from_eps(self, eps: torch.Tensor, image: int) -> torch.Tensor:
        if self.space == "eps":
            return eps
        return self.x[image] - self.sigma[image] * eps


def _term_rows_used(term: AdditiveTerm, step: int, total_steps: int) -> list[bool]:
    """One term's `rows_used`, or every prompt of it while it is active."""
    count = len(term.extra_prompts())
    rows_used = getattr(term, "rows_used", None)
    if rows_used is not None:
        return [bool(used) for used in rows_used(step, total_steps)]
    return [term.active(step, total_steps)] * count


def _image_step(inputs: StepInputs, space: PredictionSpace, image: int, conds, extra_preds: dict) -> ImageStep:
    """One image's predictions in eps: uncond, the AND-weighted CFG direction, the extra rows."""
    eps_uncond = space.to_eps(inputs.uncond[image], image)
    direction = torch.zeros_like(eps_uncond)
    for row, weight in conds:
        direction += (space.to_eps(inputs.cond[row], image) - eps_uncond) * weight
    extra = {source: torch.stack([space.to_eps(p, image) for p in preds]) for source, preds in extra_preds.items()}
    return ImageStep(
        image=image,
        step=inputs.step,
        total_steps=inputs.total_steps,
        cfg_scale=inputs.cfg_scale,
        eps_uncond=eps_uncond,
        direction=direction,
        extra=extra,
    )


class GuidanceRun:
    """Per sampler run: the validated settings, the per-image method objects and their state."""

    def __init__(
        self,
        settings: Settings,
        images: Sequence[ImageInfo],
        region_scale: RegionScale | None = None,
        terms: Sequence[Sequence[AdditiveTerm]] | None = None,
    ):
        self.settings = settings
        self.images = tuple(images)
        self.region_scale = region_scale
        self.terms = [list(t) for t in terms] if terms is not None else [[] for _ in self.images]
        if len(self.terms) != len(self.images):
            raise GuidanceError(f"{len(self.terms)} term lists for {len(self.images)} images")
        self.extra_rows = tuple(
            ExtraRow(image, term.source, text)
            for image, image_terms in enumerate(self.terms)
            for term in image_terms
            for text in term.extra_prompts()
        )
        self.steps_seen = 0
        self.total_steps = 0  # of the last step seen: the run's length in denoiser calls
        self.term_steps: dict[str, int] = {}  # per source, the steps at which a term was added
        self.note_sources: list = [region_scale]  # objects with a `notes` list (planning adds more)
        self._noted: set[str] = set()

    @property
    def batch_size(self) -> int:
        return len(self.images)

    def _validate(self, inputs: StepInputs) -> None:
        batch = self.batch_size
        if inputs.uncond.shape[0] != batch or len(inputs.conds_list) != batch:
            raise GuidanceError(
                f"the run was set up for {batch} images, the step has "
                f"{inputs.uncond.shape[0]} uncond rows and {len(inputs.conds_list)} "
                "images"
            )
        extra = 0 if inputs.extra is None else inputs.extra.shape[0]
        used = inputs.extra_used
        if used is not None and len(used) != len(self.extra_rows):
            raise GuidanceError(f"{len(used)} extra-row flags for {len(self.extra_rows)} extra rows")
        expected = len(self.extra_rows) if used is None else sum(used)
        if extra != expected:
            raise GuidanceError(f"expected {expected} extra rows, got {extra}")

    def _region_scale_active(self, inputs: StepInputs) -> bool:
        return self.region_scale is not None and self.region_scale.active(inputs.step, inputs.total_steps)

    def step(self, inputs: StepInputs) -> torch.Tensor:
        """The guided prediction for every image, (B, C, H, W), in the host's space."""
        self._validate(inputs)
        self.steps_seen += 1
        self.total_steps = inputs.total_steps
        scale_regions = self._region_scale_active(inputs)
        acting_terms = [[t for t in terms if t.active(inputs.step, inputs.total_steps)] for terms in self.terms]
        # A skipped uncond (NGMS, skip early CFG) leaves nothing to steer against.
        if inputs.uncond_skipped or not (scale_regions or any(acting_terms)):
            return combine_cfg(inputs.uncond, inputs.cond, inputs.conds_list, inputs.cfg_scale)

        space = PredictionSpace(inputs.space, inputs.x, inputs.sigma)
        extra_by_image = self._split_extra(inputs)
        guided = torch.empty_like(inputs.uncond)
        added_by: set[str] = set()
        for image, conds in enumerate(inputs.conds_list):
            image_step = _image_step(inputs, space, image, conds, extra_by_image[image])
            eps_uncond, direction = image_step.eps_uncond, image_step.direction
            scaled = direction * self.region_scale.rate(image_step) if scale_regions else direction
            eps = eps_uncond + inputs.cfg_scale * scaled
            for term in acting_terms[image]:
                added = term.term(image_step)
                if added is not None:
                    eps = eps + added
                    added_by.add(term.source)
            guided[image] = space.from_eps(eps, image)
        for source in added_by:
            self.term_steps[source] = self.term_steps.get(source, 0) + 1
        return guided

    def rows_used(self, step: int, total_steps: int) -> tuple[bool, ...]:
        """Per entry of `extra_rows`, whether its prediction is read at this step (a term acts and
        that prompt is not cooled down): the adapters leave the others out of the UNet batch."""
        used: list[bool] = []
        for image_terms in self.terms:
            for term in image_terms:
                used += _term_rows_used(term, step, total_steps)
        return tuple(used)

    def rows_needed(self, step: int, total_steps: int) -> bool:
        """Whether any extra row is read at this step."""
        return any(self.rows_used(step, total_steps))

    def take_notes(self) -> list[str]:
        """Notes the methods made since the last call (e.g. S-CFG cannot act at CFG 0), for the
        adapter's report; each note once."""
        notes = [note for source in self.note_sources for note in (getattr(source, "notes", None) or [])]
        new = [note for note in notes if note not in self._noted]
        self._noted.update(new)
        return new

    def _split_extra(self, inputs: StepInputs) -> list[dict[str, list[torch.Tensor]]]:
        by_image: list[dict[str, list[torch.Tensor]]] = [{} for _ in self.images]
        used = inputs.extra_used or (True,) * len(self.extra_rows)
        given = 0
        for row, is_used in zip(self.extra_rows, used, strict=True):
            # a row left out of the UNet batch is never read: the image's uncond stands in (finite)
            prediction = inputs.extra[given] if is_used else inputs.uncond[row.image]
            given += is_used
            by_image[row.image].setdefault(row.source, []).append(prediction)
        return by_image
