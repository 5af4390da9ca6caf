"""The accordion UI, built from params.py for both hosts (gradio 3.41 in A1111, Forge's gradio 4).

`build_ui` returns one component per Param in PARAMS order: that order is the script's positional
argument order for the API. gradio is imported here only, so the sampling side loads without it."""

from __future__ import annotations

from .. import params


def _component(param: params.Param, elem_id: str):
    """One gradio component for one Param, its value in the component's own form."""
    import gradio as gr

    common = dict(label=param.label, elem_id=elem_id, elem_classes=["sf-control", f"sf-{param.section}"])
    value = params.ui_value(param, param.default)
    if param.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if param.kind in ("int", "float"):
        return gr.Slider(minimum=param.minimum, maximum=param.maximum, step=param.step, value=value, **common)
    if param.kind == "choice":
        return gr.Dropdown(choices=list(param.choices), value=value, **common)
    if param.kind == "edits":
        return gr.Textbox(value=value, lines=3, placeholder="+ sunglasses : 5\n- blurry : 4", **common)
    return gr.Textbox(value=value, lines=1, placeholder="detected from the prompt", **common)


def build_ui(script, is_img2img: bool) -> list:
    import gradio as gr

    try:  # A1111 >= 1.7 and Forge: the accordion's header checkbox is the master switch
        from modules.ui_components import InputAccordion
    except ImportError:  # pragma: no cover - older hosts
        InputAccordion = None
    components = {}
    enable = params.BY_KEY["enable"]
    if InputAccordion is not None:
        accordion = InputAccordion(False, label=params.SECTIONS["general"], elem_id=script.elem_id("enable"))
        components["enable"] = accordion
    else:
        accordion = gr.Accordion(params.SECTIONS["general"], open=False, elem_id=script.elem_id("accordion"))
    with accordion:
        if InputAccordion is None:
            components["enable"] = _component(enable, script.elem_id("enable"))
        for section, title in params.SECTIONS.items():
            section_params = [p for p in params.PARAMS if p.section == section and p.key != "enable"]
            with gr.Group(elem_classes=["sf-section"]):
                if section != "general":
                    gr.HTML(f"<div class='sf-section-title'>{title}</div>")
                for param in section_params:
                    components[param.key] = _component(param, script.elem_id(param.key))
    ordered = [components[p.key] for p in params.PARAMS]
    for param, component in zip(params.PARAMS, ordered, strict=True):
        # the hosts put `webui_tooltip` into the component config and show it as the title
        component.webui_tooltip = param.tooltip
    return ordered


def _paste_reader(param: params.Param):
    """Paste target: the control's value when the infotext has Semantic Fidelity keys (missing keys
    mean default), otherwise leave the control as it is."""

    def read(fields):
        values = params.values_from_infotext(fields)
        return params.ui_value(param, values[param.key]) if values else None

    return read


def infotext_fields(components: list) -> list:
    return [(c, _paste_reader(p)) for p, c in zip(params.PARAMS, components, strict=True)]
