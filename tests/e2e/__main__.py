"""End-to-end checks of Semantic Fidelity in a real WebUI, through its HTTP API.

    python -m tests.e2e --host forge|a1111 [--port N] [--no-baseline-restart]

The host table says how to link the extension into the host and restart it (`link`, `unlink`,
`restart` commands); a host is added by adding a row. The run:
1. unlinks the extension, restarts the host and takes the baseline PNGs without it;
2. links this checkout, restarts, and checks every method alone and together, hires fix, img2img,
   batch 2, the dict-form API, bad values, disabled ⇒ byte-identical to the baseline, and 20 mixed
   requests followed by a disabled one that must still be byte-identical.
One line per check (name, PASS/FAIL, seconds), then `N passed, M failed`; exit status 1 on failure.
Harnesses: ../shared/tools/forge-e2e and ../shared/tools/a1111-e2e (`SF_FORGE_HARNESS`,
`SF_A1111_HARNESS` override their paths).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = "semantic-fidelity"
SCRIPT_KEY = "semantic fidelity"  # the script's title, lowercased
PREFIX = "Semantic Fidelity"
NOTE = f"{PREFIX} note"
FORGE_HARNESS = os.environ.get("SF_FORGE_HARNESS", str(ROOT.parent / "shared/tools/forge-e2e/forge_e2e.sh"))
A1111_HARNESS = os.environ.get("SF_A1111_HARNESS", str(ROOT.parent / "shared/tools/a1111-e2e/a1111_e2e.sh"))

HOSTS = {
    "forge": {
        "port": 7861,
        "link": ["bash", FORGE_HARNESS, "link-ext", str(ROOT), NAME],
        "unlink": ["bash", FORGE_HARNESS, "unlink-ext", NAME],
        "restart": ["bash", FORGE_HARNESS, "restart"],
        # Forge's API crashes in the hires pass without this, and runs it without uncond at hr_cfg 1
        "hires_extra": {"hr_additional_modules": ["Use same choices"], "hr_cfg": 7},
    },
    "a1111": {
        "port": 7862,
        "link": ["bash", A1111_HARNESS, "link-ext", str(ROOT), NAME],
        "unlink": ["bash", A1111_HARNESS, "unlink-ext", NAME],
        "restart": ["bash", A1111_HARNESS, "restart"],
        "hires_extra": {},
    },
}

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
METHODS = {
    "concepts": {"concepts_enable": True, "concepts": "red cat; wooden table", "concept_warmup": 0.0},
    "sega": {"sega_enable": True, "sega_edits": "+ sunglasses : 5"},
    "scfg": {"scfg_enable": True},
    "regulation": {"regulation_enable": True, "regulation_targets": "red cat", "regulation_iterations": 2},
}
INFOTEXT_KEYS = {
    "concepts": f"{PREFIX} concept steering",
    "sega": f"{PREFIX} SEGA",
    "scfg": f"{PREFIX} S-CFG",
    "regulation": f"{PREFIX} regulation",
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


def with_extension(**values) -> list:
    return [dict({"enable": True}, **values)]


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def run(self, name: str, check) -> None:
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


def _is_blank(png: bytes) -> bool:
    """One colour everywhere: what NaN latents decode to."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=2) or ()) == 1


def _is_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def _expect(images, infotexts, count=1, keys=(), note=None, no_note=True) -> str | None:
    if len(images) < count or not all(_is_png(i) for i in images[:count]):
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


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=sorted(HOSTS), required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--no-baseline-restart", action="store_true", help="the host already runs without the extension"
    )
    args = parser.parse_args(argv)
    host = HOSTS[args.host]
    api = Api(args.port or host["port"])
    checks = Checks()
    baseline: dict[str, bytes] = {}

    def take_baseline():
        if not args.no_baseline_restart:
            _run(host["unlink"])
            _run(host["restart"])
        scripts = api.call("/sdapi/v1/scripts")
        if SCRIPT_KEY in [s.lower() for s in scripts.get("txt2img", [])]:
            return "the extension is still loaded"
        baseline["txt2img"] = api.generate()[0][0]
        return None

    def link():
        _run(host["link"])
        _run(host["restart"])
        scripts = api.call("/sdapi/v1/scripts")
        if SCRIPT_KEY not in [s.lower() for s in scripts.get("txt2img", [])]:
            return f"not listed in /sdapi/v1/scripts: {scripts.get('txt2img')}"
        return None

    def identical(extension_args):
        def check():
            images, _ = api.generate(extension_args)
            return None if images[0] == baseline.get("txt2img") else "PNG differs from the baseline"

        return check

    def method(names):
        def check():
            values = {}
            for name in names:
                values.update(METHODS[name])
            images, infotexts = api.generate(with_extension(**values))
            return _expect(images, infotexts, keys=[f"{PREFIX}"] + [INFOTEXT_KEYS[n] for n in names])

        return check

    def hires():
        images, infotexts = api.generate(
            with_extension(**METHODS["sega"], **METHODS["scfg"]),
            enable_hr=True,
            hr_scale=2,
            hr_upscaler="Latent",
            hr_second_pass_steps=2,
            denoising_strength=0.6,
            **host["hires_extra"],
        )
        return _expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], "Hires upscale"])

    def img2img():
        init = base64.b64encode(baseline["txt2img"]).decode()
        images, infotexts = api.generate(
            with_extension(**METHODS["sega"], **METHODS["scfg"]),
            kind="img2img",
            init_images=[init],
            denoising_strength=0.6,
        )
        return _expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], INFOTEXT_KEYS["scfg"]])

    def batch2():
        images, infotexts = api.generate(with_extension(**METHODS["sega"], **METHODS["scfg"]), batch_size=2)
        return _expect(images, infotexts, count=2, keys=[INFOTEXT_KEYS["sega"]])

    def dict_form():
        images, infotexts = api.generate([{"enable": True, "sega_enable": True, "sega_edits": "+ sunglasses : 5"}])
        return _expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], f"{PREFIX} SEGA edits"])

    def bad(values, note):
        def check():
            images, infotexts = api.generate([dict({"enable": True}, **values)])
            return _expect(images, infotexts, note=note)

        return check

    def and_prompt():
        prompt = "a red cat on a table AND a blue bird in the sky:0.6"
        images, infotexts = api.generate(with_extension(**METHODS["sega"], **METHODS["scfg"]), prompt=prompt)
        return _expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], INFOTEXT_KEYS["scfg"]])

    def long_prompt():
        # 143 CLIP tokens (two 77-token chunks) against a short negative: split or tiled UNet calls.
        # Forge's random-weight text encoder turns this negative into NaN by itself (an all-black image
        # without the extension); then the extension must say so and fall back, not hide it.
        prompt = " ".join(["a red cat wearing a small hat on a wooden table in a sunny garden"] * 11)
        request = dict(prompt=prompt, negative_prompt="blurry")
        host_image = api.generate([False], **request)[0][0]
        values = dict(METHODS["concepts"], **METHODS["sega"], **METHODS["scfg"])
        images, infotexts = api.generate(with_extension(**values), **request)
        keys = [INFOTEXT_KEYS[n] for n in ("concepts", "sega", "scfg")]
        if _is_blank(host_image):
            return _expect(images, infotexts, keys=keys, note="not finite")
        return _expect(images, infotexts, keys=keys)

    def params_route():
        schema = api.call("/semantic-fidelity/v1/params")
        keys = [entry["key"] for entry in schema["params"]]
        types = {entry["type"] for entry in schema["params"]}
        if keys[0] != "enable" or "sega_edits" not in keys or len(keys) != len(set(keys)):
            return f"unexpected keys {keys[:5]}…"
        return None if types <= {"bool", "int", "float", "str", "choice", "edits"} else f"types {types}"

    def xyz_plot():
        info = api.call("/sdapi/v1/script-info")
        xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
        choices = xyz["args"][0]["choices"]
        scale = choices.index("[Semantic Fidelity] Concept steering: Concept scale")
        edits = choices.index("[Semantic Fidelity] SEGA edits: Edits")
        axes = [scale, "2, 12", [], edits, "+ sunglasses : 5, - blurry : 3", [], 0, "", []]
        options = [True, True, False, False, False, False, False, 0, True]  # legend, lone images, …, csv
        values = dict(METHODS["concepts"], concepts="red cat")
        payload = dict(BASE, script_name="x/y/z plot", script_args=axes + options)
        payload["alwayson_scripts"] = {SCRIPT_KEY: {"args": [dict({"enable": False}, **values)]}}
        result = api.call("/sdapi/v1/txt2img", payload)
        cells = [base64.b64decode(image) for image in result["images"]][1:5]  # the grid comes first
        infotexts = json.loads(result["info"])["infotexts"][1:5]
        if len(cells) != 4 or len(set(cells)) != 4:
            return f"expected 4 different cells, got {len(set(cells))} of {len(cells)}"
        for needle in ("concept scale: 2", "concept scale: 12", "sunglasses", "blurry"):
            if not any(needle in text for text in infotexts):
                return f"no cell infotext carries {needle!r}"
        return None

    def mixed_then_disabled():
        names = list(METHODS)
        for i in range(20):
            if i % 3 == 2:
                extension_args = [False]
            else:
                values = {}
                for name in names[i % 4 :] + names[: (i // 4) % 2]:
                    values.update(METHODS[name])
                extension_args = with_extension(**values)
            images, infotexts = api.generate(extension_args, steps=2, seed=100 + i)
            if not images or not _is_png(images[0]):
                return f"request {i + 1} returned no image"
        images, _ = api.generate([False])
        return None if images[0] == baseline["txt2img"] else "21st (disabled) PNG differs from the baseline"

    checks.run("baseline without the extension", take_baseline)
    checks.run("extension loads", link)
    checks.run("disabled ([false]) byte-identical", identical([False]))
    checks.run("not named in the request byte-identical", identical(None))
    for name in METHODS:
        checks.run(f"method {name}", method([name]))
    checks.run("all methods together", method(list(METHODS)))
    checks.run("txt2img with hires fix", hires)
    checks.run("img2img", img2img)
    checks.run("batch 2", batch2)
    checks.run("dict-form API", dict_form)
    checks.run("bad value: unknown key", bad({"sega_enabel": True}, "unknown setting"))
    checks.run("bad value: out of range", bad({"sega_enable": True, "sega_momentum": 7.5}, "sega"))
    checks.run("bad value: empty edit prompt", bad({"sega_enable": True, "sega_edits": "+ : 5"}, "edit"))
    checks.run(
        "bad value: 1000-character concepts", bad({"concepts_enable": True, "concepts": "cat, " * 200}, "concept")
    )
    checks.run("AND prompt", and_prompt)
    checks.run("150-token prompt, short negative", long_prompt)
    checks.run("params route", params_route)
    checks.run("X/Y/Z plot over concept scale and edits", xyz_plot)
    checks.run("20 mixed requests, then disabled byte-identical", mixed_then_disabled)
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
