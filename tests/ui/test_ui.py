"""The accordion UI built with real gradio 3.41.2 (A1111 1.10's version) through the real script,
loaded the way the host loads it, with the A1111 `modules` stand-in (InputAccordion included).

Run by the separate UI stage of .ci/run (its own venv with gradio); the main run does not collect
this folder. Events are proven by firing the registered functions on the built Blocks, no server."""

from __future__ import annotations

import importlib.util

import gradio as gr
import pytest
import torch
from gradio.layouts import Form

from tests.a1111_host import SCRIPT, a1111_modules

PROMPT_TEXT = "a red book and a gold clock"


@pytest.fixture(scope="module")
def script_module():
    with a1111_modules():
        from modules import shared

        shared.reset()
        spec = importlib.util.spec_from_file_location("semantic_fidelity.py", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def params(script_module):
    return script_module.params


@pytest.fixture(scope="module")
def ui(script_module):
    return script_module._ui


class Tab:
    """One tab's UI: the returned components and the Blocks they live in."""

    def __init__(self, demo, script, prompt, components):
        self.demo, self.script, self.prompt, self.components = demo, script, prompt, components

    def by_id(self, item_id: str):
        elem_id = self.script.elem_id(item_id)
        found = [b for b in self.demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
        assert len(found) == 1, elem_id
        return found[0]

    def slots(self, ui):
        return [[self.by_id(f"edit{i + 1}_{field}") for field in ui.SLOT_FIELDS] for i in range(ui.EDIT_SLOTS)]

    def dependencies(self, trigger: str, target):
        return [
            (index, dep)
            for index, dep in enumerate(self.demo.dependencies)
            if dep["trigger"] == trigger and target._id in dep["targets"]
        ]

    def fn(self, trigger: str, target):
        (index, _), *rest = self.dependencies(trigger, target)
        assert not rest
        return self.demo.fns[index].fn


def build_tabs(script_module, with_prompt: bool = True) -> dict[str, Tab]:
    """Both tabs in one Blocks as in the host: the prompt box first, then the scripts' UI."""
    tabs = {}
    with gr.Blocks() as demo:
        for tab in ("txt2img", "img2img"):
            script = script_module.SemanticFidelityScript()
            script.is_txt2img, script.is_img2img = tab == "txt2img", tab == "img2img"
            with gr.Tab(tab):
                prompt = gr.Textbox(label="Prompt", elem_id=f"{tab}_prompt") if with_prompt else None
                components = script.ui(tab == "img2img")
            tabs[tab] = Tab(demo, script, prompt, components)
    return tabs


@pytest.fixture(scope="module")
def tabs(script_module):
    return build_tabs(script_module)


@pytest.fixture(scope="module")
def tab(tabs):
    return tabs["txt2img"]


# ---------------------------------------------------------------------------------------------
# Components, tooltips, ids


def test_one_component_per_param_in_order(tabs, params):
    from modules.ui_components import InputAccordion

    for tab in tabs.values():
        assert len(tab.components) == len(params.PARAMS) == 37
        for index, (param, component) in enumerate(zip(params.PARAMS, tab.components, strict=True)):
            assert param.position == index
            if param.key == "enable":
                assert isinstance(component, InputAccordion)
                assert component.value is False
                assert component.label == component.accordion.label == "Semantic Fidelity"
            elif param.kind == "bool":
                assert type(component) is gr.Checkbox and component.value is param.default
            elif param.kind in ("int", "float"):
                assert type(component) is gr.Slider, param.key
                assert (component.minimum, component.maximum, component.step) == (
                    param.minimum,
                    param.maximum,
                    param.step,
                )
                assert component.value == param.default
            elif param.kind == "choice":
                assert type(component) is gr.Dropdown
                assert component.choices == list(param.choices) and component.value == param.default
            else:
                assert type(component) is gr.Textbox and component.value == ""
            if param.key != "enable":
                assert component.label == param.label


def test_concrete_controls(tab, params):
    by_key = dict(zip((p.key for p in params.PARAMS), tab.components, strict=True))
    scale = by_key["concept_scale"]
    assert (scale.minimum, scale.maximum, scale.step, scale.value) == (0.0, 30.0, 0.5, 8.5)
    assert by_key["regulation_layers"].choices == [
        "last down + first up",
        "last down",
        "first up",
        "all cross-attention",
    ]
    assert by_key["apply_hires"].label == "Apply in the hires-fix pass" and by_key["apply_hires"].value is True
    assert by_key["regulation_targets"].placeholder == "default: the concepts"
    assert by_key["concepts"].placeholder == "detected from the prompt"
    assert by_key["sega_edits"].lines == 2
    assert by_key["preset"].choices == ["Light", "Balanced", "Strong", "Custom"]
    # every label is distinct, so each control has its own ui-config.json entry; the preset's default is
    # the settings page's, so it stays out of ui-config.json
    labels = [c.label for c in tab.components[1:]]
    assert len(labels) == len(set(labels))
    pairs = zip(params.PARAMS, tab.components, strict=True)
    unsaved = [p.key for p, c in pairs if getattr(c, "do_not_save_to_config", False)]
    assert unsaved == ["preset"]


def test_tooltips(tabs, params, ui):
    for tab in tabs.values():
        for param, component in zip(params.PARAMS, tab.components, strict=True):
            assert component.webui_tooltip == param.tooltip and component.webui_tooltip
        for slot in tab.slots(ui):
            assert [s.webui_tooltip for s in slot[2:]] == [spec.tooltip for spec in params.EDIT_FIELDS]
            assert slot[0].webui_tooltip and slot[1].webui_tooltip
        assert tab.by_id("detect").webui_tooltip == ui.DETECT_TOOLTIP
    assert tabs["txt2img"].components[4].webui_tooltip.startswith("Strength of the concept guidance")


def test_elem_ids_unique_and_tab_specific(tabs, params):
    ids = {}
    for name, tab in tabs.items():
        ids[name] = [b.elem_id for b in tab.demo.blocks.values() if (b.elem_id or "").startswith("script_")]
    assert ids["txt2img"] and len(ids["txt2img"]) == len(ids["img2img"])
    # one Blocks holds both tabs: half of the ids are txt2img's, half img2img's, none repeated
    all_ids = ids["txt2img"]
    assert len([i for i in all_ids if i.startswith("script_txt2img_")]) * 2 == len(all_ids)
    assert len([i for i in all_ids if i.startswith("script_img2img_")]) * 2 == len(all_ids)
    assert len(all_ids) == len(set(all_ids)) > 2 * len(params.PARAMS)
    txt2img, img2img = tabs["txt2img"].components, tabs["img2img"].components
    assert txt2img[4].elem_id == "script_txt2img_semantic_fidelity_concept_scale"
    assert img2img[4].elem_id == "script_img2img_semantic_fidelity_concept_scale"
    assert txt2img[0].elem_id == "script_txt2img_semantic_fidelity_enable-checkbox"
    assert txt2img[0].accordion.elem_id == "script_txt2img_semantic_fidelity_enable"
    for a, b in zip(txt2img, img2img, strict=True):
        assert a.elem_id != b.elem_id and "txt2img" in a.elem_id and "img2img" in b.elem_id


def _children(block) -> list:
    """A block's children, with the Form boxes gradio 3.41 puts around form components dissolved."""
    found = []
    for child in block.children:
        found += _children(child) if isinstance(child, Form) else [child]
    return found


def _controls(row) -> list:
    """A row's controls in page order, with its Forms and Columns dissolved."""
    found = []
    for child in _children(row):
        found += _controls(child) if isinstance(child, gr.Column) else [child]
    return found


def test_layout_main_controls_visible_the_rest_in_closed_folds(tab, params, ui):
    accordion = tab.components[0].accordion
    groups = [child for child in accordion.children if isinstance(child, gr.Group)]
    assert [g.elem_id for g in groups] == [tab.script.elem_id(f"section_{s}") for s in params.SECTIONS]
    by_key = dict(zip((p.key for p in params.PARAMS), tab.components, strict=True))
    main_rows = {
        "general": ["preset", "apply_hires", "show_diagnostics"],
        "concepts": ["concepts_enable", "concept_scale"],
        "sega": ["sega_enable", "sega_edits"],
        "scfg": ["scfg_enable", "scfg_rate_max"],
        "regulation": ["regulation_enable", "regulation_targets"],
    }
    for group, section in zip(groups, params.SECTIONS, strict=True):
        children = _children(group)
        assert _controls(children[0]) == [by_key[key] for key in main_rows[section]], section
        folds = [c for c in children if isinstance(c, gr.Accordion)]
        advanced = [p for p in params.PARAMS if p.section == section and p.advanced]
        if not advanced:
            assert not folds
            continue
        (fold,) = folds
        assert fold is children[-1] and fold.open is False and fold.label == "Advanced"
        assert fold.elem_id == tab.script.elem_id(f"advanced_{section}")
        inside = _all_blocks(fold)
        assert all(by_key[p.key] in inside for p in advanced)
        assert not [key for key in main_rows[section] if by_key[key] in inside]
    # the general section's checkboxes stacked in one column beside the preset (one row less)
    stacked = _children(groups[0])[0].children[-1]
    assert isinstance(stacked, gr.Column) and "sf-stacked-switches" in stacked.elem_classes
    assert _children(stacked) == [by_key["apply_hires"], by_key["show_diagnostics"]]
    assert by_key["show_diagnostics"].value is False
    # the concepts box with Detect right below the concept switch, visible
    concepts_row = _children(groups[1])[1]
    assert _children(concepts_row) == [by_key["concepts"], tab.by_id("detect")]
    # SEGA: the text form visible, the slots only in its Advanced fold (one place at first sight)
    slots = tab.slots(ui)
    sega_fold = _children(groups[2])[-1]
    assert all(field in _all_blocks(sega_fold) for slot in slots for field in slot)
    assert len(slots) == 4 and all(len(slot) == 7 for slot in slots)
    assert [s.label for s in slots[0]] == [
        "Edit 1",
        "Add / remove",
        "Scale",
        "Threshold",
        "Warm-up",
        "Cool-down",
        "Weight",
    ]
    scale = slots[3][2]
    assert (scale.minimum, scale.maximum, scale.step, scale.value) == (0.0, 50.0, 0.5, 5.0)
    assert slots[3][1].choices == [("+", "+"), ("\u2212", "\u2212")] and slots[3][1].value == "+"
    assert all(field.do_not_save_to_config for slot in slots for field in slot)


def test_at_first_sight_a_few_controls(tab, params):
    """Progressive disclosure by numbers: what an opened accordion shows before any fold is opened."""
    accordion = tab.components[0].accordion
    visible = [b for b in _all_blocks(accordion, into_closed=False) if isinstance(b, gr.components.IOComponent)]
    shown = [b.label for b in visible if b.visible and not isinstance(b, (gr.HTML, gr.Button))]
    assert shown == [
        "Preset",
        "Apply in the hires-fix pass",
        "Show diagnostics",
        "Concept steering",
        "Concept scale",
        "Concepts",
        "SEGA edits",
        "Edits",
        "S-CFG region scales",
        "S-CFG maximum rate",
        "Attention regulation",
        "Target words",
    ]
    folded = [b for b in _all_blocks(accordion) if isinstance(b, gr.components.IOComponent) and b not in visible]
    assert len(folded) == 24 + 4 * 7 + 1  # the 24 other params, the four edit slots, the hidden echo


def _all_blocks(block, into_closed: bool = True) -> list:
    """Every block below `block`; with into_closed=False, none inside a closed Accordion."""
    found = []
    for child in getattr(block, "children", []):
        found.append(child)
        if into_closed or not (isinstance(child, gr.Accordion) and not child.open):
            found += _all_blocks(child, into_closed)
    return found


def test_ui_without_prompt_box_hides_detect(script_module, params):
    tabs = build_tabs(script_module, with_prompt=False)
    assert len(tabs["txt2img"].components) == len(params.PARAMS)
    assert tabs["txt2img"].by_id("detect").visible is False
    assert not tabs["txt2img"].dependencies("click", tabs["txt2img"].by_id("detect"))


# ---------------------------------------------------------------------------------------------
# Infotext paste


def _non_default_values(params) -> dict:
    values = {}
    for param in params.PARAMS:
        if param.kind == "bool":
            values[param.key] = not param.default
        elif param.kind == "int":
            values[param.key] = 8 if param.key == "scfg_mask_factor" else param.default + 1
        elif param.kind == "float":
            step = param.step
            values[param.key] = param.default + step if param.default + step <= param.maximum else param.default - step
        elif param.kind == "choice":
            values[param.key] = param.choices[2]
        elif param.key == "sega_edits":
            values[param.key] = "+ sunglasses : 6 : 0.95; - blurry : 4"
        else:
            values[param.key] = "red book; gold clock" if param.key == "concepts" else "book"
    return values


def test_paste_restores_every_control(tabs, params):
    values = _non_default_values(params)
    settings = params.resolve_preset(params.build_settings(values), is_sdxl=False)  # methods ticked: Custom
    written = params.infotext_fields(settings)
    assert len(written) == len(params.PARAMS) - 1  # every control is non-default; the preset did nothing
    # what parse_generation_parameters hands over: strings, among the host's own keys
    pasted = {"Steps": "20", "Sampler": "Euler a", **{k: str(v) for k, v in written.items()}}
    for tab in tabs.values():
        readers = dict(tab.script.infotext_fields)
        restored = {}
        for param, component in zip(params.PARAMS, tab.components, strict=True):
            restored[param.key] = readers[component](pasted)
        assert params.build_settings(restored) == settings.replace(preset="Balanced")  # and runs as Custom
        assert restored["sega_edits"] == "+ sunglasses : 6 : 0.95\n- blurry : 4"
        assert restored["concept_scale"] == 9.0 and restored["scfg_mask_factor"] == 8
        assert restored["enable"] is True and restored["apply_hires"] is False
        assert restored["regulation_layers"] == "first up"
        assert tab.script.paste_field_names == [p.infotext_key for p in params.PARAMS]


def test_paste_without_our_keys_changes_nothing(tab):
    for component, reader in tab.script.infotext_fields:
        assert reader({"Steps": "20", "CFG scale": "7"}) is None, component.elem_id


# ---------------------------------------------------------------------------------------------
# Concept detection


def test_detect_fills_concepts_from_the_tabs_prompt(tabs, ui, params):
    for name, tab in tabs.items():
        button = tab.by_id("detect")
        ((index, dep),) = tab.dependencies("click", button)
        concepts = tab.components[params.BY_KEY["concepts"].position]
        assert dep["inputs"] == [tab.prompt._id, concepts._id] and dep["outputs"] == [concepts._id]
        assert tab.prompt.elem_id == f"{name}_prompt"
        result = tab.demo.fns[index].fn(PROMPT_TEXT, "")
        extracted = ui.prompts.extract_concepts(PROMPT_TEXT)
        assert result == ui.prompts.format_phrases(extracted)
        assert result == "red book; gold clock"
        assert params.build_settings({"concepts": result}).concepts == "red book; gold clock"


def test_detect_without_pipeline_keeps_the_box(tab, ui, monkeypatch):
    def missing(prompt):
        raise ui.prompts.PipelineMissing("no English spaCy pipeline could be loaded; to detect concepts run: pip")

    shown = []
    monkeypatch.setattr(ui.prompts, "extract_concepts", missing)
    monkeypatch.setattr(gr, "Warning", lambda message: shown.append(message))
    fn = tab.fn("click", tab.by_id("detect"))
    assert fn(PROMPT_TEXT, "my own; list") == {"__type__": "generic_update"}
    assert shown == ["Semantic Fidelity: no English spaCy pipeline could be loaded; to detect concepts run: pip"]
    monkeypatch.delattr(gr, "Warning")
    update = fn(PROMPT_TEXT, "my own; list")
    assert "value" not in update and update["placeholder"].startswith("no English spaCy pipeline")


def test_detect_on_empty_prompt_and_too_many(tab, ui, monkeypatch):
    shown = []
    monkeypatch.setattr(gr, "Warning", lambda message: shown.append(message))
    fn = tab.fn("click", tab.by_id("detect"))
    assert fn("  ", "x") == {"__type__": "generic_update"} and "prompt is empty" in shown[-1]
    monkeypatch.setattr(ui.prompts, "extract_concepts", lambda prompt: [f"thing {i}" for i in range(10)])
    assert fn("many things", "") == "; ".join(f"thing {i}" for i in range(8))
    assert shown[-1] == "Semantic Fidelity: 10 concepts found, the first 8 are kept."


def test_prompt_announced_by_after_component(script_module, ui):
    script = script_module.SemanticFidelityScript()
    with gr.Blocks():
        other = gr.Textbox(elem_id="img2img_prompt")
        announced = gr.Textbox(elem_id="something_else")
    ui.after_component(script, announced, elem_id="img2img_prompt")
    ui.after_component(script, other, elem_id="img2img_neg_prompt")
    assert ui.prompt_component(script, True) is announced
    assert ui.prompt_component(script, False) is None


# ---------------------------------------------------------------------------------------------
# SEGA edit slots <-> the edits text box

FIVE = "+ sunglasses : 5\n- blurry : 4 : 0.95\n+ hat : 7 : 0.9 : 0.1 : 0.8 : 2\n- text\n+ fifth edit : 3"


class Simulator:
    """The browser's side of the events: component values, and `change` firing whenever a value
    really changes (also from a function's output, as gradio does), user events only when asked."""

    def __init__(self, tab):
        self.tab = tab
        self.values = {b._id: getattr(b, "value", None) for b in tab.demo.blocks.values()}
        self.fired = []

    def fire(self, index: int) -> None:
        queue = [index]
        while queue:
            index = queue.pop(0)
            self.fired.append(index)
            assert len(self.fired) < 50, "events keep firing each other"
            dep = self.tab.demo.dependencies[index]
            result = self.tab.demo.fns[index].fn(*(self.values[i] for i in dep["inputs"]))
            if len(dep["outputs"]) == 1:
                result = [result]
            for output, value in zip(dep["outputs"], result, strict=True):
                if isinstance(value, dict) and value.get("__type__") == "generic_update":
                    if "value" not in value:
                        continue
                    value = value["value"]
                if self.values[output] != value:
                    self.values[output] = value
                    queue += [i for i, d in enumerate(self.tab.demo.dependencies) if self._on_change(d, output)]

    @staticmethod
    def _on_change(dep, block_id) -> bool:
        return dep["trigger"] == "change" and block_id in dep["targets"]

    def user(self, component, value, event: str = "input") -> None:
        """The user sets a value: gradio fires `change` and the user event."""
        self.values[component._id] = value
        for index, dep in enumerate(self.tab.demo.dependencies):
            if component._id in dep["targets"] and dep["trigger"] in (event, "change"):
                self.fire(index)

    def slot(self, fields) -> list:
        return [self.values[f._id] for f in fields]


def test_slot_events_are_user_only_and_nothing_listens_to_refreshed_slots(tab, params, ui):
    edits = tab.components[params.BY_KEY["sega_edits"].position]
    slots = tab.slots(ui)
    slot_ids = {f._id for slot in slots for f in slot}
    for slot in slots:
        for field in slot:
            triggers = sorted(d["trigger"] for i, d in enumerate(tab.demo.dependencies) if field._id in d["targets"])
            assert triggers == (["input", "release"] if isinstance(field, gr.Slider) else ["input"])
    (_, refresh), *more = tab.dependencies("change", edits)
    assert not more
    assert set(refresh["outputs"]) - slot_ids == {tab.by_id("sega_edits_echo")._id}
    for output in refresh["outputs"]:  # what the refresh writes fires nothing
        assert not [d for d in tab.demo.dependencies if d["trigger"] == "change" and output in d["targets"]]
    assert refresh["queue"] is False and refresh["show_progress"] == "hidden" and refresh["api_name"] is False


def test_text_fills_four_slots_and_slots_rewrite_their_line(tab, params, ui):
    edits = tab.components[params.BY_KEY["sega_edits"].position]
    slots = tab.slots(ui)
    sim = Simulator(tab)
    sim.user(edits, FIVE)  # typing or a paste
    assert sim.slot(slots[0]) == ["sunglasses", "+", 5.0, 0.9, 0.2, 1.0, 1.0]
    assert sim.slot(slots[1]) == ["blurry", "\u2212", 4.0, 0.95, 0.2, 1.0, 1.0]
    assert sim.slot(slots[2]) == ["hat", "+", 7.0, 0.9, 0.1, 0.8, 2.0]
    assert sim.slot(slots[3]) == ["text", "\u2212", 5.0, 0.9, 0.2, 1.0, 1.0]
    assert len(sim.fired) == 1

    sim.fired.clear()
    sim.user(slots[1][2], 6.5)  # scale of slot 2 dragged
    text = sim.values[edits._id]
    assert text.split("\n") == [
        "+ sunglasses : 5",
        "- blurry : 6.5 : 0.95",
        "+ hat : 7 : 0.9 : 0.1 : 0.8 : 2",
        "- text",
        "+ fifth edit : 3",
    ]
    # the slot wrote the text, the text's change refreshed nothing; then the run stopped
    assert len(sim.fired) == 2
    assert sim.slot(slots[1]) == ["blurry", "\u2212", 6.5, 0.95, 0.2, 1.0, 1.0]

    sim.fired.clear()
    sim.user(slots[2][1], "\u2212")
    sim.user(slots[3][0], "text on a sign")
    sim.user(slots[0][6], 3.0, event="release")
    assert sim.values[edits._id].split("\n") == [
        "+ sunglasses : 5 : 0.9 : 0.2 : 1 : 3",
        "- blurry : 6.5 : 0.95",
        "- hat : 7 : 0.9 : 0.1 : 0.8 : 2",
        "- text on a sign : 5",
        "+ fifth edit : 3",
    ]
    assert len(sim.fired) == 6
    edits_out = params.parse_edits_text(sim.values[edits._id])
    assert [e.prompt for e in edits_out] == ["sunglasses", "blurry", "hat", "text on a sign", "fifth edit"]


def test_functions_round_trip_four_edits_and_keep_the_fifth(ui, params):
    edits = params.parse_edits_text(FIVE)
    width = len(ui.SLOT_FIELDS)
    empty = ["", "+"] + [spec.default for spec in params.EDIT_FIELDS]
    updates = ui.text_to_slots(FIVE, "", *(empty * ui.EDIT_SLOTS))
    assert updates[-1] == ""  # the echo is cleared
    slots = []
    for slot in range(ui.EDIT_SLOTS):
        values = [u.get("value", e) for u, e in zip(updates[slot * width : (slot + 1) * width], empty, strict=True)]
        slots.append(values)
    text = "+ placeholder"
    for slot, values in enumerate(slots):
        text, echo = ui.slot_to_text(slot, text if slot else "", *values)
        assert echo == text
    text = text + "\n" + FIVE.split("\n")[4]
    assert params.parse_edits_text(text) == edits
    # the refresh of a text the slots already show changes nothing, with or without the echo
    assert all("value" not in u for u in ui.text_to_slots(text, "", *(v for s in slots for v in s))[:-1])
    assert all("value" not in u for u in ui.text_to_slots(text, text, *(empty * ui.EDIT_SLOTS))[:-1])


def test_cleared_slot_keeps_the_line_positions(tab, params, ui):
    edits = tab.components[params.BY_KEY["sega_edits"].position]
    slots = tab.slots(ui)
    sim = Simulator(tab)
    sim.user(edits, FIVE)
    sim.user(slots[1][0], "")  # the user empties slot 2's prompt
    assert sim.values[edits._id].split("\n")[1:3] == ["", "+ hat : 7 : 0.9 : 0.1 : 0.8 : 2"]
    assert sim.slot(slots[2])[0] == "hat" and sim.slot(slots[1])[2] == 4.0
    assert len(params.parse_edits_text(sim.values[edits._id])) == 4
    sim.user(slots[1][0], "rain")
    assert sim.values[edits._id].split("\n")[1] == "- rain : 4 : 0.95"


def test_text_edits_refresh_the_slots(tab, params, ui):
    edits = tab.components[params.BY_KEY["sega_edits"].position]
    slots = tab.slots(ui)
    sim = Simulator(tab)
    sim.user(edits, FIVE)
    sim.user(edits, "\n".join(FIVE.split("\n")[:1] + FIVE.split("\n")[2:]))  # line 2 deleted
    assert [sim.slot(s)[0] for s in slots] == ["sunglasses", "hat", "text", "fifth edit"]
    sim.user(edits, "+ sunglasses : 5; - rain : 4")  # the infotext's one-line form
    assert [sim.slot(s)[:3] for s in slots] == [
        ["sunglasses", "+", 5.0],
        ["rain", "\u2212", 4.0],
        ["", "+", 5.0],
        ["", "+", 5.0],
    ]
    sim.user(edits, "+ sunglasses : 5\n+ half typed : 5 : 7")  # threshold 7 is out of range
    assert sim.slot(slots[1])[:3] == ["rain", "\u2212", 4.0]  # an invalid line leaves its slot alone
    sim.user(slots[0][2], 8.0)
    assert sim.values[edits._id] == "+ sunglasses : 8\n+ half typed : 5 : 7"


# ---------------------------------------------------------------------------------------------
# Presets: the header's summary, the settings page, the paste


def test_the_header_says_what_switching_on_does(tab, params, ui):
    by_key = dict(zip((p.key for p in params.PARAMS), tab.components, strict=True))
    summary = tab.by_id("preset_summary")
    assert tab.components[0].accordion_id + "-extra" in [
        getattr(b, "elem_id", None) for b in _all_blocks(tab.components[0].accordion, into_closed=False)
    ]
    assert summary.value == "<span class='sf-summary-text'>Balanced: concept steering, S-CFG</span>"
    switches = [by_key[key] for key in params.METHOD_SWITCHES.values()]
    sim = Simulator(tab)
    sim.user(by_key["preset"], "Strong", event="select")
    assert sim.values[summary._id].endswith(">Strong: concept steering, S-CFG, regulation</span>")
    sim.user(switches[1], True)  # SEGA ticked: the preset no longer applies
    assert sim.values[summary._id].endswith(">Custom: SEGA edits</span>")
    sim.user(switches[1], False)
    sim.user(by_key["preset"], "Custom", event="select")
    assert sim.values[summary._id].endswith(">Custom: no method ticked</span>")
    for component in (by_key["preset"], *switches):  # light listeners, and nothing listens to the summary
        ((_, dep),) = [(i, d) for i, d in tab.dependencies("change", component) if summary._id in d["outputs"]]
        assert dep["queue"] is False and dep["api_name"] is False
    assert not [d for d in tab.demo.dependencies if summary._id in d["targets"]]
    assert ui.preset_summary("Light", False, False, False, True) == "Custom: regulation"
    assert ui.preset_summary("no such preset", False, False, False, False) == "Custom: no method ticked"


def test_pasting_a_preset_run_restores_the_preset_with_nothing_ticked(tab, params):
    settings = params.resolve_preset(params.build_settings({"enable": True, "preset": "Strong"}), is_sdxl=True)
    written = params.infotext_fields(settings)
    assert written["Semantic Fidelity preset"] == "Strong"
    assert written["Semantic Fidelity regulation layers"] == "last down"
    readers = dict(tab.script.infotext_fields)
    restored = {p.key: readers[c](written) for p, c in zip(params.PARAMS, tab.components, strict=True)}
    assert restored["preset"] == "Strong" and restored["enable"] is True
    assert [restored[key] for key in params.METHOD_SWITCHES.values()] == [False] * 4
    assert (restored["regulation_layers"], restored["regulation_iterations"]) == ("last down", 10)


def test_settings_page_default_preset_reaches_new_tabs_and_requests(script_module, params, ui):
    from modules import processing, script_callbacks, sd_models, shared

    try:
        script_callbacks.ui_settings_callback()
        info = shared.opts.data_labels[ui.DEFAULT_PRESET_OPTION]
        assert (info.default, info.component, info.component_args) == (
            "Balanced",
            gr.Dropdown,
            {"choices": ["Light", "Balanced", "Strong", "Custom"]},
        )
        assert info.section == ("semantic_fidelity", "Semantic Fidelity") and "API requests" in info.comment_after
        diagnostics = shared.opts.data_labels[ui.SAVE_DIAGNOSTICS_OPTION]
        assert (diagnostics.default, diagnostics.component, diagnostics.section) == (False, gr.Checkbox, info.section)
        assert shared.opts.semantic_fidelity_save_diagnostics is False
        assert ui.default_preset() == "Balanced"
        shared.opts.data[ui.DEFAULT_PRESET_OPTION] = "Light"
        tab = build_tabs(script_module)["txt2img"]
        assert tab.components[params.BY_KEY["preset"].position].value == "Light"
        assert tab.by_id("preset_summary").value.endswith(">Light: S-CFG</span>")

        # an API request naming no preset gets the settings page's; the model family picks the variant
        shared.sd_model = sd_models.StandInSdModel(torch.nn.Identity())  # never sampled here
        p = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT_TEXT)
        tab.script.process(p, {"enable": True})
        assert p.extra_generation_params == {
            "Semantic Fidelity": "True",
            "Semantic Fidelity S-CFG": "True",
            "Semantic Fidelity preset": "Light",
        }
        shared.sd_model.is_sdxl = True
        tab.script.process(p, {"enable": True, "preset": "Strong"})
        assert p.extra_generation_params["Semantic Fidelity regulation iterations"] == "10"
        shared.opts.data[ui.DEFAULT_PRESET_OPTION] = "not a preset"  # a stale config.json entry
        assert ui.default_preset() == "Balanced"
    finally:
        shared.reset()
