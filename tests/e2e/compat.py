"""`--compat` (issue 14.5): every host tool that changes sampling, combined with each of our methods.

Per cell (tool x method) three generations from the same request: (a) the tool alone, (b) our method
alone, (c) both. The cell passes when (c) differs in decoded pixels from (a) and from (b) (both took
part), the host answered without an HTTP error, (c)'s infotext names our method (it says it acted)
and carries no `Semantic Fidelity note` (no silent fallback), unless the combination is declared
impossible in IMPOSSIBLE. A tool that alone does not change the image against plain CFG proves
nothing: then its whole row fails. Each tool is switched on through `alwayson_scripts` with its
`ui()` argument list; the runner fills the positions it does not set from /sdapi/v1/script-info
and checks that each position it sets carries the expected label. A host setting (Neo's Token
Merging, Epsilon Scaling, Skip Early CFG) is switched on by `override_settings` in (a) and (c) only;
a tool the host shows in img2img only (Neo's MultiDiffusion) gets its three generations there.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from guidance.hosts.forge_patches import TILED_NOTE

from .api_checks import INFOTEXT_KEYS, METHODS, REGULATION_SIZE
from .common import BASE, NOTE, SCRIPT_KEY, Api, Checks, infotext_value, is_blank, same_pixels, with_extension
from .hosts import Host

# (tool, method) -> why that combination cannot work. The one place where such a decision is made;
# a cell listed here may carry our note (it must still answer without an HTTP error).
IMPOSSIBLE: dict[tuple[str, str], str] = {
    # MultiDiffusion runs the UNet in tiles: a tile's attention maps are not the latent's
    ("MultiDiffusion", "scfg"): TILED_NOTE,
    ("MultiDiffusion", "regulation"): TILED_NOTE,
    # Kohya HRFix (Deep Shrink) halves the latent inside the UNet during its window: at the matrix's
    # 128 px the regulated layers' maps are then 2x2, below one Gaussian bump, and regulation says so
    ("Kohya HRFix", "regulation"): "too small for one Gaussian bump",
    ("MultiDiffusion (img2img)", "scfg"): TILED_NOTE,
    ("MultiDiffusion (img2img)", "regulation"): TILED_NOTE,
    # ToMe merges the self-attention queries of the full-resolution layers: those maps are not the latent's
    # pixels, so S-CFG captures the other layers only and says so
    ("Token Merging", "scfg"): "an extension such as ToMe or Hypertile reshapes them",
}

CONTROLNET_FILE = "control_random_sd15"  # tests/e2e/make_random_controlnet.py writes <this>.safetensors


@dataclass(frozen=True)
class Tool:
    """One row: a tool switched on through alwayson_scripts, or a host setting switched on in the request."""

    name: str
    script: str = ""  # its alwayson_scripts key: the script's title, lowercased; "" for a host setting
    # (ui() position, expected label, value); the other positions keep the host's ui() defaults
    settings: tuple[tuple[int, str, object], ...] = ()
    request: dict = field(default_factory=dict)  # what the tool needs in every request of its row (batch 2, …)
    switch: dict = field(default_factory=dict)  # request fields that switch a host setting on (override_settings)
    # the host settings' off values, written into the host's settings before the run: Neo restores an
    # override after the request only for a setting its settings already hold
    off: dict = field(default_factory=dict)
    controlnet_module: str = ""  # set for ControlNet rows: the host's name of the preprocessor
    controlnet_unit: dict = field(default_factory=dict)  # more unit fields; a "model" there needs no file
    kind: str = "txt2img"  # img2img for a tool the host shows only there
    show_options: dict = field(default_factory=dict)  # host options without which the script is not shown


A1111_TOOLS = (
    Tool(
        "Dynamic Thresholding (mcmonkey)",
        "dynamic thresholding (cfg scale fix)",
        ((0, "Enable Dynamic Thresholding (CFG Scale Fix)", True), (1, "Mimic CFG Scale", 4.0)),
    ),
    Tool("Incantations S-CFG", "incantations", ((4, "Active", True), (5, "SCFG Scale", 1.0))),
    Tool("Incantations PAG", "incantations", ((12, "Active", True), (13, "PAG Scale", 3.0))),
    Tool("ControlNet (sd-webui-controlnet)", "controlnet", controlnet_module="none"),
)

FORGE_TOOLS = (
    Tool(
        "DynamicThresholding",
        "dynamicthresholding (cfg-fix) integrated",
        ((0, "Enabled", True), (1, "Mimic Scale", 4.0)),
    ),
    Tool("LatentModifier", "latentmodifier integrated", ((0, "Enabled", True), (9, "Rescale Cfg Phi", 0.7))),
    Tool(
        "MultiDiffusion",
        "multidiffusion integrated",
        ((0, "Enabled", True), (2, "Tile Width", 32), (3, "Tile Height", 32), (4, "Tile Overlap", 0)),
    ),
    Tool(
        "SAG",
        "selfattentionguidance integrated (sd 1.x, sd 2.x, sdxl)",
        ((0, "SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)", True),),
    ),
    Tool("PAG", "perturbedattentionguidance integrated", ((0, "PerturbedAttentionGuidance Integrated", True),)),
    Tool("StyleAlign (batch 2)", "stylealign integrated", ((0, "Share attention in batch", True),), {"batch_size": 2}),
    Tool(
        "FreeU (128 px)",
        "freeu integrated (sd 1.x, sd 2.x, sdxl)",
        ((0, "FreeU Integrated (SD 1.x, SD 2.x, SDXL)", True),),
        # at 64 px its 1280-channel blocks are 1x1, where its (h - min) / (max - min) is 0 / 0 = NaN
        {"width": 128, "height": 128},
    ),
    Tool("Kohya HRFix", "kohya hrfix integrated", ((0, "Kohya HRFix Integrated", True),)),
    Tool("ControlNet (built-in)", "controlnet", controlnet_module="None"),
)

# Forge Neo's own tools for SD1.5 (its extensions-builtin and modules/processing_scripts; sd_forge_radial is
# Wan only, the image stitch feeds edit models' reference latents, PiD needs its own checkpoint, IP-Adapter and
# InstantID a CLIP-Vision/InsightFace download, ControlLLLite its own model, torch.compile changes no number)
NEO_TOOLS = (
    Tool("RescaleCFG", "rescalecfg", ((0, "Rescale CFG", 0.7),), show_options={"show_rescale_cfg": True}),
    Tool("MaHiRo", "mahiro", ((0, "MaHiRo", True),), show_options={"show_mahiro": True}),
    Tool("Epsilon Scaling", switch={"override_settings": {"scaling_factor": 1.05}}, off={"scaling_factor": 1.0}),
    Tool("Skip Early CFG", switch={"override_settings": {"skip_early_cond": 0.5}}, off={"skip_early_cond": 0.0}),
    Tool(
        "Token Merging",
        switch={"override_settings": {"token_merging_ratio": 0.5}},
        off={"token_merging_ratio": 0.0},
    ),
    Tool(
        "MultiDiffusion (img2img)",
        "multidiffusion integrated",
        ((0, "MultiDiffusion Integrated", True), (2, "Tile Width", 32), (3, "Tile Height", 32), (4, "Tile Overlap", 0)),
        kind="img2img",  # Neo shows it in img2img only
    ),
    Tool("ControlNet (built-in)", "controlnet", controlnet_module="None"),
    Tool(
        "ControlNet reference_only",
        "controlnet",
        controlnet_module="reference_only",
        controlnet_unit={"model": "None", "threshold_a": 0.5},  # Style Fidelity; the preprocessor needs no model
    ),
)

TOOLS = {"a1111": A1111_TOOLS, "forge": FORGE_TOOLS, "neo": NEO_TOOLS}
IMG2IMG = {"denoising_strength": 0.75}  # with control_image() as the init image


def control_image(size: int = 64) -> str:
    """A small control image (a white square on black), base64 PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def filled_args(defaults: list, settings) -> tuple[list, str | None]:
    """The tool's argument list: the host's ui() defaults with our settings placed; or why not."""
    args = [entry.get("value") for entry in defaults]
    for position, label, value in settings:
        if position >= len(args):
            return args, f"the script has {len(args)} arguments, not {position + 1}"
        actual = defaults[position].get("label") or ""
        if label and actual != label:
            return args, f"argument {position} is {actual!r}, not {label!r}"
        args[position] = value
    return args, None


def http_error(error: Exception) -> str:
    """One line for a failed request, with the host's own message where it sent one."""
    if isinstance(error, urllib.error.HTTPError):
        body = error.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not an object
            body = json.loads(body).get("errors") or json.loads(body).get("detail") or body
        return f"HTTP {error.code}: {str(body)[:160]}"
    return f"{type(error).__name__}: {str(error)[:160]}"


def cell_problem(tool_alone, ours_alone, both, method: str, impossible: str | None = None) -> str | None:
    """Why a cell fails, from its three generations ((images, infotexts) each); None when it passes. A
    combination declared `impossible` passes when it answers with an image and our note gives that reason."""
    images, infotexts = both
    if not images:
        return "no image"
    if impossible is not None:
        note = infotext_value(infotexts[0] if infotexts else "", NOTE) or ""
        return None if impossible in note else f"no note saying why it cannot act (note: {note or 'none'})"
    problems = []
    if same_pixels(images, tool_alone[0]):
        problems.append("same pixels as the tool alone")
    if same_pixels(images, ours_alone[0]):
        problems.append("same pixels as ours alone")
    text = infotexts[0] if infotexts else ""
    if INFOTEXT_KEYS[method] not in text:
        problems.append(f"infotext lacks {INFOTEXT_KEYS[method]!r}")
    note = infotext_value(text, NOTE)
    if note is not None:
        problems.append(f"note: {note}")
    return "; ".join(problems) or None


class Compat:
    """Runs the matrix against one host and prints it."""

    def __init__(self, api: Api, host: Host):
        self.api, self.host = api, host
        self.tools = TOOLS[host.name]
        self.results: dict[tuple[str, str], str | None] = {}
        self._cache: dict[str, tuple[list[bytes], list[str]]] = {}
        self._script_info: list[dict] | None = None

    def generate(self, scripts: dict, request: dict, kind: str = "txt2img") -> tuple[list[bytes], list[str]]:
        """One generation, cached by its payload (a cell's (a) and (b) are shared along its row/column)."""
        payload = dict(BASE, **request)
        if kind == "img2img":
            payload = dict(payload, init_images=[control_image()], **IMG2IMG)
        if scripts:
            payload["alwayson_scripts"] = scripts
        key = kind + json.dumps(payload, sort_keys=True)
        if key not in self._cache:
            try:
                result = self.api.call(f"/sdapi/v1/{kind}", payload)
            except Exception as error:
                raise RuntimeError(http_error(error)) from None
            images = [base64.b64decode(image) for image in result["images"]]
            self._cache[key] = images, json.loads(result["info"])["infotexts"]
        return self._cache[key]

    def defaults(self, script: str, kind: str = "txt2img") -> list[dict] | None:
        """The ui() arguments of a loaded script (label, value) in that tab, from /sdapi/v1/script-info."""
        if self._script_info is None:
            self._script_info = self.api.call("/sdapi/v1/script-info")
        for entry in self._script_info:
            if entry["name"] == script and entry["is_img2img"] == (kind == "img2img"):
                return entry["args"]
        return None

    def controlnet_model(self) -> str | None:
        names = self.api.call("/controlnet/model_list").get("model_list", [])
        return next((name for name in names if CONTROLNET_FILE in name), None)

    def tool_args(self, tool: Tool) -> tuple[list | None, str | None]:
        """What alwayson_scripts gets for the tool, or why the tool cannot be switched on."""
        if not tool.script:
            return None, None  # a host setting: `switch` in the request
        defaults = self.defaults(tool.script, tool.kind)
        if defaults is None:
            return None, f"{tool.script!r} is not loaded in {tool.kind}"
        if tool.controlnet_module:
            model = tool.controlnet_unit.get("model") or self.controlnet_model()
            if model is None:
                return None, f"no {CONTROLNET_FILE} in /controlnet/model_list (make_random_controlnet.py)"
            unit = {"enabled": True, "module": tool.controlnet_module, "model": model, "image": control_image()}
            return [dict(unit, weight=1.0, guidance_start=0.0, guidance_end=1.0, **tool.controlnet_unit)], None
        return filled_args(defaults, tool.settings)

    def row_problem(self, tool: Tool, scripts: dict) -> str | None:
        """Why the row proves nothing: the tool alone fails, gives NaN or changes nothing against plain CFG."""
        plain = self.generate({}, tool.request, tool.kind)
        alone = self.generate(scripts, dict(tool.request, **tool.switch), tool.kind)
        if any(is_blank(image) for image in alone[0]):
            return "the tool alone gives a one-colour image (NaN latents)"
        return "the tool alone changes nothing" if same_pixels(plain[0], alone[0]) else None

    def cell_problem(self, tool: Tool, scripts: dict, method: str) -> str | None:
        """Generates (a) the tool alone, (b) our method alone, (c) both, and judges the cell."""
        ours = {SCRIPT_KEY: {"args": with_extension(**METHODS[method])}}
        request = dict(tool.request, **REGULATION_SIZE) if method == "regulation" else tool.request
        switched = dict(request, **tool.switch)
        tool_alone = self.generate(scripts, switched, tool.kind)
        ours_alone = self.generate(ours, request, tool.kind)
        both = self.generate(dict(scripts, **ours), switched, tool.kind)
        return cell_problem(tool_alone, ours_alone, both, method, IMPOSSIBLE.get((tool.name, method)))

    def cell(self, tool: Tool, scripts: dict, method: str, row: str | None):
        def check():
            try:
                problem = row or self.cell_problem(tool, scripts, method)
            except Exception as error:  # an HTTP error is the cell's result, not the run's end
                problem = str(error)
            self.results[tool.name, method] = problem
            return problem

        return check

    def run(self, checks: Checks) -> None:
        for tool in self.tools:
            args, row = self.tool_args(tool)
            scripts = {tool.script: {"args": args}} if args is not None else {}
            if row is None:
                try:
                    row = self.row_problem(tool, scripts)
                except Exception as error:
                    row = f"tool alone: {error}"
            for method in METHODS:
                checks.run(f"compat {tool.name} x {method}", self.cell(tool, scripts, method, row))
        print(matrix_text(self.tools, self.results), flush=True)


def matrix_text(tools, results: dict[tuple[str, str], str | None], width: int = 30) -> str:
    """The matrix (rows: tools, columns: our methods, cells PASS / NOTED for a declared impossible cell
    that says why / FAIL + a short reason), then every failure's whole reason and the declared
    impossible combinations of these tools."""
    first = max(len(tool.name) for tool in tools) + 2
    lines = ["".ljust(first) + "".join(method.ljust(width) for method in METHODS)]
    reasons = []
    for tool in tools:
        cells = []
        for method in METHODS:
            problem = results.get((tool.name, method), "not run")
            passed = "NOTED (cannot act)" if (tool.name, method) in IMPOSSIBLE else "PASS"
            cells.append(passed if problem is None else f"FAIL {problem}"[: width - 2])
            if problem is not None:
                reasons.append(f"  {tool.name} x {method}: {problem}")
        lines.append(tool.name.ljust(first) + "".join(cell.ljust(width) for cell in cells))
    if reasons:
        lines += ["", "failures:"] + reasons
    names = {tool.name for tool in tools}
    declared = [f"  {t} x {m}: {why}" for (t, m), why in IMPOSSIBLE.items() if t in names]
    lines += ["", "declared impossible:"] + (declared or ["  (none)"])
    return "\n".join(lines)


def set_host_options(api: Api, host: Host) -> bool:
    """Writes the host settings' off values and the options without which a row's script is not shown;
    True when one of the latter changed (the host then needs a restart: scripts decide at start)."""
    shown, off = {}, {}
    for tool in TOOLS[host.name]:
        shown.update(tool.show_options)
        off.update(tool.off)
    if not (shown or off):
        return False
    current = api.call("/sdapi/v1/options")
    changed = {key: value for key, value in shown.items() if current.get(key) != value}
    api.call("/sdapi/v1/options", dict(off, **changed))
    return bool(changed)


def ensure_controlnet_model(host: Host) -> Path:
    """The random SD1.5 ControlNet in the host's ControlNet folder, written once (about 0.7 GB)."""
    path = host.controlnet_dir / f"{CONTROLNET_FILE}.safetensors"
    if not path.exists():
        command = [sys.executable, "-m", "tests.e2e.make_random_controlnet", str(path)]
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[2])
    return path


def git_head(path: Path) -> str:
    """The checked-out commit of the linked extension, as the saved matrices name it."""
    done = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return done.stdout.strip()[:100] or "(not a git checkout)"


def run(api: Api, host: Host, checks: Checks) -> None:
    """The whole matrix against the host, which has the extension and the other tools loaded."""
    started = time.time()
    Compat(api, host).run(checks)
    print(f"    compat matrix: {(time.time() - started) / 60:.1f} min", flush=True)
