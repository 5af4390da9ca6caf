"""What every check uses: the HTTP client, the check counter and the image/infotext expectations."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request

SCRIPT_KEY = "semantic fidelity"  # the script's title, lowercased: its alwayson_scripts key
PREFIX = "Semantic Fidelity"
NOTE = f"{PREFIX} note"

BASE = {
    "prompt": "a photo of a red cat wearing a hat on a wooden table",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 4,
    "sampler_name": "Euler",
    "scheduler": "Automatic",
    "cfg_scale": 7,
    "seed": 1,
}


class Api:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def call(self, path: str, payload: dict | None = None, timeout: float = 900) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def generate(self, extension_args=None, kind: str = "txt2img", **overrides) -> tuple[list[bytes], list[str]]:
        payload = dict(BASE, **overrides)
        if extension_args is not None:
            payload["alwayson_scripts"] = {SCRIPT_KEY: {"args": extension_args}}
        result = self.call(f"/sdapi/v1/{kind}", payload)
        images = [base64.b64decode(image) for image in result["images"]]
        return images, json.loads(result["info"])["infotexts"]

    def extension_listed(self) -> bool:
        scripts = self.call("/sdapi/v1/scripts")
        return SCRIPT_KEY in [s.lower() for s in scripts.get("txt2img", [])]


def with_extension(**values) -> list:
    return [dict({"enable": True}, **values)]


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def run(self, name: str, check) -> bool:
        start = time.time()
        try:
            problem = check()
        except Exception as error:  # one failing check never stops the others
            problem = f"{type(error).__name__}: {error}"
        seconds = time.time() - start
        if problem:
            self.failed += 1
            print(f"{name}: FAIL ({seconds:.1f}s) {problem}", flush=True)
        else:
            self.passed += 1
            print(f"{name}: PASS ({seconds:.1f}s)", flush=True)
        return not problem


def is_blank(png: bytes) -> bool:
    """One colour everywhere: what NaN latents decode to."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=2) or ()) == 1


def is_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def expect(images, infotexts, count=1, keys=(), note=None, no_note=True) -> str | None:
    if len(images) < count or not all(is_png(i) for i in images[:count]):
        return f"expected {count} PNG image(s), got {len(images)}"
    text = infotexts[0]
    missing = [key for key in keys if f"{key}:" not in text]
    if missing:
        return f"infotext lacks {missing}: {text!r}"
    if note is not None and (NOTE not in text or note.lower() not in text.lower()):
        return f"expected a note mentioning {note!r}: {text!r}"
    if note is None and no_note and NOTE in text:
        return f"unexpected note: {text!r}"
    return None


def pixels(png: bytes):
    """The decoded RGB pixels of a PNG (its bytes also carry the infotext, which differs per request)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def same_pixels(first: list[bytes], second: list[bytes]) -> bool:
    """Whether two generations decode to the same images, image by image."""
    import numpy as np

    if len(first) != len(second):
        return False
    return all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, second, strict=True))


def infotext_value(text: str, key: str) -> str | None:
    """The value of `key` in an infotext line (`key: value, …`; a value with commas comes quoted)."""
    marker = f"{key}: "
    if marker not in text:
        return None
    rest = text.split(marker, 1)[1]
    if rest.startswith('"'):
        return rest[1:].split('"', 1)[0]
    return rest.split(", ", 1)[0].split("\n", 1)[0]
