"""SEGA edits (Semantic Guidance, arXiv 2301.12247), as the authors' code behaves
(shared/reference/README.md §3, METHODS.md §2).

Per step and image, for each edit c: γ_c = tail_λc(±s_c·(ε_c − ε∅)) per channel; E = Σ w_c·γ_c + s_m·ν
over the edits not cooled down; ν ← β·ν + (1 − β)·E from step 0. All edits warm: E is added. Some
warm: Σ_warm (w_c / Σ_warm w)·γ_c instead (no momentum). None warm: nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..engine import GuidanceError, ImageStep, schedule_index
from ..params import Edit, Settings
from .sparsify import FiniteCheck, compute_dtype, quantile_tail


@dataclass(frozen=True)
class EditSpec:
    """One edit with its schedule in steps of the run: warm when step ≥ warmup, silent (weight 0,
    γ 0) when step ≥ cooldown; cooldown None means never."""

    scale: float
    threshold: float
    warmup: int
    cooldown: int | None = None
    reverse: bool = False
    weight: float = 1.0

    def warm(self, step: int) -> bool:
        return step >= self.warmup

    def cooled(self, step: int) -> bool:
        return self.cooldown is not None and step >= self.cooldown


@dataclass
class SegaStepResult:
    directions: torch.Tensor  # (K, …, C, H, W) γ_c, zero when cooled down
    weights: list[float]  # the weight each edit had in E (0 when cooled down)
    warm: list[bool]
    momentum: torch.Tensor  # ν after this step's update
    applied: torch.Tensor | None  # the term added to the prediction, None when nothing is


def edit_direction(eps_uncond: torch.Tensor, eps_edit: torch.Tensor, edit: EditSpec) -> torch.Tensor:
    """γ for one edit: relative to the uncond, signed, scaled, then its per-channel quantile tail."""
    direction = eps_edit - eps_uncond
    if edit.reverse:
        direction = -direction
    return quantile_tail(direction * edit.scale, edit.threshold)


def sega_step(
    eps_uncond: torch.Tensor,
    eps_edits: torch.Tensor,
    edits: Sequence[EditSpec],
    step: int,
    momentum_scale: float,
    momentum_beta: float,
    momentum: torch.Tensor | None = None,
) -> SegaStepResult:
    """One step. eps_uncond (…, C, H, W), eps_edits (K, …, C, H, W); `momentum` is the previous
    step's ν (None at the start). Half-precision inputs are computed in float32, and so is the
    result. Every branch is decided by integer schedules: no GPU sync."""
    dtype = compute_dtype(eps_uncond)
    eps_uncond, eps_edits = eps_uncond.to(dtype), eps_edits.to(dtype)
    if eps_edits.shape[0] != len(edits) or eps_edits.shape[1:] != eps_uncond.shape:
        raise GuidanceError(
            f"{len(edits)} edits need eps of shape (K, {tuple(eps_uncond.shape)}), got {tuple(eps_edits.shape)}"
        )
    directions = torch.zeros_like(eps_edits)
    weights = []
    for c, edit in enumerate(edits):
        if edit.cooled(step):
            weights.append(0.0)
            continue
        directions[c] = edit_direction(eps_uncond, eps_edits[c], edit)
        weights.append(max(edit.weight, 0.0))
    if momentum is None:
        momentum = torch.zeros_like(eps_uncond)
    combined = sum(w * d for w, d in zip(weights, directions, strict=True)) + momentum_scale * momentum
    new_momentum = momentum_beta * momentum + (1 - momentum_beta) * combined

    warm = [edit.warm(step) for edit in edits]
    if all(warm):
        applied = combined
    elif any(warm):
        warm_total = sum(w for w, is_warm in zip(weights, warm, strict=True) if is_warm)
        applied = torch.zeros_like(eps_uncond)
        # The authors divide 0/0 (NaN) when every warm edit is cooled down or weighs 0: add nothing.
        if warm_total > 0:
            for w, d, is_warm in zip(weights, directions, warm, strict=True):
                if is_warm:
                    applied = applied + (w / warm_total) * d
    else:
        applied = None
    return SegaStepResult(directions, weights, warm, new_momentum, applied)


class SegaEdits:
    """The SEGA edits of ONE image, as an engine AdditiveTerm; keeps that image's momentum."""

    source = "sega"

    def __init__(self, edits: Sequence[Edit], momentum_scale: float, momentum_beta: float):
        self.edits = tuple(edits)
        self.momentum_scale = float(momentum_scale)
        self.momentum_beta = float(momentum_beta)
        self.momentum: torch.Tensor | None = None
        self._specs: tuple[int, tuple[EditSpec, ...]] | None = None
        self._finite = FiniteCheck("SEGA edits")
        # An edit with scale 0 or weight 0 adds exactly 0 to E, and then so does the momentum.
        self._can_contribute = any(e.scale > 0 and e.weight > 0 for e in self.edits)

    @classmethod
    def from_settings(cls, settings: Settings) -> SegaEdits:
        return cls(settings.sega_edits, settings.sega_momentum, settings.sega_momentum_beta)

    def extra_prompts(self) -> list[str]:
        return [edit.prompt for edit in self.edits]

    def specs(self, total_steps: int) -> tuple[EditSpec, ...]:
        """The edits with warm-up and cool-down (fractions of the run) as step indices."""
        if self._specs is None or self._specs[0] != total_steps:
            specs = tuple(
                EditSpec(
                    scale=e.scale,
                    threshold=e.threshold,
                    warmup=schedule_index(e.warmup, total_steps),
                    cooldown=schedule_index(e.cooldown, total_steps),
                    reverse=e.reverse,
                    weight=e.weight,
                )
                for e in self.edits
            )
            self._specs = (total_steps, specs)
        return self._specs[1]

    def active(self, step: int, total_steps: int) -> bool:
        """True on every step whose state must advance or whose term is not zero."""
        acting = self._can_contribute and self._acting(step, total_steps)
        if not acting:
            self._finite.flush()
        return acting

    def rows_used(self, step: int, total_steps: int) -> list[bool]:
        """Per edit, whether its prediction is read at this step: a cooled-down edit's never is;
        without momentum neither is a cold one's (its γ then reaches nothing that is added)."""
        if not (self._can_contribute and self._acting(step, total_steps)):
            return [False] * len(self.edits)
        specs = self.specs(total_steps)
        if self.momentum_scale > 0:
            return [not spec.cooled(step) for spec in specs]
        return [spec.warm(step) and not spec.cooled(step) for spec in specs]

    def _acting(self, step: int, total_steps: int) -> bool:
        specs = self.specs(total_steps)
        live = [not spec.cooled(step) for spec in specs]
        if self.momentum_scale > 0:
            # the momentum builds from step 0 and is still added after every edit cooled down
            return any(live) or self.momentum is not None
        return any(is_live and spec.warm(step) for is_live, spec in zip(live, specs, strict=True))

    def term(self, image_step: ImageStep) -> torch.Tensor | None:
        eps_edits = image_step.predictions(self.source, len(self.edits), "SEGA edits")
        step, total = image_step.step, image_step.total_steps
        self._finite.watch([image_step.eps_uncond, image_step.direction, eps_edits], step, total)
        result = sega_step(
            image_step.eps_uncond,
            eps_edits,
            self.specs(total),
            step,
            self.momentum_scale,
            self.momentum_beta,
            self.momentum,
        )
        self.momentum = result.momentum
        if result.applied is None:
            return None
        return result.applied.to(image_step.eps_uncond.dtype)
