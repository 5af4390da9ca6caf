"""From validated settings and the images of one sampler run to the objects that act on it.

A host adapter calls `plan_run` once per sampler run (the hires pass is another run). It gets the
`GuidanceRun` (CFG-level methods, extra rows) and, when an attention method is on, the
`AttentionRouter` its attention hooks must call. Methods that cannot act in this run (no English
pipeline and no concept list, no token positions for regulation) are left out with a note; the
others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .engine import GuidanceRun, ImageInfo
from .params import Settings
from .prompts import PipelineMissing, split_phrases

# phrase list → {phrase: context columns} for one prompt, through the host's own tokenizer
ColumnFinder = Callable[[str, Sequence[str]], dict[str, list[int]]]
# prompt → the context columns of its end-of-text tokens (the first one of every 77-token chunk)
EosFinder = Callable[[str], list[int]]


@dataclass
class PlannedRun:
    run: GuidanceRun
    router: object | None = None  # attention_routing.AttentionRouter when an attention method is on
    notes: list[str] = field(default_factory=list)  # why a method was left out, for console and infotext
    # per image, the concepts found in its prompt when the user gave no list (shown in the infotext)
    detected_concepts: list[list[str]] = field(default_factory=list)

    @property
    def acting(self) -> bool:
        return bool(self.run.extra_rows or self.run.region_scale is not None or self.router is not None)


def _concepts_per_image(settings: Settings, images: Sequence[ImageInfo], notes: list[str]) -> list[list[str]] | None:
    from .prompts import concepts_for

    try:
        return [concepts_for(settings, image.prompt) for image in images]
    except PipelineMissing as missing:
        notes.append(str(missing))
        return None


def plan_run(
    settings: Settings,
    images: Sequence[ImageInfo],
    find_columns: ColumnFinder | None = None,
    attention_available: bool = True,
    find_eos: EosFinder | None = None,
) -> PlannedRun:
    """The run's method objects. `find_columns` maps phrases to context columns with the host's
    tokenizer (needed by attention regulation), `find_eos` the end-of-text columns regulation
    restores; `attention_available` is False where the host's model cannot be routed (then S-CFG and
    regulation are left out with a note)."""
    notes: list[str] = []
    wants = set(settings.active_methods)
    concepts: list[list[str]] = [[] for _ in images]
    needs_concepts = "concepts" in wants or ("regulation" in wants and not split_phrases(settings.regulation_targets))
    if needs_concepts:
        found = _concepts_per_image(settings, images, notes)
        if found is None:
            wants.discard("concepts")
            if not split_phrases(settings.regulation_targets):
                wants.discard("regulation")
        else:
            concepts = found
    if "concepts" in wants and not any(concepts):
        notes.append("Concept steering: no concepts found in the prompt; it is off for this image.")
        wants.discard("concepts")

    terms: list[list] = [[] for _ in images]
    if "concepts" in wants:
        from .methods.concept_steering import ConceptSteering

        for image, image_concepts in enumerate(concepts):
            if image_concepts:
                terms[image].append(ConceptSteering.from_settings(settings, image_concepts))
    if "sega" in wants and settings.sega_edits:
        from .methods.sega import SegaEdits

        for image_terms in terms:
            image_terms.append(SegaEdits.from_settings(settings))

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
    if "regulation" in attention_methods:
        regulator = _regulator(settings, images, concepts, find_columns, find_eos, notes)
    router = None
    if region_scales is not None or regulator is not None:
        from .attention_routing import AttentionRouter

        router = AttentionRouter(region_scales=region_scales, regulator=regulator)
    run = GuidanceRun(settings, images, region_scale=region_scales, terms=terms)
    detected = concepts if needs_concepts and not split_phrases(settings.concepts) and any(concepts) else []
    return PlannedRun(run=run, router=router, notes=notes, detected_concepts=detected)


def _regulator(settings, images, concepts, find_columns, find_eos, notes):
    if find_columns is None:
        notes.append("Attention regulation: the host offers no tokenizer for target positions; it is off.")
        return None
    user_targets = split_phrases(settings.regulation_targets)
    targets = []
    for image, info in enumerate(images):
        phrases = user_targets or concepts[image]
        columns = find_columns(info.prompt, phrases)
        targets.append(sorted({c for phrase_columns in columns.values() for c in phrase_columns}))
    if not any(targets):
        notes.append("Attention regulation: none of the target words is in the prompt; it is off.")
        return None
    from .methods.attention_regulation import AttentionRegulator

    eos = [find_eos(info.prompt) for info in images] if find_eos is not None else None
    return AttentionRegulator.from_settings(settings, targets, [info.seed for info in images], eos_columns=eos)
