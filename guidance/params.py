"""The single definition of every control of Semantic Fidelity.

Each `Param` carries everything the UI, the infotext, the X/Y/Z plot, the HTTP API and the
validation need: key, label, type, default, range, tooltip, infotext key, XYZ flag and its
position in the script's argument list. Nothing else in the extension lists parameters again.

This module is pure Python (no torch) so the UI and the API can use it cheaply.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .prompts import split_phrases

INFOTEXT_PREFIX = "Semantic Fidelity"
XYZ_PREFIX = "[Semantic Fidelity]"

# Each extra prompt is one more UNet row per image, so the lists are bounded.
MAX_CONCEPTS = 8
MAX_EDITS = 8
MAX_PHRASE_LIST_CHARS = 400
MAX_EDIT_PROMPT_CHARS = 300

SECTIONS = {
    "general": "Semantic Fidelity",
    "concepts": "Concept steering",
    "sega": "SEGA edits",
    "scfg": "S-CFG region scales",
    "regulation": "Attention regulation",
}

KINDS = ("bool", "int", "float", "str", "choice", "edits")


@dataclass(frozen=True)
class Param:
    """One control. `minimum`/`maximum` are inclusive bounds for numbers."""

    key: str
    label: str
    kind: str
    default: Any
    section: str
    tooltip: str
    infotext_name: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    xyz: bool = False
    max_length: int | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False, repr=False)
    advanced: bool = False  # shown in the method's closed "Advanced" fold, not at first sight
    position: int = -1

    @property
    def infotext_key(self) -> str:
        return f"{INFOTEXT_PREFIX} {self.infotext_name}".strip()

    @property
    def xyz_label(self) -> str:
        return f"{XYZ_PREFIX} {SECTIONS[self.section] + ': ' if self.section != 'general' else ''}{self.label}"


class InvalidSettings(ValueError):
    """Raised with every problem found, each naming the control it concerns."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"{INFOTEXT_PREFIX}: " + "; ".join(self.problems))


# ---------------------------------------------------------------------------------------------
# Phrase lists (concepts, regulation targets)


def _check_phrase_list(text: str) -> str | None:
    count = len(split_phrases(text))
    if count > MAX_CONCEPTS:
        return f"{count} phrases given, at most {MAX_CONCEPTS} are supported"
    return None


# ---------------------------------------------------------------------------------------------
# SEGA edits


def _edit_field(key, label, kind, default, minimum, maximum, step, tooltip) -> Param:
    return Param(key, label, kind, default, "sega", tooltip, f"edit {key}", minimum, maximum, step)


# The fields of one edit, in the order of the compact text form (after the prompt and sign).
# fmt: off
EDIT_FIELDS: tuple[Param, ...] = (
    _edit_field("scale", "Scale", "float", 5.0, 0.0, 50.0, 0.5,
                "How strongly the edit pushes (SEGA s_e). The paper uses 3 to 7."),
    _edit_field("threshold", "Threshold", "float", 0.9, 0.0, 0.999, 0.005,
                "Fraction of the latent left untouched, per channel (SEGA λ). 0.9 edits the "
                "strongest 10 %; 0.95 for small, local edits."),
    _edit_field("warmup", "Warm-up", "float", 0.2, 0.0, 1.0, 0.01,
                "Fraction of the run before the edit applies (diffusers: 10 of 50 steps)."),
    _edit_field("cooldown", "Cool-down", "float", 1.0, 0.0, 1.0, 0.01,
                "Fraction of the run after which the edit stops; 1 = never."),
    _edit_field("weight", "Weight", "float", 1.0, 0.0, 10.0, 0.05,
                "Relative weight of this edit among the edits."),
)
# fmt: on
EDIT_KEYS = ("prompt", "reverse") + tuple(f.key for f in EDIT_FIELDS)
_EDIT_DEFAULTS = {spec.key: spec.default for spec in EDIT_FIELDS}


@dataclass(frozen=True)
class Edit:
    """One SEGA edit. Warm-up and cool-down are fractions of the sampling run; the defaults are
    those of EDIT_FIELDS."""

    prompt: str
    reverse: bool = False
    scale: float = _EDIT_DEFAULTS["scale"]
    threshold: float = _EDIT_DEFAULTS["threshold"]
    warmup: float = _EDIT_DEFAULTS["warmup"]
    cooldown: float = _EDIT_DEFAULTS["cooldown"]
    weight: float = _EDIT_DEFAULTS["weight"]

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EDIT_KEYS}


_EDIT_NUMBER = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


def parse_edits_text(text: str) -> tuple[Edit, ...]:
    """Parse the compact form: one edit per line (or separated by ';'),
    ``[+|-] prompt [: scale [: threshold [: warm-up [: cool-down [: weight]]]]]``.

    Only trailing numeric fields count as parameters, so emphasis such as ``(smile:1.2)`` stays
    in the prompt.
    """
    edits = []
    for line in re.split(r"[\n;]", text or ""):
        line = line.strip()
        if not line:
            continue
        reverse = False
        if line[0] in "+-\u2212":
            reverse = line[0] != "+"
            line = line[1:].strip()
        pieces = line.split(":")
        numbers: list[str] = []
        while len(pieces) > 1 and len(numbers) < len(EDIT_FIELDS) and _EDIT_NUMBER.match(pieces[-1]):
            numbers.insert(0, pieces.pop())
        values: dict[str, Any] = {"prompt": ":".join(pieces).strip(), "reverse": reverse}
        for spec, number in zip(EDIT_FIELDS, numbers, strict=False):
            values[spec.key] = float(number)
        edits.append(values)
    return tuple(_coerce_edits(edits))


def format_edits_text(edits: Iterable[Edit]) -> str:
    """The inverse of `parse_edits_text`, on one line; trailing default fields are left out."""
    lines = []
    for edit in edits:
        numbers = [getattr(edit, spec.key) for spec in EDIT_FIELDS]
        defaults = [spec.default for spec in EDIT_FIELDS]
        keep = 1
        for index in range(len(numbers)):
            if numbers[index] != defaults[index]:
                keep = index + 1
        fields = " : ".join(format_number(n) for n in numbers[:keep])
        lines.append(f"{'-' if edit.reverse else '+'} {edit.prompt} : {fields}")
    return "; ".join(lines)


def _coerce_edits(value: Any) -> list[Edit]:
    """Turn API/UI input (text form, list of dicts or Edit objects) into Edit objects."""
    if isinstance(value, str):
        return list(parse_edits_text(value))
    if isinstance(value, (Edit, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of edits or the text form '+ prompt : scale'")
    edits = []
    for index, item in enumerate(value, start=1):
        if isinstance(item, Edit):
            item = item.as_dict()
        if not isinstance(item, Mapping):
            raise ValueError(f"edit {index}: expected an object with a 'prompt', got {item!r}")
        unknown = sorted(set(item) - set(EDIT_KEYS))
        if unknown:
            raise ValueError(f"edit {index}: unknown field(s) {', '.join(unknown)} (known: {', '.join(EDIT_KEYS)})")
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"edit {index}: the prompt is empty")
        prompt = prompt.strip()
        if len(prompt) > MAX_EDIT_PROMPT_CHARS:
            raise ValueError(
                f"edit {index}: the prompt has {len(prompt)} characters, at most {MAX_EDIT_PROMPT_CHARS} are allowed"
            )
        if re.search(r"[\n;]", prompt):
            raise ValueError(f"edit {index}: the prompt may not contain ';' or a line break")
        values: dict[str, Any] = {"prompt": prompt, "reverse": _coerce_bool(item.get("reverse", False))}
        for spec in EDIT_FIELDS:
            try:
                values[spec.key] = _coerce_number(spec, item.get(spec.key, spec.default))
            except ValueError as error:
                raise ValueError(f"edit {index} ({prompt}): {spec.label.lower()} {error}") from None
        if values["cooldown"] <= values["warmup"]:
            raise ValueError(
                f"edit {index} ({prompt}): cool-down {format_number(values['cooldown'])} "
                f"must be later than warm-up {format_number(values['warmup'])}"
            )
        edits.append(Edit(**values))
    if len(edits) > MAX_EDITS:
        raise ValueError(f"{len(edits)} edits given, at most {MAX_EDITS} are supported")
    return edits


# ---------------------------------------------------------------------------------------------
# The parameters, in UI order. That order is also the positional order of the API's args.


def _p(
    key,
    label,
    kind,
    default,
    section,
    infotext_name,
    tooltip,
    minimum=None,
    maximum=None,
    step=None,
    choices=(),
    xyz=None,
    max_length=None,
    check=None,
    advanced=True,
) -> Param:
    if xyz is None:  # every number gets an X/Y/Z axis by default
        xyz = kind in ("int", "float")
    return Param(
        key,
        label,
        kind,
        default,
        section,
        tooltip,
        infotext_name,
        minimum,
        maximum,
        step,
        tuple(choices),
        xyz,
        max_length,
        check,
        advanced,
    )


# ---------------------------------------------------------------------------------------------
# Presets: what the header switch alone turns on (no method ticked). Each names its methods and the
# few values it changes ("all" models, then "sdxl" on top for SDXL). None touches a control shown
# at first sight, so the strengths the user sets apply under every preset.

PRESET_CUSTOM = "Custom"
# fmt: off
PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    # S-CFG only: no extra UNet row, the benchmark's target for it is 1.10x plain CFG
    "Light": {"all": {"scfg_enable": True}},
    # the detected concepts (one row each, plus the abstract one) and S-CFG
    "Balanced": {"all": {"concepts_enable": True, "scfg_enable": True}},
    # Balanced plus attention regulation of the concepts. SDXL's last down and first up blocks
    # hold 10 transformers each (50 regulated layers against SD1.5's 5; the first of each block
    # optimises, the others apply its bias): the last down block (2 optimised, 18 applying) at
    # half the iterations
    "Strong": {
        "all": {"concepts_enable": True, "scfg_enable": True, "regulation_enable": True},
        "sdxl": {"regulation_layers": "last down", "regulation_iterations": 10},
    },
    PRESET_CUSTOM: {},
}
# fmt: on
PRESET_NAMES = tuple(PRESETS)
PRESET_DEFAULT = "Balanced"


REGULATION_LAYER_CHOICES = ("last down + first up", "last down", "first up", "all cross-attention")

# A table, one control per entry; the columns are _p's arguments in order. Labels are unique: the
# hosts keep UI defaults per label (ui-config.json). advanced=False marks what shows at first sight.
# fmt: off
_PARAM_LIST = [
    # -- general ---------------------------------------------------------------------------------
    _p("enable", "Enable Semantic Fidelity", "bool", False, "general", "",
       "Master switch. Off: the image is exactly what the WebUI makes without the extension. On "
       "with no method ticked: the preset's methods.", xyz=True, advanced=False),
    _p("apply_hires", "Apply in the hires-fix pass", "bool", True, "general", "hires",
       "Also steer the second (hires-fix) pass. Its schedules are fractions of that pass's steps.",
       xyz=True, advanced=False),
    # -- concept steering (ConceptDiffusion) ------------------------------------------------------
    _p("concepts_enable", "Concept steering", "bool", False, "concepts", "concept steering",
       "Find the concepts the model neglects and steer towards them (ConceptDiffusion). Each "
       "concept is one more UNet row per image.", xyz=True, advanced=False),
    _p("concepts", "Concepts", "str", "", "concepts", "concepts",
       "Noun phrases to watch, separated by ';' or ','. Empty: detected from the prompt.",
       xyz=True, max_length=MAX_PHRASE_LIST_CHARS, check=_check_phrase_list, advanced=False),
    _p("concept_scale", "Concept scale", "float", 8.5, "concepts", "concept scale",
       "Strength of the concept guidance, separate from CFG (authors: 8.5 at CFG 7.5).",
       0.0, 30.0, 0.5, advanced=False),
    _p("concept_subject_threshold", "Subject threshold", "float", 0.5, "concepts",
       "concept subject threshold",
       "A subject is steered while its mean similarity to the prompt's guidance stays below "
       "this (authors: 0.5).", 0.0, 1.0, 0.01),
    _p("concept_abstract_threshold", "Abstract threshold", "float", 0.5, "concepts",
       "concept abstract threshold",
       "The abstract concept (what keeps subjects apart) is steered below this similarity.",
       0.0, 1.0, 0.01),
    _p("concept_auto_threshold", "Auto threshold 1/(n+1)", "bool", False, "concepts",
       "concept auto threshold",
       "Use the paper's threshold 1/(n+1) for n concepts instead of the two thresholds above.",
       xyz=True),
    _p("concept_abstract", "Keep subjects apart", "bool", True, "concepts", "concept abstract",
       "Also steer the abstract concept: the prompt's guidance with every subject removed "
       "(one more UNet row).", xyz=True),
    _p("concept_percentile", "Concept percentile", "float", 0.9, "concepts", "concept percentile",
       "Guidance below this per-channel quantile is dropped before comparing (authors: 0.9).",
       0.0, 0.999, 0.005),
    _p("concept_momentum", "Concept momentum", "float", 0.5, "concepts", "concept momentum",
       "Momentum scale of the subject guidance (authors: 0.5).", 0.0, 1.0, 0.05),
    _p("concept_momentum_beta", "Concept momentum β", "float", 0.5, "concepts", "concept momentum beta",
       "How much momentum is kept from step to step (authors: 0.5).", 0.0, 0.99, 0.01),
    _p("concept_warmup", "Concept warm-up", "float", 0.1, "concepts", "concept warmup",
       "Fraction of the run before concepts are steered (authors: 5 of 50 steps).",
       0.0, 1.0, 0.01),
    _p("concept_cooldown", "Concept cool-down", "float", 1.0, "concepts", "concept cooldown",
       "Fraction of the run after which steering stops; 1 = never.", 0.0, 1.0, 0.01),
    _p("concept_window", "Concept window", "int", 5, "concepts", "concept window",
       "Number of previous steps whose similarity is averaged for the decision (authors: 5).",
       1, 50, 1),
    # -- SEGA edits -------------------------------------------------------------------------------
    _p("sega_enable", "SEGA edits", "bool", False, "sega", "SEGA",
       "Add or remove concepts with extra edit prompts (Semantic Guidance). Each edit is one "
       "more UNet row per image.", xyz=True, advanced=False),
    _p("sega_edits", "Edits", "edits", (), "sega", "SEGA edits",
       "One edit per line or separated by ';': '+ sunglasses : 5' adds, '- blur : 4' removes. "
       "Optional fields after the scale: threshold, warm-up, cool-down, weight.", xyz=True,
       advanced=False),
    _p("sega_momentum", "Edit momentum", "float", 0.1, "sega", "SEGA momentum",
       "Momentum scale shared by all edits (diffusers: 0.1).", 0.0, 1.0, 0.05),
    _p("sega_momentum_beta", "Edit momentum β", "float", 0.4, "sega", "SEGA momentum beta",
       "How much momentum is kept from step to step (diffusers: 0.4).", 0.0, 0.99, 0.01),
    # -- S-CFG ------------------------------------------------------------------------------------
    _p("scfg_enable", "S-CFG region scales", "bool", False, "scfg", "S-CFG",
       "Give every region of the image its own CFG scale so each part of the prompt gets an "
       "even push (S-CFG).", xyz=True, advanced=False),
    _p("scfg_rate_min", "S-CFG minimum rate", "float", 0.8, "scfg", "S-CFG rate min",
       "Lowest factor on CFG in any region (authors: 0.8).", 0.0, 5.0, 0.05),
    _p("scfg_rate_max", "S-CFG maximum rate", "float", 3.0, "scfg", "S-CFG rate max",
       "Highest factor on CFG in any region (authors: 3): how hard neglected regions are pushed.",
       0.1, 10.0, 0.05, advanced=False),
    _p("scfg_rate_cap", "Effective CFG cap", "float", 15.0, "scfg", "S-CFG cap",
       "The rate also stays at or below cap / CFG scale, so no region exceeds this CFG "
       "(authors: 15).", 1.0, 100.0, 0.5),
    _p("scfg_mask_factor", "Mask resolution factor R", "int", 4, "scfg", "S-CFG R",
       "Regions are computed at latent size / R from the attention layers at R and coarser "
       "(authors: 4). A power of two. SD1.5 has attention at 1, 2, 4 and 8; SDXL only at 2 and 4, "
       "so R = 8 there pools its factor-4 maps to the R = 8 grid (noted).", 1, 8, 1),
    _p("scfg_start", "S-CFG start", "float", 0.0, "scfg", "S-CFG start",
       "Fraction of the run where region scales begin.", 0.0, 1.0, 0.01),
    _p("scfg_end", "S-CFG end", "float", 1.0, "scfg", "S-CFG end",
       "Fraction of the run where region scales end.", 0.0, 1.0, 0.01),
    # -- attention regulation ---------------------------------------------------------------------
    _p("regulation_enable", "Attention regulation", "bool", False, "regulation", "regulation",
       "Optimise the cross-attention so that every target word gets enough attention.",
       xyz=True, advanced=False),
    _p("regulation_targets", "Target words", "str", "", "regulation", "regulation targets",
       "Words or phrases of the prompt to regulate, separated by ';' or ','. Empty: the concepts.",
       xyz=True, max_length=MAX_PHRASE_LIST_CHARS, check=_check_phrase_list, advanced=False),
    _p("regulation_layers", "Regulation layers", "choice", REGULATION_LAYER_CHOICES[0], "regulation",
       "regulation layers",
       "Cross-attention layers to regulate (paper: the last down block and the first up block). "
       "SD1.5: one layer per block, 5 in all. SDXL: 10 per block, the first of each block is "
       "optimised and the others apply its bias (5 optimised of 50). 'all cross-attention' "
       "optimises every layer (SDXL: 70, slow). Maps under 3×3 (64 px images on these blocks) are left alone, noted.",
       choices=REGULATION_LAYER_CHOICES, xyz=True),
    _p("regulation_end", "Regulation end", "float", 0.5, "regulation", "regulation end",
       "Fraction of the run after which attention is left alone (paper: 25 of 50 steps).",
       0.0, 1.0, 0.01),
    _p("regulation_iterations", "Regulation iterations", "int", 20, "regulation",
       "regulation iterations", "Gradient steps per layer and step (authors: 20).", 1, 100, 1),
    _p("regulation_step_size", "Regulation step size", "float", 100.0, "regulation",
       "regulation step size",
       "Gradient step size, multiplied by the number of rows as in the authors' code (100).",
       1.0, 1000.0, 1.0),
    _p("regulation_previous_weight", "Previous-step weight", "float", 0.25, "regulation",
       "regulation previous weight",
       "Share of the previous step's bias blended into this step's (authors: 0.25).",
       0.0, 1.0, 0.05),
    _p("regulation_decay", "Decay per step", "float", 0.99, "regulation", "regulation decay",
       "The bias is multiplied by decay^step (authors: 0.99).", 0.5, 1.0, 0.005),
    # -- added later: new controls go here, so the API's positional order only grows at the end --
    _p("preset", "Preset", "choice", PRESET_DEFAULT, "general", "preset",
       "What ticking only the header switch does: the preset's methods, its values on top. "
       "Ticking any method yourself means Custom: exactly what you ticked.",
       choices=PRESET_NAMES, xyz=True, advanced=False),
    _p("apply_detailer", "Apply in other scripts' passes (ADetailer)", "bool", False, "general", "detailer passes",
       "Also steer the inpainting passes that other scripts run with this script on, such as ADetailer's "
       "(its setting 'only selected scripts' must then include semantic_fidelity). Concepts and regulation "
       "targets are detected from that pass's own prompt.",
       xyz=True, advanced=True),
    _p("show_diagnostics", "Show diagnostics", "bool", False, "general", "diagnostics",
       "Add a diagnostics picture after the images, one per image: concept steering's similarity per "
       "concept over the steps with its threshold and the steps it steered, S-CFG's regions with "
       "their rates, and each attention-regulation target's attention map before and after its bias. "
       "Recorded only while this is on. Settings › Semantic Fidelity › Save diagnostics "
       "images also saves them to the output folder.",
       advanced=False),
]
# fmt: on

PARAMS: tuple[Param, ...] = tuple(replace(p, position=i) for i, p in enumerate(_PARAM_LIST))
BY_KEY: Mapping[str, Param] = {p.key: p for p in PARAMS}
METHOD_SWITCHES = {
    "concepts": "concepts_enable",
    "sega": "sega_enable",
    "scfg": "scfg_enable",
    "regulation": "regulation_enable",
}

# Relations between controls: (keys, test on the values, message).
_RELATIONS: tuple[tuple[tuple[str, ...], Callable[..., bool], str], ...] = (
    (
        ("concept_warmup", "concept_cooldown"),
        lambda w, c: c > w,
        "Concept steering: cool-down must be later than warm-up",
    ),
    (("scfg_rate_min", "scfg_rate_max"), lambda lo, hi: lo <= hi, "S-CFG: minimum rate must not exceed maximum rate"),
    (("scfg_start", "scfg_end"), lambda s, e: e > s, "S-CFG: end must be later than start"),
    (("scfg_mask_factor",), lambda r: r & (r - 1) == 0, "S-CFG: mask resolution factor R must be 1, 2, 4 or 8"),
)


# ---------------------------------------------------------------------------------------------
# Coercion of single values


def format_number(value: float) -> str:
    """Short, exact text for a number: 8.5, 20, 0.001."""
    if isinstance(value, bool):
        return str(value)
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _coerce_number(param: Param, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    if param.kind == "int":
        if not number.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        number = int(number)
    if param.minimum is not None and number < param.minimum:
        raise ValueError(f"{format_number(number)} is below the minimum {format_number(param.minimum)}")
    if param.maximum is not None and number > param.maximum:
        raise ValueError(f"{format_number(number)} is above the maximum {format_number(param.maximum)}")
    return number


def coerce(param: Param, value: Any) -> Any:
    """Validate and convert one value; raises ValueError with a message for the user."""
    if param.kind == "bool":
        return _coerce_bool(value)
    if param.kind in ("int", "float"):
        return _coerce_number(param, value)
    if param.kind == "str":
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        value = value.strip()
        if param.max_length is not None and len(value) > param.max_length:
            raise ValueError(f"{len(value)} characters given, at most {param.max_length} are allowed")
        problem = param.check(value) if param.check else None
        if problem:
            raise ValueError(problem)
        return value
    if param.kind == "choice":
        for choice in param.choices:
            if isinstance(value, str) and value.strip().lower() == choice.lower():
                return choice
        raise ValueError(f"{value!r} is not one of: {', '.join(param.choices)}")
    if param.kind == "edits":
        return tuple(_coerce_edits(value if value is not None else ()))
    raise AssertionError(f"unknown kind {param.kind}")


# ---------------------------------------------------------------------------------------------
# Settings: one validated value per parameter


class Settings:
    """Validated values of every parameter, read as attributes (`settings.concept_scale`)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Settings are read-only; use Settings.replace")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and other._values == self._values

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if v != BY_KEY[k].default}
        return f"Settings({changed})"

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes: Any) -> Settings:
        return build_settings({**self._values, **changes})

    def method_enabled(self, method: str) -> bool:
        return bool(self.enable and self._values[METHOD_SWITCHES[method]])

    @property
    def active_methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHOD_SWITCHES if self.method_enabled(m))


def defaults() -> Settings:
    return Settings({p.key: p.default for p in PARAMS})


def preset_values(name: str, is_sdxl: bool) -> dict[str, Any]:
    """The values preset `name` sets, for an SDXL model or another."""
    preset = PRESETS[name]
    return {**preset.get("all", {}), **(preset.get("sdxl", {}) if is_sdxl else {})}


def preset_methods(name: str) -> tuple[str, ...]:
    """The methods (METHOD_SWITCHES keys) preset `name` turns on, the same for every model."""
    values = preset_values(name, is_sdxl=False)
    return tuple(method for method, switch in METHOD_SWITCHES.items() if values.get(switch))


def resolve_preset(settings: Settings, is_sdxl: bool) -> Settings:
    """The settings a generation runs with. Header switch on and no method switch: the preset's
    values on top. A method switch on, or Custom: the settings exactly as given, marked Custom
    (the preset did nothing, so the infotext must not name it)."""
    if not settings.enable:
        return settings
    ticked = any(getattr(settings, switch) for switch in METHOD_SWITCHES.values())
    if ticked or settings.preset == PRESET_CUSTOM:
        return settings.replace(preset=PRESET_CUSTOM)
    return settings.replace(**preset_values(settings.preset, is_sdxl))


def build_settings(values: Mapping[str, Any]) -> Settings:
    """Validate named values (missing ones take their default). Raises InvalidSettings."""
    problems = []
    unknown = [key for key in values if key not in BY_KEY]
    for key in unknown:
        close = difflib.get_close_matches(str(key), BY_KEY, n=1)
        problems.append(f"unknown setting '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    result = {}
    for param in PARAMS:
        raw = values.get(param.key, param.default)
        try:
            result[param.key] = coerce(param, raw)
        except ValueError as error:
            where = param.label if param.section == "general" else f"{SECTIONS[param.section]} › {param.label}"
            problems.append(f"{where}: {error}")
    if not problems:
        for keys, holds, message in _RELATIONS:
            if not holds(*(result[k] for k in keys)):
                problems.append(message)
    if problems:
        raise InvalidSettings(problems)
    return Settings(result)


def settings_from_args(args: Sequence[Any], fallback: Mapping[str, Any] | None = None) -> Settings:
    """The script's arguments: positional in `PARAMS` order, or a dict of named keys in the first
    position. The WebUI's API fills every position it was not given with the UI default, so the
    dict form arrives followed by defaults, which are ignored. `fallback` holds values for keys
    the request leaves out (the host's default preset), before the params' own defaults."""
    fallback = dict(fallback or {})
    if args and isinstance(args[0], Mapping):
        return build_settings({**fallback, **args[0]})
    if len(args) > len(PARAMS):
        raise InvalidSettings([f"{len(args)} arguments given, at most {len(PARAMS)} are expected"])
    return build_settings({**fallback, **{param.key: value for param, value in zip(PARAMS, args, strict=False)}})


# ---------------------------------------------------------------------------------------------
# Infotext, X/Y/Z and the API schema


def _format_value(param: Param, value: Any) -> str:
    if param.kind == "edits":
        return format_edits_text(value)
    if param.kind in ("int", "float"):
        return format_number(value)
    return str(value)


def ui_value(param: Param, value: Any) -> Any:
    """A validated value in the form its UI component holds (edits as their text form)."""
    return format_edits_text(value) if param.kind == "edits" else value


def infotext_fields(settings: Settings) -> dict[str, str]:
    """Infotext entries: the master switch plus every non-default value of the general section
    and of the enabled methods, and the preset when it was applied (`resolve_preset` marks the
    others Custom). Nothing at all when the extension is off."""
    if not settings.enable:
        return {}
    fields = {BY_KEY["enable"].infotext_key: "True"}
    for param in PARAMS:
        value = getattr(settings, param.key)
        relevant = param.section == "general" or settings.method_enabled(param.section)
        changed = value != PRESET_CUSTOM if param.key == "preset" else value != param.default
        if param.key != "enable" and relevant and changed:
            fields[param.infotext_key] = _format_value(param, value)
    return fields


def values_from_infotext(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Control values for a pasted infotext. When the infotext carries the master switch every
    control is restored (missing keys take their default, as they were not written); otherwise
    nothing is changed. Values are validated; a bad one keeps its default. A run whose methods a
    preset chose comes back as that preset with no method ticked, as it was set up."""
    if BY_KEY["enable"].infotext_key not in fields:
        return {}
    values = {}
    for param in PARAMS:
        raw = fields.get(param.infotext_key, param.default)
        try:
            values[param.key] = coerce(param, raw)
        except ValueError:
            values[param.key] = param.default
    if BY_KEY["preset"].infotext_key in fields and values["preset"] != PRESET_CUSTOM:
        # the preset chose the methods (none was ticked): untick them so that it chooses again
        values.update(dict.fromkeys(METHOD_SWITCHES.values(), False))
    return values


def xyz_params() -> tuple[Param, ...]:
    return tuple(p for p in PARAMS if p.xyz)


def api_schema() -> dict[str, Any]:
    """What `GET /semantic-fidelity/v1/params` returns."""

    def describe(param: Param) -> dict[str, Any]:
        default = param.default
        if param.kind == "edits":
            default = [edit.as_dict() for edit in default]
        return {
            "key": param.key,
            "label": param.label,
            "type": param.kind,
            "default": default,
            "min": param.minimum,
            "max": param.maximum,
            "choices": list(param.choices) or None,
        }

    return {
        "params": [describe(p) for p in PARAMS],
        "edit_fields": [{"key": "prompt", "type": "str"}, {"key": "reverse", "type": "bool"}]
        + [describe(f) for f in EDIT_FIELDS],
    }
