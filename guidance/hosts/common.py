"""What both host adapters share: the per-generation state kept on the processing object, one-time
reports (console and infotext) and the images of the current batch."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..engine import GuidanceError, ImageInfo
from ..params import INFOTEXT_PREFIX, Settings
from ..prompts import format_phrases

STATE_ATTRIBUTE = "semantic_fidelity_state"
NOTE_KEY = f"{INFOTEXT_PREFIX} note"
DETECTED_KEY = f"{INFOTEXT_PREFIX} detected concepts"
ACTED_KEY = f"{INFOTEXT_PREFIX} acted"
REFINER_NOTE = (
    "the refiner took over at step {step} of {total}; Semantic Fidelity steered the steps before it only "
    "(its extra prompts and attention routing belong to the first model)."
)
NONFINITE_NOTE = (
    "attention regulation or S-CFG gave non-finite values (NaN/inf) at some layers; those values "
    "were replaced by the host's plain attention and CFG."
)


@dataclass
class GenerationState:
    """Lives on `p` for one generation (all batches and passes), so nothing global is kept."""

    settings: Settings | None
    reported: list[str] = field(default_factory=list)
    printed: list[str] = field(default_factory=list)  # console-only messages (`console`)
    failed: bool = False  # an error inside a hook: host CFG for the rest of this generation
    active: object | None = None  # the host adapter's patches for the sampler run in progress
    # with "Show diagnostics" on: what each finished sampler run recorded, drawn in postprocess
    diagnostics: list[PassCapture] = field(default_factory=list)


@dataclass(frozen=True)
class PassCapture:
    """One image's recorded numbers from one sampler run (first or hires pass), for its picture."""

    image: int  # index among the generation's images (batch after batch)
    hires: bool
    concepts: object | None = None  # methods.concept_steering.ConceptCapture
    regions: object | None = None  # methods.scfg.RegionCapture
    attention: object | None = None  # methods.attention_regulation.AttentionMapCapture


def attach_state(p, settings: Settings | None) -> GenerationState:
    state = GenerationState(settings)
    setattr(p, STATE_ATTRIBUTE, state)
    return state


def state_of(p) -> GenerationState | None:
    return getattr(p, STATE_ATTRIBUTE, None)


def _first_time(p, message: str, seen: str) -> bool:
    """Whether `message` is new for this generation in the state's list `seen` (then it is added)."""
    state = state_of(p)
    if state is None:
        return True
    messages = getattr(state, seen)
    if message in messages:
        return False
    messages.append(message)
    return True


def report(p, message: str) -> None:
    """Print `message` once per generation and put it in the images' infotext."""
    if not _first_time(p, message, "reported"):
        return
    print(f"Semantic Fidelity: {message}", file=sys.stderr)
    extra = getattr(p, "extra_generation_params", None)
    if extra is not None:
        state = state_of(p)
        extra[NOTE_KEY] = " | ".join(state.reported if state is not None else [message])


def console(p, message: str) -> None:
    """Print `message` once per generation, without an infotext entry: how we composed, not what acted."""
    if _first_time(p, message, "printed"):
        print(f"Semantic Fidelity: {message}", file=sys.stderr)


def record_plan(p, planned) -> None:
    """What the plan of a sampler run tells the user: its notes, and the concepts found in the prompt
    when no list was given (those of the batch's first image that has any: the infotext holds one
    value for the batch)."""
    for note in planned.notes:
        report(p, note)
    extra = getattr(p, "extra_generation_params", None)
    detected = next((found for found in planned.detected_concepts if found), None)
    if extra is not None and detected:
        extra[DETECTED_KEY] = format_phrases(detected)


def record_run(p, planned) -> None:
    """What both adapters' finish records after a sampler run: what acted, then the diagnostics."""
    record_acted(p, planned)
    keep_diagnostics(p, planned)


def record_acted(p, planned) -> None:
    """After a sampler run (the adapter's finish): the notes its methods made during the run, and
    what each method did (`PlannedRun.acted_summary`) under one infotext key; a hires pass's summary
    is appended as "; hires: …". A run that never sampled (the hires pass's hook runs twice in
    Forge) adds no summary."""
    for note in planned.run.take_notes():
        report(p, note)
    extra = getattr(p, "extra_generation_params", None)
    if extra is None or not planned.sampled:
        return
    summary = planned.acted_summary()
    if planned.hires:
        summary = f"{extra[ACTED_KEY]}; hires: {summary}" if extra.get(ACTED_KEY) else f"hires: {summary}"
    extra[ACTED_KEY] = summary


DIAGNOSTICS_NOTE = "diagnostics: {error}; the images are unchanged, without their diagnostics picture."


def keep_diagnostics(p, planned) -> None:
    """After a sampler run (the adapter's finish), with "Show diagnostics" on: each image's recorded
    numbers, kept on the generation's state until postprocess draws them. The device tensors are
    only moved here; they are read on the host when drawn. Never raises: a failure is one note."""
    state = state_of(p)
    if state is None or not getattr(planned.run.settings, "show_diagnostics", False):
        return
    try:
        batch_start = int(getattr(p, "iteration", 0)) * len(planned.run.images)  # every batch has batch_size images
        state.diagnostics += pass_captures(planned, batch_start)
    except Exception as error:
        report(p, DIAGNOSTICS_NOTE.format(error=f"{type(error).__name__}: {error}"))


def concept_capture(terms) -> object | None:
    """What concept steering recorded among one image's terms (SEGA records nothing), or None."""
    for term in terms:
        capture = getattr(term, "capture", None)
        recorded = capture() if capture is not None else None
        if recorded is not None:
            return recorded
    return None


def pass_captures(planned, first_image: int) -> list[PassCapture]:
    """Per image of the run, what its methods recorded (images whose methods recorded nothing are left out)."""
    captures = []
    regions = getattr(planned.run.region_scale, "region_capture", None)
    maps = getattr(getattr(planned.router, "regulator", None), "map_capture", None)
    for image, terms in enumerate(planned.run.terms):
        concepts = concept_capture(terms)
        region = regions(image) if regions is not None else None
        attention = maps(image) if maps is not None else None
        if concepts is not None or region is not None or attention is not None:
            captures.append(PassCapture(first_image + image, planned.hires, concepts, region, attention))
    return captures


def _tensors_of(encoded) -> list:
    """The tensors of one prompt's encoding: a tensor, SDXL's dict, A1111's schedule list of
    `ScheduledPromptConditioning` (their `cond`)."""
    if isinstance(encoded, dict):
        return [t for value in encoded.values() for t in _tensors_of(value)]
    if isinstance(encoded, (list, tuple)):
        return [t for value in encoded for t in _tensors_of(value)]
    if hasattr(encoded, "cond"):
        return _tensors_of(encoded.cond)
    return [encoded] if hasattr(encoded, "isfinite") else []


def check_encoded(texts, encoded) -> None:
    """Raises GuidanceError naming the extra prompts whose encoding holds NaN or inf (a text encoder
    overflowing in half precision, say), before their rows reach the UNet. Reads the device once per
    pass, at preparation: never per step."""
    flags = [torch.stack([t.isfinite().all() for t in _tensors_of(e)]).all() for e in encoded]
    finite = torch.stack(flags).tolist() if flags else []
    bad = [text for text, ok in zip(texts, finite, strict=True) if not ok]
    if bad:
        quoted = ", ".join(repr(text) for text in bad)
        raise GuidanceError(f"the text encoder returned NaN or inf for the extra prompt(s) {quoted}")


def batch_images(p, prompts=None, seeds=None) -> list[ImageInfo]:
    """The images of the batch being sampled: `p.prompts`/`p.seeds` are the current batch's (the
    hires pass samples the same images; `p.hr_prompts` holds its prompts)."""
    prompts = list(prompts if prompts is not None else getattr(p, "prompts", None) or [p.prompt])
    seeds = list(seeds if seeds is not None else getattr(p, "seeds", None) or [getattr(p, "seed", 0)])
    if len(seeds) < len(prompts):
        seeds += [seeds[-1]] * (len(prompts) - len(seeds))
    return [ImageInfo(prompt=str(prompt), seed=int(seed)) for prompt, seed in zip(prompts, seeds, strict=False)]


def is_detailer_pass(p) -> bool:
    """A pass another script runs through its own processing object with our script on: ADetailer
    marks its inpainting passes `_ad_inner`."""
    return bool(getattr(p, "_ad_inner", False))


def pass_is_wanted(p, settings: Settings) -> bool:
    """Base passes always; the hires pass with 'Apply in the hires-fix pass'; other scripts' passes
    (ADetailer) with 'Apply in other scripts' passes'."""
    if is_detailer_pass(p):
        return settings.apply_detailer
    return settings.apply_hires or not getattr(p, "is_hr_pass", False)


def settings_for_pass(p, state: GenerationState, decline_reason) -> Settings | None:
    """The settings this sampler pass runs with, or None when the pass is left to the host: the
    hires pass with its switch off, or a model the methods cannot act on (`decline_reason(p)`
    says why; reported once)."""
    if not pass_is_wanted(p, state.settings):
        return None
    reason = decline_reason(p)
    if reason is not None:
        report(p, reason)
        return None
    if is_detailer_pass(p):  # the pass's own prompt (a face, a hand) decides what is steered; the
        # other script owns that pass's images, so no diagnostics picture is added to them
        return state.settings.replace(concepts="", regulation_targets="", show_diagnostics=False)
    return state.settings
