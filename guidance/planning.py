"""From validated settings and the images of one sampler run to the objects that act on it.

A host adapter calls `plan_run` once per sampler run (the hires pass is another run). It gets the
`GuidanceRun` (CFG-level methods, extra rows) and, when an attention method is on, the
`AttentionRouter` its attention hooks must call. What each image's prompt makes the host encode at
each step comes from `prompt_model`: concepts are those of the subject rows of each step, and
regulation targets are columns of the row the host encodes at that step. Methods that cannot act in
this run (no English pipeline and no concept list, no token positions for regulation) are left out
with a note; the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .engine import GuidanceRun, ImageInfo
from .params import Settings
from .prompt_model import (
    ColumnSpan,
    Segment,
    Tokenizer,
    end_of_text_columns,
    phrase_columns,
    prompt_segments,
    token_columns,
)
from .prompts import (
    ConceptTimeline,
    PipelineMissing,
    concept_timeline,
    format_phrases,
    held_during,
    split_phrases,
)


@dataclass(frozen=True)
class RunSteps:
    """How the host schedules the prompt of this sampler run (a1111.md §6.2): `steps` of the first
    pass in denoiser calls, `hires_steps` in the hires pass, the "old scheduling" option."""

    steps: int
    hires_steps: int | None = None
    use_old_scheduling: bool = False

    @property
    def calls(self) -> int:
        """The denoiser calls the prompt is scheduled over in this run."""
        return self.hires_steps if self.hires_steps is not None else self.steps

    def segments(self, prompt: str) -> tuple[Segment, ...]:
        return prompt_segments(prompt, self.steps, self.hires_steps, self.use_old_scheduling)


def _old_scheduling() -> bool:
    """The host's "use old prompt editing timelines" option (off where there is no host)."""
    try:
        from modules import shared
    except ImportError:
        return False
    return bool(getattr(getattr(shared, "opts", None), "use_old_scheduling", False))


def run_steps(p) -> RunSteps:
    """The run's schedule steps from the processing object, as the host computes them for its
    conds: first pass `p.firstpass_steps` (denoiser calls), hires pass the hires steps times the
    first pass's steps-per-call factor (`calculate_hr_conds`)."""
    steps = int(getattr(p, "steps", 0) or 1)
    firstpass = int(getattr(p, "firstpass_steps", 0) or steps)
    old = _old_scheduling()
    if not getattr(p, "is_hr_pass", False):
        return RunSteps(firstpass, None, old)
    hires = int(getattr(p, "hr_second_pass_steps", 0) or steps) * max(1, firstpass // steps)
    return RunSteps(firstpass, hires, old)


TERM_NAMES = {"concepts": "concepts", "sega": "SEGA"}  # a term's source as the summary names it


@dataclass
class PlannedRun:
    run: GuidanceRun
    router: object | None = None  # attention_routing.AttentionRouter when an attention method is on
    notes: list[str] = field(default_factory=list)  # why a method was left out, for console and infotext
    # per image, the concepts found in its rows when the user gave no list, each with the steps it
    # holds when not all of them ("cat (steps 12–20)"): shown in the infotext
    detected_concepts: list[list[str]] = field(default_factory=list)
    hires: bool = False  # the run is a hires-fix pass

    @property
    def acting(self) -> bool:
        return bool(self.run.extra_rows or self.run.region_scale is not None or self.router is not None)

    @property
    def sampled(self) -> bool:
        """Whether the run reached the sampler: a step was guided or a UNet call was routed."""
        return self.run.steps_seen > 0 or getattr(self.router, "calls", 0) > 0

    def acted_summary(self) -> str:
        """What each method that was on did in the run, from the counters the run objects keep on
        the Python side (no device read), e.g. "concepts 17/20 steps; S-CFG 60 blocks, 12 steps"."""
        run, parts = self.run, []
        sources = dict.fromkeys(term.source for terms in run.terms for term in terms)
        for source in sources:
            name, steps = TERM_NAMES.get(source, source), run.term_steps.get(source, 0)
            parts.append(f"{name} {steps}/{run.total_steps} steps" if steps else f"{name} did not act")
        scales = run.region_scale
        if scales is not None:
            blocks, steps = scales.blocks_captured, len(scales.rate_steps)
            parts.append(f"S-CFG {blocks} blocks, {steps} steps" if blocks and steps else "S-CFG did not act")
        regulator = getattr(self.router, "regulator", None)
        if regulator is not None:
            parts.append(_regulation_summary(regulator))
        return "; ".join(parts)


def _regulation_summary(regulator) -> str:
    """ "regulation 10 steps × 5 layers" (+ the layers that applied their block leader's bias)."""
    steps, layers = len(regulator.steps_optimised), len(regulator.layers_optimised)
    if not steps:
        return "regulation did not act"
    shared = len(regulator.layers_shared)
    sharing = f" (+{shared} sharing their block's bias)" if shared else ""
    return f"regulation {steps} steps × {layers} layers{sharing}"


def _timelines(settings: Settings, segments, notes: list[str]) -> list[ConceptTimeline] | None:
    """Each image's concept timeline, or None without a pipeline (noted); the user's concepts that no
    subject row holds are noted once and not steered."""
    try:
        found = [concept_timeline(settings, image_segments) for image_segments in segments]
    except PipelineMissing as missing:
        notes.append(str(missing))
        return None
    absent = list(dict.fromkeys(concept for _, missing in found for concept in missing))
    if absent:
        notes.append(
            f"Concept steering: {format_phrases(absent)} is in no row of the prompt with a positive weight; "
            "not steered."
        )
    return [timeline for timeline, _ in found]


def plan_run(
    settings: Settings,
    images: Sequence[ImageInfo],
    steps: RunSteps,
    tokenizer: Tokenizer | None = None,
    attention_available: bool = True,
) -> PlannedRun:
    """The run's method objects. `steps` says how the host schedules the prompts, `tokenizer` is the
    host's (needed by attention regulation for target and end-of-text columns);
    `attention_available` is False where the host's model cannot be routed (then S-CFG and
    regulation are left out with a note)."""
    notes: list[str] = []
    wants = set(settings.active_methods)
    segments = [steps.segments(image.prompt) for image in images]
    timelines = _concept_plan(settings, wants, segments, notes)
    terms = _additive_terms(settings, wants, timelines)
    attention_methods = wants & {"scfg", "regulation"}
    if attention_methods and not attention_available:
        notes.append(
            "S-CFG and attention regulation need the UNet's cross-attention, which this model does not expose."
        )
        attention_methods = set()
    region_scales = regulator = None
    if "scfg" in attention_methods:
        from .methods.scfg import RegionScales

        region_scales = RegionScales.from_settings(settings, len(images))
        if settings.show_diagnostics:  # off: no log, nothing kept per step
            region_scales.region_log = {}
            region_scales.token_labels = _token_labels(segments, timelines, tokenizer)
    if "regulation" in attention_methods:
        regulator = _regulator(settings, images, segments, timelines, tokenizer, steps.calls, notes)
    router = None
    if region_scales is not None or regulator is not None:
        from .attention_routing import AttentionRouter

        router = AttentionRouter(region_scales=region_scales, regulator=regulator)
    run = GuidanceRun(settings, images, region_scale=region_scales, terms=terms)
    run.note_sources.append(regulator)
    detected = []
    if not split_phrases(settings.concepts) and any(t.concepts for t in timelines):
        detected = [timeline.describe(steps.calls) for timeline in timelines]
    hires = steps.hires_steps is not None
    return PlannedRun(run=run, router=router, notes=notes, detected_concepts=detected, hires=hires)


def _token_labels(segments, timelines, tokenizer: Tokenizer | None) -> dict[int, dict[int, str]]:
    """Per image, {token column: concept} in its first row, to name S-CFG's regions in the
    diagnostics picture ({} without a tokenizer or concepts: the picture numbers the tokens)."""
    labels: dict[int, dict[int, str]] = {}
    if tokenizer is None:
        return labels
    try:
        for image, (image_segments, timeline) in enumerate(zip(segments, timelines, strict=True)):
            if timeline.concepts:
                found = phrase_columns(image_segments[0].rows[0].text, timeline.concepts, tokenizer)
                labels[image] = {column: phrase for phrase, columns in found.items() for column in columns}
    except Exception:  # names are a nicety of the picture: numbered tokens will do
        return {}
    return labels


def _concept_plan(settings: Settings, wants: set[str], segments, notes: list[str]) -> list[ConceptTimeline]:
    """Each image's concept timeline where concepts are needed (concept steering, regulation without
    a target list), else empty ones; drops from `wants` the methods left without concepts (noted)."""
    timelines = [ConceptTimeline((), ()) for _ in segments]
    user_targets = split_phrases(settings.regulation_targets)
    if not ("concepts" in wants or ("regulation" in wants and not user_targets)):
        return timelines
    found = _timelines(settings, segments, notes)
    if found is None:
        wants.discard("concepts")
        if not user_targets:
            wants.discard("regulation")
        return timelines
    if "concepts" in wants and not any(t.concepts for t in found):
        notes.append("Concept steering: no concepts found in the prompt; it is off for this image.")
        wants.discard("concepts")
    return found


def _additive_terms(settings: Settings, wants: set[str], timelines: Sequence[ConceptTimeline]) -> list[list]:
    """Per image, the methods that add a term after CFG: concept steering (each concept steered in
    the steps its rows hold it), SEGA edits."""
    terms: list[list] = [[] for _ in timelines]
    if "concepts" in wants:
        from .methods.concept_steering import ConceptSteering, SimilarityLog

        for image, timeline in enumerate(timelines):
            if timeline.concepts:
                steering = ConceptSteering.from_settings(settings, timeline.concepts, timeline.present)
                if settings.show_diagnostics:  # off: no log, nothing kept per step
                    steering.log = SimilarityLog()
                terms[image].append(steering)
    if "sega" in wants and settings.sega_edits:
        from .methods.sega import SegaEdits

        for image_terms in terms:
            image_terms.append(SegaEdits.from_settings(settings))
    return terms


def target_spans(
    segments: Sequence[Segment], phrases: Sequence[str], tokenizer: Tokenizer
) -> tuple[list[ColumnSpan], dict[str, list[tuple[int, int]]]]:
    """Per segment, the columns of `phrases` in its first row (the row regulation edits) and that
    row's end-of-text columns; also, per phrase, the segments' step spans where the row lacks it."""
    chunks_of: dict[str, list[list[int]]] = {}
    words = {phrase: tokenizer.words(phrase) for phrase in phrases}
    spans, absent = [], {}
    for segment in segments:
        text = segment.rows[0].text
        chunks = chunks_of.setdefault(text, tokenizer.chunks(text))
        columns: set[int] = set()
        for phrase in phrases:
            found = token_columns(chunks, words[phrase])
            columns.update(found)
            if not found:
                absent.setdefault(phrase, []).append((segment.first_step, segment.last_step))
        spans.append(
            ColumnSpan(
                segment.first_step, segment.last_step, tuple(sorted(columns)), tuple(end_of_text_columns(chunks))
            )
        )
    return spans, absent


def _regulator(settings, images, segments, timelines, tokenizer, calls, notes):
    if tokenizer is None:
        notes.append("Attention regulation: the host offers no tokenizer for target positions; it is off.")
        return None
    user_targets = split_phrases(settings.regulation_targets)
    spans, absent = [], {}
    for image_segments, timeline in zip(segments, timelines, strict=True):
        image_spans, image_absent = target_spans(image_segments, user_targets or timeline.concepts, tokenizer)
        spans.append(image_spans)
        for phrase, steps in image_absent.items():
            absent.setdefault(phrase, []).extend(steps)
    if not any(span.columns for image_spans in spans for span in image_spans):
        notes.append("Attention regulation: none of the target words is in the prompt's first row; it is off.")
        return None
    if absent:
        notes.append(_absent_targets_note(absent, calls))
    from .methods.attention_regulation import AttentionRegulator

    first = [image_spans[0] for image_spans in spans]
    targets, eos = [list(span.columns) for span in first], [list(span.end_of_text) for span in first]
    regulator = AttentionRegulator.from_settings(
        settings, targets, [i.seed for i in images], eos_columns=eos, spans=spans
    )
    if settings.show_diagnostics:  # off: no log, nothing kept per step
        regulator.map_log = {}
        regulator.target_labels = _target_labels(segments, user_targets or None, timelines, tokenizer)
    return regulator


def _target_labels(segments, phrases, timelines, tokenizer: Tokenizer) -> list[list[dict[int, str]]]:
    """Per image and segment, {target column: phrase} in the segment's first row, to name the targets
    in the diagnostics picture (`phrases`, else the image's concepts); [] where naming fails."""
    labels = []
    for image_segments, timeline in zip(segments, timelines, strict=True):
        try:
            found = [phrase_columns(s.rows[0].text, phrases or timeline.concepts, tokenizer) for s in image_segments]
        except Exception:  # names are a nicety of the picture: numbered tokens will do
            found = []
        labels.append([{c: phrase for phrase, columns in f.items() for c in columns} for f in found])
    return labels


def _absent_targets_note(absent: dict[str, list[tuple[int, int]]], calls: int) -> str:
    """One note naming the targets the first row lacks, and when."""
    described = [held_during(phrase, steps, calls) for phrase, steps in absent.items()]
    return f"Attention regulation: {format_phrases(described)} not in the first conditioning row; not regulated there."
