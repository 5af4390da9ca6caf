"""The accordion UI, built from params.py for both hosts (gradio 3.41 in A1111, Forge's gradio 4).

`build_ui` returns one component per Param in PARAMS order: that order is the script's positional
argument order for the API. Everything else built here (the header's preset summary, the Detect
button, the SEGA edit slots, a hidden echo box) is UI-only and never returned. gradio is imported
here only, so the sampling side loads without it.

Progressive disclosure comes from `Param.advanced`: per section one row with the switch and the
main controls, then a closed "Advanced" fold with the rest. The header's summary says what the
header switch does (the preset, or Custom with the ticked methods) and follows the preset and the
method switches. The settings page adds the default preset.

SEGA edit slots and the edits text box edit the same thing, the text box being the value that
counts. The events are chosen so that they cannot feed each other forever:
  slot field --input/release (user only)--> `slot_to_text` --> text box + echo box
  text box   --change-------------------->  `text_to_slots` --> slot fields + echo box
A slot field has no `change` listener, so the slots being refreshed fires nothing. `text_to_slots`
ignores a text that equals the echo (the slots wrote it, they already show it) and only updates the
fields whose value differs, so a field being typed in is left alone.
"""

from __future__ import annotations

import html
import inspect
import re
from collections.abc import Sequence
from typing import Any

from .. import params, prompts

EDIT_SLOTS = 4
DIRECTIONS = ("+", "\u2212")  # add, remove (shown as a minus sign)
SLOT_FIELDS = ("prompt", "direction") + tuple(spec.key for spec in params.EDIT_FIELDS)
_PROMPT_ELEMENT = {False: "txt2img_prompt", True: "img2img_prompt"}
_PLACEHOLDERS = {
    "concepts": "detected from the prompt",
    "regulation_targets": "default: the concepts",
    "sega_edits": "+ sunglasses : 5\n- blurry : 4",
}
DETECT_TOOLTIP = "Fill the concepts with the noun phrases of this tab's prompt (needs spaCy's English pipeline)."


# ---------------------------------------------------------------------------------------------
# The SEGA edits text box <-> the edit slots (pure functions, fired by the events)


def edit_entries(text: str | None) -> list[str]:
    """The text box's edits, one entry per line or ';' part, blanks kept in place (a slot whose prompt
    was cleared keeps its position) and trailing blanks dropped."""
    entries = [part.strip() for part in re.split(r"[\n;]", text or "")]
    while entries and not entries[-1]:
        entries.pop()
    return entries


def edit_line(prompt: str, direction: str, *numbers: float) -> str:
    """One slot's edit in the compact text form; '' for a slot without a prompt."""
    prompt = re.sub(r"[\n;]+", " ", prompt or "").strip()
    if not prompt:
        return ""
    values = {spec.key: float(n) for spec, n in zip(params.EDIT_FIELDS, numbers, strict=True)}
    edit = params.Edit(prompt=prompt, reverse=direction != DIRECTIONS[0], **values)
    return params.format_edits_text([edit])


def slot_to_text(index: int, text: str, *fields: Any) -> tuple[str, str]:
    """Slot `index` (its SLOT_FIELDS values) rewritten into line `index` of the text; other lines are
    kept as they are. Returns the new text twice: for the text box and for the echo box."""
    entries = edit_entries(text)
    entries += [""] * (index + 1 - len(entries))
    entries[index] = edit_line(*fields)
    new_text = "\n".join(edit_entries("\n".join(entries)))
    return new_text, new_text


def _slot_target(entry: str) -> tuple | None:
    """The slot values for one text entry, None when the entry is not a valid single edit."""
    try:
        edits = params.parse_edits_text(entry)
    except ValueError:
        return None
    if len(edits) != 1:
        return None
    edit = edits[0]
    direction = DIRECTIONS[1] if edit.reverse else DIRECTIONS[0]
    return (edit.prompt, direction) + tuple(getattr(edit, spec.key) for spec in params.EDIT_FIELDS)


def _same(field: str, current: Any, target: Any) -> bool:
    if field == "prompt":
        return (current or "").strip() == target
    if field == "direction":
        return (current == DIRECTIONS[1]) == (target == DIRECTIONS[1])
    try:
        return abs(float(current) - float(target)) < 1e-9
    except (TypeError, ValueError):
        return False


def text_to_slots(text: str, echo: str, *current: Any) -> list:
    """Updates for every slot field (EDIT_SLOTS x SLOT_FIELDS, slot by slot) after the text box
    changed, then the cleared echo. Unchanged fields get an empty update."""
    import gradio as gr

    width = len(SLOT_FIELDS)
    updates = [gr.update() for _ in range(EDIT_SLOTS * width)]
    if text == echo:  # written by the slots, which already show it
        return updates + [""]
    entries = edit_entries(text)
    defaults = ("", DIRECTIONS[0]) + tuple(spec.default for spec in params.EDIT_FIELDS)
    for slot in range(EDIT_SLOTS):
        now = current[slot * width : (slot + 1) * width]
        entry = entries[slot] if slot < len(entries) else ""
        if entry:
            target = _slot_target(entry)
            if target is None:  # not (yet) a valid edit: the slot stays as it is
                continue
        elif (now[0] or "").strip():
            target = defaults  # the line went away: an empty slot
        else:
            continue  # an empty slot stays as the user left it
        for offset, (field, value, wanted) in enumerate(zip(SLOT_FIELDS, now, target, strict=True)):
            if not _same(field, value, wanted):
                updates[slot * width + offset] = gr.update(value=wanted)
    return updates + [""]


# ---------------------------------------------------------------------------------------------
# Concept detection


def detect_concepts(prompt: str, concepts: str):
    """The concepts box filled from the prompt; unchanged (with a message) when that is not possible."""
    import gradio as gr

    if not (prompt or "").strip():
        return _unchanged(gr, "The prompt is empty: nothing to detect concepts from.")
    try:
        found = prompts.extract_concepts(prompt)
    except prompts.PipelineMissing as error:
        return _unchanged(gr, str(error))
    if not found:
        return _unchanged(gr, "No noun phrases found in the prompt; enter the concepts by hand.")
    if len(found) > params.MAX_CONCEPTS:
        _warn(gr, f"{len(found)} concepts found, the first {params.MAX_CONCEPTS} are kept.")
        found = found[: params.MAX_CONCEPTS]
    return prompts.format_phrases(found)


def _warn(gr, message: str) -> bool:
    warning = getattr(gr, "Warning", None)  # gradio >= 3.35 and 4
    if warning is None:
        return False
    warning(f"Semantic Fidelity: {message}")
    return True


def _unchanged(gr, message: str):
    if _warn(gr, message):
        return gr.update()
    return gr.update(placeholder=message)


def after_component(script, component, **kwargs) -> None:
    """For the Script's `after_component` hook: remembers the tab's prompt box."""
    elem_id = kwargs.get("elem_id")
    if elem_id in _PROMPT_ELEMENT.values():
        found = script.__dict__.setdefault("_sf_prompts", {})
        found[elem_id] = component


def prompt_component(script, is_img2img: bool):
    """The tab's prompt box: as the host announced it (`after_component`), else looked up among the
    blocks built so far (the prompt is created before the scripts' UI in both hosts)."""
    elem_id = _PROMPT_ELEMENT[bool(is_img2img)]
    known = getattr(script, "_sf_prompts", {}).get(elem_id)
    if known is not None:
        return known
    try:
        from gradio.context import Context
    except ImportError:  # pragma: no cover - every supported gradio has it
        return None
    root = getattr(Context, "root_block", None)
    for block in list(getattr(root, "blocks", {}).values()):
        if getattr(block, "elem_id", None) == elem_id:
            return block
    return None


# ---------------------------------------------------------------------------------------------
# Presets: the header's summary and the settings page

DEFAULT_PRESET_OPTION = "semantic_fidelity_default_preset"
SAVE_DIAGNOSTICS_OPTION = "semantic_fidelity_save_diagnostics"
SETTINGS_SECTION = ("semantic_fidelity", "Semantic Fidelity")
_SWITCH_KEYS = tuple(params.METHOD_SWITCHES.values())
_SHORT_NAMES = {"concepts": "concept steering", "sega": "SEGA edits", "scfg": "S-CFG", "regulation": "regulation"}


def preset_summary(preset: str, *switches: bool) -> str:
    """What the header switch does with this preset and these method switches (METHOD_SWITCHES order),
    in a few words for the accordion's header."""
    ticked = [method for method, on in zip(params.METHOD_SWITCHES, switches, strict=True) if on]
    if ticked:
        return "Custom: " + ", ".join(_SHORT_NAMES[m] for m in ticked)
    if preset not in params.PRESETS or preset == params.PRESET_CUSTOM:
        return "Custom: no method ticked"
    return f"{preset}: " + ", ".join(_SHORT_NAMES[m] for m in params.preset_methods(preset))


def default_preset() -> str:
    """The preset chosen on the host's settings page; the params' default without a host or setting."""
    try:
        from modules import shared
    except ImportError:
        return params.PRESET_DEFAULT
    chosen = getattr(getattr(shared, "opts", None), DEFAULT_PRESET_OPTION, None)
    return chosen if chosen in params.PRESET_NAMES else params.PRESET_DEFAULT


def add_settings() -> None:
    """The settings page's entries (`on_ui_settings`): the preset new tabs and API requests start with,
    and whether diagnostics images are saved (off)."""
    import gradio as gr
    from modules import shared

    info = shared.OptionInfo(
        params.PRESET_DEFAULT,
        "Default preset (what the header switch alone does)",
        gr.Dropdown,
        {"choices": list(params.PRESET_NAMES)},
        section=SETTINGS_SECTION,
    )
    info = info.info("used by new pages after Reload UI, and by API requests that name none")
    shared.opts.add_option(DEFAULT_PRESET_OPTION, info)
    label = "Save diagnostics images (concept similarities over the steps, S-CFG regions)"
    diagnostics = shared.OptionInfo(False, label, gr.Checkbox, {}, section=SETTINGS_SECTION)
    diagnostics = diagnostics.info(
        "the pictures that 'Show diagnostics' adds after the images, saved into the images' folder "
        "with the suffix -semantic-fidelity when the images are saved"
    )
    shared.opts.add_option(SAVE_DIAGNOSTICS_OPTION, diagnostics)


def _summary_box(script):
    import gradio as gr

    switches = [params.BY_KEY[key].default for key in _SWITCH_KEYS]
    box = gr.HTML(
        value=_summary_html(default_preset(), *switches),
        elem_id=script.elem_id("preset_summary"),
        elem_classes=["sf-summary"],
    )
    box.do_not_save_to_config = True
    return box


def _summary_html(preset: str, *switches: bool) -> str:
    return f"<span class='sf-summary-text'>{html.escape(preset_summary(preset, *switches))}</span>"


def _show_summary(components: dict, summary) -> None:
    """The header's summary follows the preset and the method switches (nothing listens to it)."""
    inputs = [components["preset"], *(components[key] for key in _SWITCH_KEYS)]
    for component in inputs:
        _listen(component, "change", _summary_html, inputs, [summary])


# ---------------------------------------------------------------------------------------------
# Building


def _component(param: params.Param, elem_id: str):
    """One gradio component for one Param, its value in the component's own form."""
    import gradio as gr

    common = dict(label=param.label, elem_id=elem_id, elem_classes=["sf-control", f"sf-{param.section}"])
    value = default_preset() if param.key == "preset" else _ui_value(param, param.default)
    if param.kind == "bool":
        component = gr.Checkbox(value=value, **common)
    elif param.kind in ("int", "float"):
        component = gr.Slider(minimum=param.minimum, maximum=param.maximum, step=param.step, value=value, **common)
    elif param.kind == "choice":
        component = gr.Dropdown(choices=list(param.choices), value=value, **common)
    elif param.kind == "edits":
        component = gr.Textbox(value=value, lines=2, max_lines=12, placeholder=_PLACEHOLDERS[param.key], **common)
    else:
        component = gr.Textbox(value=value, lines=1, placeholder=_PLACEHOLDERS.get(param.key, ""), **common)
    if param.key == "preset":
        component.do_not_save_to_config = True  # its default is the settings page's, one place
    return component


def _ui_value(param: params.Param, value: Any) -> Any:
    """params.ui_value, with the edits one per line as the text box shows them."""
    if param.kind == "edits":
        return "\n".join(params.format_edits_text([edit]) for edit in value)
    return params.ui_value(param, value)


def _listen(component, event: str, fn, inputs: list, outputs: list) -> None:
    """A light, unqueued listener without progress animation or API endpoint; on gradio 4 the last of a burst of
    events always runs (its default for user events drops those that arrive while one runs)."""
    listener = getattr(component, event)
    options: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_name": False}
    if "trigger_mode" in inspect.signature(listener).parameters:
        options["trigger_mode"] = "always_last"
    listener(fn, inputs=inputs, outputs=outputs, **options)


def _edit_slots(script, edits, components: dict) -> None:
    import gradio as gr

    echo = gr.Textbox(value="", visible=False, elem_id=script.elem_id("sega_edits_echo"))
    echo.do_not_save_to_config = True
    slots = []
    with gr.Column(elem_classes=["sf-edit-slots"]):
        for index in range(EDIT_SLOTS):
            # two lines per slot: what the edit is (prompt, direction), then its numbers in one row
            with gr.Column(elem_classes=["sf-edit-slot"]):
                with gr.Row(elem_classes=["sf-edit-slot-head"]):
                    fields = [
                        gr.Textbox(
                            label=f"Edit {index + 1}",
                            placeholder="edit prompt",
                            lines=1,
                            max_lines=1,
                            elem_id=script.elem_id(f"edit{index + 1}_prompt"),
                            elem_classes=["sf-slot-prompt"],
                        ),
                        gr.Radio(
                            choices=list(DIRECTIONS),
                            value=DIRECTIONS[0],
                            label="Add / remove",
                            elem_id=script.elem_id(f"edit{index + 1}_direction"),
                            elem_classes=["sf-slot-direction"],
                        ),
                    ]
                fields[0].webui_tooltip = "The concept this edit adds or removes; empty: no edit."
                fields[1].webui_tooltip = "+ pushes the image towards the edit prompt, \u2212 away from it."
                with gr.Row(elem_classes=["sf-edit-slot-numbers"]):
                    for spec in params.EDIT_FIELDS:
                        slider = gr.Slider(
                            minimum=spec.minimum,
                            maximum=spec.maximum,
                            step=spec.step,
                            value=spec.default,
                            label=spec.label,
                            elem_id=script.elem_id(f"edit{index + 1}_{spec.key}"),
                            elem_classes=["sf-slot-number"],
                        )
                        slider.webui_tooltip = spec.tooltip
                        fields.append(slider)
            for field in fields:
                field.do_not_save_to_config = True  # mirrors of the text box, same labels in every slot
            slots.append(fields)

    for index, fields in enumerate(slots):
        fn = _slot_writer(index)
        for field in fields:
            events = ("input", "release") if isinstance(field, gr.Slider) else ("input",)
            for event in events:
                _listen(field, event, fn, [edits, *fields], [edits, echo])
    every_field = [field for fields in slots for field in fields]
    _listen(edits, "change", text_to_slots, [edits, echo, *every_field], [*every_field, echo])
    components["_edit_slots"] = slots
    components["_edit_echo"] = echo


def _slot_writer(index: int):
    def write(text, *fields):
        return slot_to_text(index, text, *fields)

    write.__name__ = f"slot_{index + 1}_to_text"
    return write


def build_ui(script, is_img2img: bool) -> list:
    import gradio as gr

    try:  # A1111 >= 1.7 and Forge: the accordion's header checkbox is the master switch
        from modules.ui_components import InputAccordion
    except ImportError:  # pragma: no cover - older hosts
        InputAccordion = None
    components: dict[str, Any] = {}
    enable = params.BY_KEY["enable"]
    if InputAccordion is not None:
        accordion = InputAccordion(False, label=params.SECTIONS["general"], elem_id=script.elem_id("enable"))
        components["enable"] = accordion
    else:
        accordion = gr.Accordion(params.SECTIONS["general"], open=False, elem_id=script.elem_id("accordion"))
    with accordion:
        if InputAccordion is None:
            components["enable"] = _component(enable, script.elem_id("enable"))
            summary = _summary_box(script)
        else:
            with accordion.extra():  # the header says what switching on does, also while closed
                summary = _summary_box(script)
        for section in params.SECTIONS:
            section_params = [p for p in params.PARAMS if p.section == section and p.key != "enable"]
            with gr.Group(elem_id=script.elem_id(f"section_{section}"), elem_classes=["sf-section"]):
                _build_section(script, is_img2img, section, section_params, components)
    _show_summary(components, summary)
    components["_summary"] = summary
    ordered = [components[p.key] for p in params.PARAMS]
    for param, component in zip(params.PARAMS, ordered, strict=True):
        # the hosts put `webui_tooltip` into the component config and show it as the title
        component.webui_tooltip = param.tooltip
    return ordered


def _build_section(script, is_img2img: bool, section: str, section_params: Sequence, components: dict) -> None:
    """A section: its switch and main controls at first sight, everything else in a closed fold."""
    import gradio as gr

    main = [p for p in section_params if not p.advanced]
    advanced = [p for p in section_params if p.advanced]
    switches = set(params.METHOD_SWITCHES.values())
    stacked = [p for p in main if p.kind == "bool" and p.key not in switches]
    with gr.Row(elem_classes=["sf-main-row", f"sf-main-{section}"]):
        for param in sorted((p for p in main if p.key != "concepts" and p not in stacked), key=_main_order):
            components[param.key] = _component(param, script.elem_id(param.key))
        if stacked:  # the general section's checkboxes one above the other, beside the preset: one row less
            with gr.Column(elem_classes=["sf-stacked-switches"]):
                for param in stacked:
                    components[param.key] = _component(param, script.elem_id(param.key))
    if params.BY_KEY["concepts"] in main:
        _concepts_row(script, is_img2img, components)
    if not advanced:
        return
    fold_id = script.elem_id(f"advanced_{section}")
    with gr.Accordion("Advanced", open=False, elem_id=fold_id, elem_classes=["sf-advanced"]):
        if section == "sega":
            _edit_slots(script, components["sega_edits"], components)
        with gr.Row(elem_classes=["sf-controls"]):
            for param in advanced:
                components[param.key] = _component(param, script.elem_id(param.key))


def _main_order(param: params.Param) -> tuple:
    """A row's order: the switch or the preset first, text boxes last (they take the rest of the row)."""
    first = param.key in params.METHOD_SWITCHES.values() or param.key == "preset"
    return (not first, param.kind in ("str", "edits"), param.position)


def _concepts_row(script, is_img2img: bool, components: dict) -> None:
    """The concepts box with its Detect button, which reads the tab's prompt."""
    import gradio as gr

    param = params.BY_KEY["concepts"]
    with gr.Row(elem_classes=["sf-concepts-row"]):
        box = _component(param, script.elem_id(param.key))
        button = gr.Button("Detect", elem_id=script.elem_id("detect"), elem_classes=["sf-detect"], size="sm")
        button.webui_tooltip = DETECT_TOOLTIP
    components[param.key] = box
    prompt = prompt_component(script, is_img2img)
    if prompt is None:  # no prompt box to read from in this host
        button.visible = False
    else:
        button.click(detect_concepts, inputs=[prompt, box], outputs=[box], show_progress="hidden", api_name=False)
    components["_detect"] = button


# ---------------------------------------------------------------------------------------------
# Infotext paste


def _paste_reader(param: params.Param):
    """Paste target: the control's value when the infotext has Semantic Fidelity keys (missing keys
    mean default), otherwise leave the control as it is."""

    def read(fields):
        values = params.values_from_infotext(fields)
        return _ui_value(param, values[param.key]) if values else None

    return read


def infotext_fields(components: list) -> list:
    return [(c, _paste_reader(p)) for p, c in zip(params.PARAMS, components, strict=True)]
