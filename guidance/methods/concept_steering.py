"""Concept steering (ConceptDiffusion, arXiv 2312.15964), as the authors' code behaves
(shared/reference/README.md §4, METHODS.md §1).

Per step and image, with P = εp − ε∅ the prompt score and S_k = ε_k − ε∅ for each subject concept:
subjects s_k = tail(S_k); abstract a = tail(P) with each s_k's component removed one after another;
similarity |cos(P, c)| kept as history; subject guidance g_k = s_k + m·v_k, v_k ← β·v_k + (1 − β)·g_k
(every step); abstract guidance a − P. A concept's g is added when warmup < step < cooldown and
the mean similarity over the previous `window` steps (not the current one) is below its threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..engine import ImageStep, schedule_index
from ..params import Settings
from .sparsify import FiniteCheck, compute_dtype, quantile_tail


@dataclass(frozen=True)
class ConceptSchedule:
    """The parameters of one run, with warm-up and cool-down as step indices (both strict)."""

    percentile: float = 0.9
    subject_threshold: float = 0.5
    abstract_threshold: float = 0.5
    momentum_scale: float = 0.5
    momentum_beta: float = 0.5
    warmup: int = 5
    cooldown: int = 50
    window: int = 5
    abstract: bool = True  # steer the abstract concept too

    def in_window(self, step: int) -> bool:
        return self.warmup < step < self.cooldown


@dataclass
class ConceptStepResult:
    scores: torch.Tensor  # (n, C, H, W): sparsified subjects, then the abstract score when on
    similarity: torch.Tensor  # (n,) |cos(P, score)|
    momentum: torch.Tensor  # (n, C, H, W) after this step (the abstract row is never used)
    gate: torch.Tensor  # (n,) 1.0 where the concept's guidance was added
    guidance: torch.Tensor | None  # Σ gated g, before the concept scale; None outside the window


def _flat_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).flatten(start_dim=-3).sum(-1)


def concept_scores(
    prompt_score: torch.Tensor, subject_scores: torch.Tensor, percentile: float, abstract: bool
) -> torch.Tensor:
    """(K [+1], C, H, W): the subjects' quantile tails, then the abstract score: P's tail with each
    subject's component removed in turn (a sequential, not a joint, projection)."""
    subjects = quantile_tail(subject_scores, percentile)
    if not abstract:
        return subjects
    residual = quantile_tail(prompt_score, percentile)
    for subject in subjects:
        norm2 = _flat_dot(subject, subject)
        # an all-zero subject has no direction to remove (the authors' code would divide 0/0)
        coefficient = torch.where(norm2 > 0, _flat_dot(residual, subject) / norm2.clamp_min(1e-30), 0.0)
        residual = residual - coefficient * subject
    return torch.cat([subjects, residual[None]])


def abs_cosine(reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """|cos(reference, score)| over all C·H·W elements, for each score; 0 for a zero vector."""
    norms = reference.flatten().norm() * scores.flatten(start_dim=1).norm(dim=1)
    return _flat_dot(reference, scores).abs() / norms.clamp_min(1e-30)


def windowed_mean(history: Mapping[int, torch.Tensor], step: int, window: int) -> torch.Tensor | None:
    """Mean similarity over the recorded steps in [step − window, step); None when there is none."""
    recent = [history[s] for s in range(max(0, step - window), step) if s in history]
    return torch.stack(recent).mean(0) if recent else None


def held_rows(present: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows,): 1 for the subjects held at this step and for the abstract row (always held)."""
    keep = torch.ones(rows, dtype=dtype, device=present.device)
    keep[: present.shape[0]] = present.to(dtype)
    return keep


def similarity_gate(mean: torch.Tensor, schedule: ConceptSchedule, subjects: int) -> torch.Tensor:
    """1.0 for each score whose windowed mean similarity is below its threshold, else 0.0."""
    # thresholds built on the device: a tensor made from a list would be a host copy, a sync
    thresholds = torch.full_like(mean, schedule.subject_threshold)
    if schedule.abstract:
        thresholds[subjects] = schedule.abstract_threshold
    return (mean < thresholds).to(mean.dtype)


def concept_step(
    prompt_score: torch.Tensor,
    subject_scores: torch.Tensor,
    schedule: ConceptSchedule,
    step: int,
    momentum: torch.Tensor | None,
    history: Mapping[int, torch.Tensor],
    present: torch.Tensor | None = None,
) -> ConceptStepResult:
    """One step for one image. prompt_score P (C, H, W), subject_scores S (K, C, H, W); `history`
    maps earlier steps to their similarities (this step's is not added here); `present` (K,) is 1
    for the subjects the prompt's rows hold at this step: the others add nothing, take no part in
    the abstract projection and lose their momentum. No GPU sync: gates are tensors multiplied in."""
    dtype = compute_dtype(prompt_score)
    prompt_score, subject_scores = prompt_score.to(dtype), subject_scores.to(dtype)
    if present is not None:
        subject_scores = subject_scores * present.to(dtype)[:, None, None, None]
    scores = concept_scores(prompt_score, subject_scores, schedule.percentile, schedule.abstract)
    similarity = abs_cosine(prompt_score, scores)
    subjects = subject_scores.shape[0]
    if momentum is None:
        momentum = torch.zeros_like(scores)
    guidance_terms = scores + schedule.momentum_scale * momentum
    if schedule.abstract:  # the abstract term carries no momentum and points from P to a
        guidance_terms[subjects] = scores[subjects] - prompt_score
    new_momentum = schedule.momentum_beta * momentum + (1 - schedule.momentum_beta) * guidance_terms

    mean = windowed_mean(history, step, schedule.window)
    acting = schedule.in_window(step) and mean is not None
    gate = similarity_gate(mean, schedule, subjects) if acting else torch.zeros_like(similarity)
    if present is not None:
        keep = held_rows(present, scores.shape[0], dtype)
        gate, new_momentum = gate * keep, new_momentum * keep[:, None, None, None]
    guidance = (gate[:, None, None, None] * guidance_terms).sum(0) if acting else None
    return ConceptStepResult(scores, similarity, new_momentum, gate, guidance)


@dataclass
class SimilarityLog:
    """One image's per-step similarity and gate, kept as the device tensors concept steering computed
    them, only while diagnostics are on: read on the host once, after the run (`ConceptCapture`)."""

    steps: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)  # per step (2, n): similarity, gate
    total_steps: int = 0
    error: str | None = None  # why recording stopped: diagnostics never break a generation

    def add(self, step: int, total_steps: int, similarity: torch.Tensor, gate: torch.Tensor) -> None:
        """Keep one step's numbers (a stack on the device: no host read)."""
        if self.error is not None:
            return
        try:
            self.values.append(torch.stack([similarity, gate.to(similarity.dtype)]))
            self.steps.append(step)
            self.total_steps = total_steps
        except Exception as error:  # the picture is optional, the image is not
            self.error = f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class ConceptCapture:
    """What the diagnostics picture needs of one image's concept steering in one sampler run, kept
    after the run's state (momentum, history) is gone."""

    names: tuple[str, ...]  # the subjects, then "abstract" when it is steered
    thresholds: tuple[float, ...]
    abstract: bool
    warmup: int
    cooldown: int
    log: SimilarityLog

    def record(self, title: str = ""):
        """The `diagnostics.ConceptRecord`: every step's numbers read on the host in one copy."""
        from ..diagnostics import ConceptRecord

        rows = torch.stack(self.log.values).tolist() if self.log.values else []
        traces = concept_traces(self, dict(zip(self.log.steps, rows, strict=True)), self.log.total_steps)
        return ConceptRecord(traces, self.warmup, self.cooldown, title)


def concept_traces(capture: ConceptCapture, rows_by_step: Mapping[int, list], total_steps: int) -> tuple:
    """One `diagnostics.ConceptTrace` per concept from {step: [similarities, gates]}; steps without a
    row (concept steering was not asked) have no similarity and were not steered."""
    from ..diagnostics import ConceptTrace

    traces = []
    for k, name in enumerate(capture.names):
        rows = [rows_by_step.get(step) for step in range(total_steps)]
        similarity = tuple(None if row is None else row[0][k] for row in rows)
        steered = tuple(row is not None and row[1][k] > 0 for row in rows)
        abstract = capture.abstract and k == len(capture.names) - 1
        traces.append(ConceptTrace(name, similarity, capture.thresholds[k], steered, abstract))
    return tuple(traces)


@dataclass
class _ImageState:
    momentum: torch.Tensor | None = None
    history: dict[int, torch.Tensor] = field(default_factory=dict)


class ConceptSteering:
    """Concept steering of ONE image, as an engine AdditiveTerm: one extra prompt per subject
    concept; keeps that image's momentum and similarity history."""

    source = "concepts"

    def __init__(
        self,
        concepts: Sequence[str],
        concept_scale: float = 8.5,
        percentile: float = 0.9,
        subject_threshold: float = 0.5,
        abstract_threshold: float = 0.5,
        momentum_scale: float = 0.5,
        momentum_beta: float = 0.5,
        warmup: float = 0.1,
        cooldown: float = 1.0,
        window: int = 5,
        abstract: bool = True,
        presence: Callable[[int], Sequence[bool]] | None = None,
    ):
        if not concepts:
            raise ValueError("concept steering needs at least one concept")
        self.concepts = tuple(concepts)
        self.concept_scale = float(concept_scale)
        self.warmup, self.cooldown = warmup, cooldown  # fractions of the run
        self._base = ConceptSchedule(
            percentile,
            subject_threshold,
            abstract_threshold,
            momentum_scale,
            momentum_beta,
            0,
            0,
            int(window),
            abstract,
        )
        self._schedules: dict[int, ConceptSchedule] = {}
        # step → which concepts the prompt's rows hold (scheduled and alternating prompts); None: all
        self.presence = presence
        self._masks: dict[tuple, torch.Tensor] = {}
        self.state = _ImageState()
        self._finite = FiniteCheck("concept steering")
        self.log: SimilarityLog | None = None  # set when diagnostics are on; None: nothing is kept

    @classmethod
    def from_settings(
        cls, settings: Settings, concepts: Sequence[str], presence: Callable[[int], Sequence[bool]] | None = None
    ) -> ConceptSteering:
        subject_threshold, abstract_threshold = settings.concept_subject_threshold, settings.concept_abstract_threshold
        if settings.concept_auto_threshold:  # the paper's η = 1/(n+1) for n subject concepts
            subject_threshold = abstract_threshold = 1.0 / (len(concepts) + 1)
        return cls(
            concepts,
            concept_scale=settings.concept_scale,
            percentile=settings.concept_percentile,
            subject_threshold=subject_threshold,
            abstract_threshold=abstract_threshold,
            momentum_scale=settings.concept_momentum,
            momentum_beta=settings.concept_momentum_beta,
            warmup=settings.concept_warmup,
            cooldown=settings.concept_cooldown,
            window=settings.concept_window,
            abstract=settings.concept_abstract,
            presence=presence,
        )

    def present_mask(self, step: int, device) -> torch.Tensor | None:
        """(K,) 1 for the concepts held at `step`, or None when all are; one tensor per pattern and
        device, so the hot path makes no host-to-device copy after the first step of a pattern."""
        held = tuple(bool(h) for h in self.presence(step)) if self.presence is not None else ()
        if all(held):
            return None
        key = (held, device)
        if key not in self._masks:
            self._masks[key] = torch.tensor(held, dtype=torch.float32, device=device)
        return self._masks[key]

    def extra_prompts(self) -> list[str]:
        return list(self.concepts)

    def schedule(self, total_steps: int) -> ConceptSchedule:
        if total_steps not in self._schedules:
            warmup, cooldown = schedule_index(self.warmup, total_steps), schedule_index(self.cooldown, total_steps)
            self._schedules[total_steps] = replace(self._base, warmup=warmup, cooldown=cooldown)
        return self._schedules[total_steps]

    def active(self, step: int, total_steps: int) -> bool:
        """True from step 0 (history and momentum build before the warm-up ends) until the cool-down;
        False when no step of the run can add guidance, and at steps whose rows hold none of the
        concepts when there is no abstract term (nothing to add, nothing to learn: the host's CFG)."""
        schedule = self.schedule(total_steps)
        acting = self.concept_scale > 0 and step < schedule.cooldown and schedule.warmup + 1 < schedule.cooldown
        if not acting:
            self._finite.flush()
            return False
        return self._base.abstract or self.presence is None or any(self.presence(step))

    def term(self, image_step: ImageStep) -> torch.Tensor | None:
        eps_concepts = image_step.predictions(self.source, len(self.concepts), "concept steering")
        step, total = image_step.step, image_step.total_steps
        self._finite.watch([image_step.eps_uncond, image_step.direction, eps_concepts], step, total)
        dtype = compute_dtype(image_step.eps_uncond)
        result = concept_step(
            image_step.direction.to(dtype),
            eps_concepts.to(dtype) - image_step.eps_uncond.to(dtype),
            self.schedule(total),
            step,
            self.state.momentum,
            self.state.history,
            self.present_mask(step, image_step.eps_uncond.device),
        )
        self.state.momentum = result.momentum
        if self.log is not None:
            self.log.add(step, total, result.similarity, result.gate)
        history = self.state.history
        history[step] = result.similarity
        for old_step in [s for s in history if s <= step - self._base.window]:  # out of every later window
            del history[old_step]
        if result.guidance is None:
            return None
        return (self.concept_scale * result.guidance).to(image_step.eps_uncond.dtype)

    def capture(self) -> ConceptCapture | None:
        """This image's recorded numbers with what the picture needs to read them, or None when
        nothing was recorded (diagnostics off, or the run never asked for a step)."""
        if self.log is None or (not self.log.steps and self.log.error is None):
            return None
        schedule = self.schedule(max(self.log.total_steps, 1))
        names = self.concepts + (("abstract",) if schedule.abstract else ())
        thresholds = (schedule.subject_threshold,) * len(self.concepts)
        if schedule.abstract:
            thresholds += (schedule.abstract_threshold,)
        return ConceptCapture(names, thresholds, schedule.abstract, schedule.warmup, schedule.cooldown, self.log)
