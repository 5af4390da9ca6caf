"""`--model` (issue 17.6): the checkpoint the runner's checks run on.

- `sd15`: the harness's own random SD1.5, what every host starts with.
- `sdxl`: random weights in SDXL's real architecture (sgm DiffusionEngine keys: CLIP-L and OpenCLIP
  ViT-bigG, pooled `vector` conditioning, context 2048, transformer depths [1, 2, 10] at attention
  factors 2 and 4), made by ../shared/tools/a1111-e2e/sdxl/make_random_sdxl.py with A1111's python
  and offline HF cache. A1111 takes the narrow UNet (model_channels 64, its yaml beside it). Forge
  and Neo find the model family with huggingface_guess, whose SDXL entry matches model_channels 320
  only, so they get the full-width UNet (sd_xl_base.yaml as it is; 6.5 GiB fp16 on disk).

The model is chosen through /sdapi/v1/options after every restart (Neo has no --ckpt) and the
host's SD1.5 is chosen again at the end, so that the next run starts where the harness does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .common import Api
from .hosts import ROOT, Host

MAKER = ROOT.parent / "shared/tools/a1111-e2e/sdxl"
SDXL_BASE_YAML = "repositories/generative-models/configs/inference/sd_xl_base.yaml"  # in A1111's tree
CACHE = Path(os.environ.get("SF_SDXL_CACHE", "/tmp/sdxl-models"))  # made once, hard-linked into hosts
SD15 = "random-sd15"


@dataclass(frozen=True)
class Checkpoint:
    name: str  # the file's stem: the host's model_name alias
    config: str  # "tiny64": MAKER's sdxl-tiny64.yaml (with a copy beside the file); "full": sd_xl_base.yaml


SDXL = {"a1111": Checkpoint("sdxl-tiny64", "tiny64"), "forge": Checkpoint("sdxl-random", "full")}
SDXL["neo"] = SDXL["forge"]


def a1111_root() -> Path:
    return Path(os.environ.get("A1111_DIR", "/tmp/a1111"))


def make(checkpoint: Checkpoint) -> Path:
    """The checkpoint in the cache, made with A1111's python when missing (about 30 s tiny, 3 min full)."""
    target = CACHE / f"{checkpoint.name}.safetensors"
    if target.exists():
        return target
    config = MAKER / "sdxl-tiny64.yaml" if checkpoint.config == "tiny64" else a1111_root() / SDXL_BASE_YAML
    python = Path(os.environ.get("A1111_VENV", "/tmp/a1111-venv")) / "bin/python"
    state = Path(os.environ.get("A1111_STATE", "/tmp/a1111-e2e"))
    env = dict(os.environ, HF_HOME=str(state / "hf-home"), HF_HUB_OFFLINE="1")
    command = [str(python), str(MAKER / "make_random_sdxl.py"), "--webui", str(a1111_root())]
    subprocess.run([*command, "--config", str(config), "--out", str(target)], env=env, check=True)
    return target


def place(host: Host, checkpoint: Checkpoint) -> None:
    """Puts the checkpoint (a hard link) and, for the narrow one, its yaml into the host's folder."""
    source = make(checkpoint)
    target = host.models / source.name
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:  # another file system
            shutil.copyfile(source, target)
    if checkpoint.config == "tiny64":
        shutil.copyfile(MAKER / "sdxl-tiny64.yaml", host.models / f"{checkpoint.name}.yaml")


def select(api: Api, name: str) -> str | None:
    """Makes `name` the host's model (loaded by the next request); None when the host took it.
    Live previews off: with them on, A1111 downloads an SDXL preview model and fails offline."""
    api.call("/sdapi/v1/options", {"sd_model_checkpoint": name, "live_previews_enable": False})
    chosen = str(api.call("/sdapi/v1/options").get("sd_model_checkpoint", ""))
    return None if chosen.startswith(name) else f"the host did not take {name!r} (it has {chosen!r})"


def checkpoint_of(host: Host, model: str) -> Checkpoint | None:
    """None for the harness's SD1.5."""
    return None if model == "sd15" else SDXL[host.name]
