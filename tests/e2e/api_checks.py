"""The HTTP API checks (issue 9, item 3), run against a host that has the extension loaded."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .common import (
    BASE,
    PREFIX,
    SCRIPT_KEY,
    Api,
    Checks,
    expect,
    infotext_value,
    is_blank,
    is_png,
    same_pixels,
    with_extension,
)
from .hosts import Host

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
# attention regulation's layers sit at 1/4 of the latent: at 64 px their maps are 2x2, too small for one
# Gaussian bump, and it says so in a note; its checks use 128 px, where it acts
REGULATION_SIZE = {"width": 128, "height": 128}
FUSED_SIZE = {"width": 256, "height": 256}
FUSED_EXTRA = {"scfg_mask_factor": 1}
ACTED = f"{PREFIX} acted"  # what each method did in the run (hosts/common.record_acted)
XYZ_SCALE_AXIS = "[Semantic Fidelity] Concept steering: Concept scale"
XYZ_EDITS_AXIS = "[Semantic Fidelity] SEGA edits: Edits"


class ApiChecks:
    def __init__(self, api: Api, host: Host, baseline: dict[str, bytes], shots: Path | None, restart=None):
        self.api, self.host, self.baseline, self.shots = api, host, baseline, shots
        self.restart = restart  # restart(extra launch arguments): the harness restarting the host

    def identical(self, extension_args):
        def check():
            images, _ = self.api.generate(extension_args)
            return None if images[0] == self.baseline.get("txt2img") else "PNG differs from the baseline"

        return check

    def plain(self, size: dict) -> bytes:
        """The host's own image of BASE at `size` (the baseline at BASE's size), made once."""
        key = f"txt2img {size}" if size else "txt2img"
        if key not in self.baseline:
            self.baseline[key] = self.api.generate([False], **size)[0][0]
        return self.baseline[key]

    def method(self, names, extra: dict | None = None, size: dict | None = None):
        """The methods on: an image whose pixels differ from the host's, the methods' infotext keys,
        no note, and the "acted" summary with no method that did not act."""

        def check():
            values = {}
            for name in names:
                values.update(METHODS[name])
            values.update(extra or {})
            request_size = size or (REGULATION_SIZE if "regulation" in names else {})
            images, infotexts = self.api.generate(with_extension(**values), **request_size)
            problem = expect(images, infotexts, keys=[PREFIX, ACTED] + [INFOTEXT_KEYS[n] for n in names])
            if problem:
                return problem
            if "did not act" in infotext_value(infotexts[0], ACTED):
                return f"the summary says a method did not act: {infotext_value(infotexts[0], ACTED)!r}"
            return "same pixels as the host's own image" if same_pixels(images, [self.plain(request_size)]) else None

        return check

    def detected_concepts(self):
        """No concept list: the extension finds spaCy's English pipeline in the host's venv and says
        which concepts it detected."""
        prompt = "a red book and a gold clock on a wooden table"
        images, infotexts = self.api.generate(with_extension(concepts_enable=True, concept_warmup=0.0), prompt=prompt)
        problem = expect(images, infotexts, keys=[INFOTEXT_KEYS["concepts"], f"{PREFIX} detected concepts"])
        if problem:
            return problem
        return None if "red book" in infotexts[0] and "gold clock" in infotexts[0] else f"detected: {infotexts[0]!r}"

    def hires(self):
        images, infotexts = self.api.generate(
            with_extension(**METHODS["sega"], **METHODS["scfg"]),
            enable_hr=True,
            hr_scale=2,
            hr_upscaler=self.host.hr_upscaler,
            hr_second_pass_steps=2,
            denoising_strength=0.6,
            **self.host.hires_extra,
        )
        return expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], "Hires upscale"])

    def img2img(self):
        init = base64.b64encode(self.baseline["txt2img"]).decode()
        images, infotexts = self.api.generate(
            with_extension(**METHODS["sega"], **METHODS["scfg"]),
            kind="img2img",
            init_images=[init],
            denoising_strength=0.6,
        )
        return expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], INFOTEXT_KEYS["scfg"]])

    def batch2(self):
        images, infotexts = self.api.generate(with_extension(**METHODS["sega"], **METHODS["scfg"]), batch_size=2)
        return expect(images, infotexts, count=2, keys=[INFOTEXT_KEYS["sega"]])

    def dict_form(self):
        images, infotexts = self.api.generate([{"enable": True, "sega_enable": True, "sega_edits": "+ sunglasses : 5"}])
        return expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], f"{PREFIX} SEGA edits"])

    def bad(self, values, note):
        def check():
            images, infotexts = self.api.generate([dict({"enable": True}, **values)])
            return expect(images, infotexts, note=note)

        return check

    def and_prompt(self):
        prompt = "a red cat on a table AND a blue bird in the sky:0.6"
        images, infotexts = self.api.generate(with_extension(**METHODS["sega"], **METHODS["scfg"]), prompt=prompt)
        return expect(images, infotexts, keys=[INFOTEXT_KEYS["sega"], INFOTEXT_KEYS["scfg"]])

    def long_prompt(self):
        # 143 CLIP tokens (two 77-token chunks) against a short negative: split or tiled UNet calls.
        # Forge's random-weight text encoder turns this negative into NaN by itself (an all-black image
        # without the extension); then the extension must say so and fall back, not hide it.
        prompt = " ".join(["a red cat wearing a small hat on a wooden table in a sunny garden"] * 11)
        request = dict(prompt=prompt, negative_prompt="blurry")
        host_image = self.api.generate([False], **request)[0][0]
        values = dict(METHODS["concepts"], **METHODS["sega"], **METHODS["scfg"])
        images, infotexts = self.api.generate(with_extension(**values), **request)
        keys = [INFOTEXT_KEYS[n] for n in ("concepts", "sega", "scfg")]
        if is_blank(host_image):
            return expect(images, infotexts, keys=keys, note="not finite")
        return expect(images, infotexts, keys=keys)

    def params_route(self):
        schema = self.api.call("/semantic-fidelity/v1/params")
        keys = [entry["key"] for entry in schema["params"]]
        types = {entry["type"] for entry in schema["params"]}
        if keys[0] != "enable" or "sega_edits" not in keys or len(keys) != len(set(keys)):
            return f"unexpected keys {keys[:5]}…"
        return None if types <= {"bool", "int", "float", "str", "choice", "edits"} else f"types {types}"

    def xyz_plot(self):
        info = self.api.call("/sdapi/v1/script-info")
        xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
        choices = xyz["args"][0]["choices"]
        scale, edits = choices.index(XYZ_SCALE_AXIS), choices.index(XYZ_EDITS_AXIS)
        axes = [scale, "2, 12", [], edits, "+ sunglasses : 5, - blurry : 3", [], 0, "", []]
        options = [True, True, False, False, False, False, False, 0, True]  # legend, lone images, …, csv
        if any(arg.get("label") == "Row Count" for arg in xyz["args"]):
            options.insert(7, 0)  # Forge Neo's grid has a row count (0: automatic) before the margins
        values = dict(METHODS["concepts"], concepts="red cat")
        payload = dict(BASE, width=128, height=128, script_name="x/y/z plot", script_args=axes + options)
        payload["alwayson_scripts"] = {SCRIPT_KEY: {"args": [dict({"enable": False}, **values)]}}
        result = self.api.call("/sdapi/v1/txt2img", payload)
        images = [base64.b64decode(image) for image in result["images"]]
        cells, infotexts = images[1:5], json.loads(result["info"])["infotexts"][1:5]  # the grid comes first
        if len(cells) != 4 or len(set(cells)) != 4:
            return f"expected 4 different cells, got {len(set(cells))} of {len(cells)}"
        for needle in ("concept scale: 2", "concept scale: 12", "sunglasses", "blurry"):
            if not any(needle in text for text in infotexts):
                return f"no cell infotext carries {needle!r}"
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            (self.shots / f"{self.host.name}-xyz-grid.png").write_bytes(images[0])
        return None

    def _attention_methods_act(self) -> str | None:
        values = dict(METHODS["scfg"], **METHODS["regulation"])
        images, infotexts = self.api.generate(with_extension(**values), **REGULATION_SIZE)
        problem = expect(images, infotexts, keys=[INFOTEXT_KEYS["scfg"], INFOTEXT_KEYS["regulation"]])
        if problem:
            return problem
        if is_blank(images[0]):
            return "blank image"
        plain, _ = self.api.generate([False], **REGULATION_SIZE)
        return None if plain[0] != images[0] else "the methods changed nothing"

    def attention_optimization(self, name: str):
        """The attention methods under a cross-attention optimization the user selected."""

        def check():
            self.api.call("/sdapi/v1/options", {"cross_attention_optimization": name})
            selected = self.api.call("/sdapi/v1/options").get("cross_attention_optimization")
            if selected != name:
                return f"the host did not take {name!r} (it has {selected!r})"
            return self._attention_methods_act()

        return check

    def restore_automatic(self):
        self.api.call("/sdapi/v1/options", {"cross_attention_optimization": "Automatic"})
        return self.identical([False])()

    def attention_flag(self, proof: str, flag: str):
        """The attention methods with the host started on another attention kernel."""

        def check():
            self.restart(flag)
            log = self.host.log.read_text(errors="replace") if self.host.log and self.host.log.exists() else ""
            if self.host.log and proof not in log:
                return f"the host's log does not say {proof!r} after starting with {flag}"
            return self._attention_methods_act()

        return check

    def restart_plain(self):
        self.restart("")
        return self.identical([False])()

    def mixed_then_disabled(self):
        names = list(METHODS)
        for i in range(20):
            if i % 3 == 2:
                extension_args = [False]
            else:
                values = {}
                for name in names[i % 4 :] + names[: (i // 4) % 2]:
                    values.update(METHODS[name])
                extension_args = with_extension(**values)
            images, infotexts = self.api.generate(extension_args, steps=2, seed=100 + i)
            if not images or not is_png(images[0]):
                return f"request {i + 1} returned no image"
        images, _ = self.api.generate([False])
        return None if images[0] == self.baseline["txt2img"] else "21st (disabled) PNG differs from the baseline"

    def run(self, checks: Checks) -> None:
        checks.run("disabled ([false]) byte-identical", self.identical([False]))
        checks.run("not named in the request byte-identical", self.identical(None))
        for name in METHODS:
            checks.run(f"method {name}", self.method([name]))
        checks.run("all methods together", self.method(list(METHODS)))
        # 256 px: the self-attention maps (1024² per head) pass the layer's capture budget, so
        # S-CFG multiplies them through the fused attention kernel instead of forming them
        checks.run("S-CFG at R = 1, 256 px (fused products)", self.method(["scfg"], FUSED_EXTRA, FUSED_SIZE))
        checks.run("concepts detected by spaCy (no list given)", self.detected_concepts)
        checks.run("txt2img with hires fix", self.hires)
        checks.run("img2img", self.img2img)
        checks.run("batch 2", self.batch2)
        checks.run("dict-form API", self.dict_form)
        checks.run("bad value: unknown key", self.bad({"sega_enabel": True}, "unknown setting"))
        checks.run("bad value: out of range", self.bad({"sega_enable": True, "sega_momentum": 7.5}, "sega"))
        checks.run("bad value: empty edit prompt", self.bad({"sega_enable": True, "sega_edits": "+ : 5"}, "edit"))
        checks.run(
            "bad value: 1000-character concepts",
            self.bad({"concepts_enable": True, "concepts": "cat, " * 200}, "concept"),
        )
        checks.run("AND prompt", self.and_prompt)
        checks.run("150-token prompt, short negative", self.long_prompt)
        checks.run("params route", self.params_route)
        checks.run("X/Y/Z plot over concept scale and edits", self.xyz_plot)
        for name in self.host.attention_optimizations:
            checks.run(f"S-CFG + regulation with attention optimization {name!r}", self.attention_optimization(name))
        if self.host.attention_optimizations:
            checks.run("back to 'Automatic': disabled byte-identical", self.restore_automatic)
        if self.restart is not None:
            for proof, flag in self.host.attention_flags:
                checks.run(f"S-CFG + regulation with the host started with {flag}", self.attention_flag(proof, flag))
            if self.host.attention_flags:
                checks.run("restarted as before: disabled byte-identical", self.restart_plain)
        checks.run("20 mixed requests, then disabled byte-identical", self.mixed_then_disabled)
