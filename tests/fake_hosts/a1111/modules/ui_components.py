"""`modules.ui_components` (a1111.md §1.5): only `InputAccordion`, written from the description there.

The accordion's value is a hidden checkbox (the component scripts return), and the checkbox also owns
a `gr.Accordion` that holds the controls; `with accordion:` builds inside that accordion."""

from __future__ import annotations

import itertools

import gradio as gr

_ids = itertools.count()


class InputAccordion(gr.Checkbox):
    """A hidden checkbox (open/enabled) together with the accordion it controls."""

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or f"input-accordion-{next(_ids)}"
        checkbox_kwargs = {**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False}
        super().__init__(value, **checkbox_kwargs)
        accordion_kwargs = {
            "label": kwargs.get("label", "Accordion"),
            "elem_id": self.accordion_id,
            "elem_classes": ["input-accordion"],
            "open": value,
        }
        self.accordion = gr.Accordion(**accordion_kwargs)

    def extra(self):
        """A column shown in the accordion's header."""
        return gr.Column(elem_id=f"{self.accordion_id}-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
