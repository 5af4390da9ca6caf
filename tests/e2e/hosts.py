"""The host table: how the runner reaches each real WebUI harness. A host is added by adding a row.

Paths follow the harnesses (../shared/tools/a1111-e2e, ../shared/tools/forge-e2e) and honour the
same environment overrides they do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "semantic-fidelity"


@dataclass(frozen=True)
class Host:
    name: str
    harness: str  # the harness script
    port: int
    root: Path  # the WebUI checkout: install.py's working directory and PYTHONPATH
    python: str  # the WebUI venv's python
    models: Path  # the checkpoint folder the harness passes to the host
    ui_variable: str  # set to 1 to make the harness serve the gradio UI too
    hires_extra: dict = field(default_factory=dict)
    hr_upscaler: str = "Latent"  # Forge Neo has no latent upscalers
    # cross-attention optimizations to select (the `cross_attention_optimization` option) and run the
    # attention methods under; empty where the host has no such setting
    attention_optimizations: tuple[str, ...] = ()
    # or, where the attention kernel is a launch flag: (log line that proves it, flag) pairs the
    # runner restarts the host with, through the harness's extra-arguments variable
    attention_flags: tuple[tuple[str, str], ...] = ()
    extra_args_variable: str = ""
    log: Path | None = None  # the host's console log, rewritten at every start

    def command(self, *words: str) -> list[str]:
        return ["bash", self.harness, *words]

    @property
    def extension_dir(self) -> Path:
        return self.root / "extensions" / EXTENSION_NAME

    @property
    def controlnet_dir(self) -> Path:
        """Where both hosts' ControlNet loaders look by default (models_path/ControlNet)."""
        return self.root / "models" / "ControlNet"


def _harness(variable: str, relative: str) -> str:
    return os.environ.get(variable, str(ROOT.parent / "shared/tools" / relative))


HOSTS = {
    "a1111": Host(
        name="a1111",
        harness=_harness("SF_A1111_HARNESS", "a1111-e2e/a1111_e2e.sh"),
        port=int(os.environ.get("A1111_PORT", 7862)),
        root=Path(os.environ.get("A1111_DIR", "/tmp/a1111")),
        python=str(Path(os.environ.get("A1111_VENV", "/tmp/a1111-venv")) / "bin/python"),
        models=Path(os.environ.get("A1111_MODELS", "/tmp/a1111-models")) / "Stable-diffusion",
        ui_variable="A1111_UI",
        # "Automatic" picks InvokeAI on CPU; the others are what GPU users get
        attention_optimizations=("sdp", "sdp-no-mem", "Doggettx", "Semantic Fidelity SDP"),
        log=Path(os.environ.get("A1111_STATE", "/tmp/a1111-e2e")) / "a1111.log",
    ),
    "forge": Host(
        name="forge",
        harness=_harness("SF_FORGE_HARNESS", "forge-e2e/forge_e2e.sh"),
        port=int(os.environ.get("FORGE_PORT", 7861)),
        root=Path(os.environ.get("FORGE_DIR", "/tmp/forge")),
        python=str(Path(os.environ.get("FORGE_VENV", "/tmp/forge-venv")) / "bin/python"),
        models=Path(os.environ.get("FORGE_MODELS", "/tmp/forge-models")) / "Stable-diffusion",
        ui_variable="FORGE_UI",
        # Forge's API crashes in the hires pass without this, and runs it without uncond at hr_cfg 1
        hires_extra={"hr_additional_modules": ["Use same choices"], "hr_cfg": 7},
        # on CPU Forge uses sub-quadratic attention; NVIDIA GPUs get pytorch's SDPA
        attention_flags=(
            ("Using pytorch cross attention", "--attention-pytorch"),
            ("Using split optimization for cross attention", "--attention-split"),
        ),
        extra_args_variable="FORGE_EXTRA_ARGS",
        log=Path(os.environ.get("FORGE_STATE", "/tmp/forge-e2e")) / "forge.log",
    ),
    "neo": Host(
        name="neo",
        harness=os.environ.get("SF_NEO_HARNESS", str(ROOT / "tests/e2e/neo/neo_e2e.sh")),
        port=int(os.environ.get("NEO_PORT", 7863)),
        root=Path(os.environ.get("NEO_DIR", "/tmp/neo")),
        python=str(Path(os.environ.get("NEO_VENV", "/tmp/neo-venv")) / "bin/python"),
        models=Path(os.environ.get("NEO_MODELS", "/tmp/neo-models")) / "Stable-diffusion",
        ui_variable="NEO_UI",
        # Neo's API shares Forge's hires handling
        hires_extra={"hr_additional_modules": ["Use same choices"], "hr_cfg": 7},
        hr_upscaler="None",
        # on CPU Neo logs "Using Basic Cross Attention"; GPUs get pytorch's SDPA (or sage/flash/xformers)
        attention_flags=(("Using PyTorch Cross Attention", "--use-pytorch-cross-attention"),),
        extra_args_variable="NEO_EXTRA_ARGS",
        log=Path(os.environ.get("NEO_STATE", "/tmp/neo-e2e")) / "neo.log",
    ),
}
