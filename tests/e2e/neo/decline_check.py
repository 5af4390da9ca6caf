"""Model declining in a real Forge Neo: on a non-UNet family the image is Neo's own, with our note.

    python -m tests.e2e.neo.decline_check random-anima random-flux [--port 7863] [--back random-sd15]

For each checkpoint (made by make_random_dit.py, in a folder Neo lists), through the HTTP API:
select it (Neo's own detection picks the engine), generate once without the extension and once with
concept steering and a SEGA edit on; PASS when both give a PNG, the pixels are identical and the
infotext has the extension's decline note. Then --back is selected again.
"""

from __future__ import annotations

import argparse
import io
import sys

from ..common import NOTE, PREFIX, Api, Checks, is_png, with_extension

STEERING = {"concepts_enable": True, "concepts": "red cat; wooden table", "concept_warmup": 0.0}
EDITS = {"sega_enable": True, "sega_edits": "+ sunglasses : 5"}
# the settings keys (paste-back) a declined request still writes: printed, for the reader to judge
SETTINGS = (f"{PREFIX} concept steering:", f"{PREFIX} SEGA:")
DECLINE_WORDS = "the image is generated normally"  # both of the extension's decline notes end so


def pixels(png: bytes) -> bytes:
    """The decoded RGB pixels of a PNG (its text chunks hold the infotext, which differs)."""
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def select(api: Api, name: str) -> str:
    """Makes `name` Neo's checkpoint; returns the checkpoint Neo then reports as selected."""
    api.call("/sdapi/v1/options", {"sd_model_checkpoint": name, "live_previews_enable": False})
    return api.call("/sdapi/v1/options")["sd_model_checkpoint"]


def declined(api: Api, name: str):
    def check() -> str | None:
        selected = select(api, name)
        if name not in selected:
            return f"Neo kept {selected!r}"
        plain, plain_info = api.generate()
        steered, info = api.generate(with_extension(**STEERING, **EDITS))
        print(f"    {name} without the extension: {plain_info[0]!r}", flush=True)
        print(f"    {name} with it: {info[0]!r}", flush=True)
        if not (plain and steered and is_png(plain[0]) and is_png(steered[0])):
            return "no PNG"
        kept = [c.rstrip(":") for c in SETTINGS if c in info[0]]
        print(f"    the infotext keeps the request's settings beside the note: {kept}", flush=True)
        problems = []
        if NOTE not in info[0] or DECLINE_WORDS not in info[0]:
            problems.append("no decline note")
        if pixels(plain[0]) != pixels(steered[0]):
            problems.append("pixels differ from Neo's own image")
        return "; ".join(problems) or None

    return check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--port", type=int, default=7863)
    parser.add_argument("--back", default="random-sd15", help="checkpoint to select at the end")
    args = parser.parse_args(argv)
    api, checks = Api(args.port), Checks()
    api.call("/sdapi/v1/refresh-checkpoints", {})
    for name in args.models:
        checks.run(f"{name}: declined with a note, image is Neo's own", declined(api, name))
    select(api, args.back)
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
