"""Records tests/data/regulation_maps_record.json: attention regulation's target maps of one whole
generation (the A1111 stand-in, the tiny test-bed UNet) as the diagnostics picture reads them.

    python -m tests.record_regulation_maps

The test (tests/test_diagnostics_regulation.py) reads only the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD = Path(__file__).resolve().parent / "data" / "regulation_maps_record.json"
PROMPT = "a red book and a gold clock"
SETTINGS = dict(enable=True, regulation_enable=True, regulation_targets="red book; gold clock", show_diagnostics=True)
FIELDS = dict(prompt=PROMPT, steps=12, width=256, height=256, seed=1)
SOURCE = (
    f"A1111 stand-in, tiny test-bed UNet (seed 0), '{PROMPT}', 256 px, 12 steps, Euler, CFG 7, seed 1; "
    "attention regulation on with targets 'red book; gold clock' (defaults otherwise)"
)


def recorded_maps() -> dict:
    """The record of the generation's one image, as its picture draws it (kept on its way to the
    panel's drawing)."""
    from guidance import diagnostics
    from tests.a1111_host import A1111StandIn, a1111_modules
    from tests.testbed.unet import make_unet

    kept, draw = [], diagnostics.render_attention_maps
    diagnostics.render_attention_maps = lambda record: kept.append(record) or draw(record)
    try:
        with a1111_modules():
            host = A1111StandIn(make_unet("tiny", seed=0))
            processed = host.generate(args=host.args(**SETTINGS), **FIELDS)
    finally:
        diagnostics.render_attention_maps = draw
    assert len(processed.images) == 2 and len(kept) == 1, "one image and its picture"
    return kept[0].as_dict()


if __name__ == "__main__":
    RECORD.write_text(json.dumps({"source": SOURCE, "attention_maps": recorded_maps()}, indent=1) + "\n")
