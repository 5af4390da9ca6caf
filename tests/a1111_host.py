"""The A1111 stand-in (tests/fake_hosts/a1111/modules) with this extension's real script loaded the
way the host loads it (module named after the file, not in sys.modules), around the real ldm UNet."""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
STAND_IN = REPOSITORY / "tests" / "fake_hosts" / "a1111"
SCRIPT = REPOSITORY / "scripts" / "semantic_fidelity.py"


def _drop_modules() -> None:
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]


class A1111StandIn:
    """One host session: `generate` runs a whole txt2img or img2img through `process_images`."""

    def __init__(self, unet):
        from modules import script_callbacks, sd_hijack, shared

        shared.reset()
        script_callbacks.clear_callbacks()
        self.shared, self.callbacks, self.sd_hijack = shared, script_callbacks, sd_hijack
        self._models = {}
        self.load_model(unet)
        spec = importlib.util.spec_from_file_location("semantic_fidelity.py", SCRIPT)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        self.script = self.module.SemanticFidelityScript()
        params = self.module.params
        self.script.args_from, self.script.args_to = 0, len(params.PARAMS)
        self.script.alwayson = True
        sd_hijack.list_optimizers()
        sd_hijack.apply_optimizations()

    def load_model(self, unet, **model_config) -> None:
        """Make the model around `unet` the loaded one, as a checkpoint change does (the host then
        re-applies the selected cross-attention optimization). `model_config`: `make_sd_model`'s
        parameterization and alphas_cumprod."""
        from modules import sd_hijack
        from modules.sd_models import make_sd_model

        key = (id(unet), model_config.get("parameterization"), id(model_config.get("alphas_cumprod")))
        if key not in self._models:
            self._models[key] = make_sd_model(unet, **model_config)
        self.shared.sd_model = self._models[key]
        self.unet = unet
        if sd_hijack.optimizers:
            sd_hijack.apply_optimizations()

    @property
    def params(self):
        return self.module.params

    def default_args(self) -> list:
        return [self.params.ui_value(p, p.default) for p in self.params.PARAMS]

    def args(self, **values) -> list:
        """Positional args in ui() order: UI defaults with `values` replaced."""
        args = self.default_args()
        for key, value in values.items():
            args[self.params.BY_KEY[key].position] = value
        return args

    @contextmanager
    def without_extension(self):
        saved = {name: list(entries) for name, entries in self.callbacks.callbacks.items()}
        for entries in self.callbacks.callbacks.values():
            entries.clear()
        try:
            yield
        finally:
            for name, entries in saved.items():
                self.callbacks.callbacks[name][:] = entries

    def generate(self, kind: str = "txt2img", args=None, extension: bool = True, **fields):
        from modules import processing, scripts

        runner = scripts.ScriptRunner([self.script] if extension else [])
        cls = (
            processing.StableDiffusionProcessingTxt2Img
            if kind == "txt2img"
            else processing.StableDiffusionProcessingImg2Img
        )
        p = cls(scripts=runner, script_args=args if args is not None else self.default_args(), **fields)
        if not extension:
            with self.without_extension():
                processed = processing.process_images(p)
        else:
            processed = processing.process_images(p)
        processed.p, processed.errors = p, runner.errors + list(self.callbacks.reported)
        self.callbacks.reported.clear()
        return processed

    def leftover_patches(self) -> list[str]:
        """Instance attributes our adapter sets, wherever they are still found."""
        found = [name or "unet" for name, m in self.unet.named_modules() if "forward" in m.__dict__]
        return found


@contextmanager
def model_loaded(host: A1111StandIn, unet, restore):
    """`unet`'s model loaded in `host` for the duration, then `restore`'s."""
    host.load_model(unet)
    try:
        yield host
    finally:
        host.load_model(restore)


@contextmanager
def a1111_modules():
    """`modules` importable from the stand-in for the duration of a test module."""
    _drop_modules()
    sys.path.insert(0, str(STAND_IN))
    try:
        yield
    finally:
        sys.path.remove(str(STAND_IN))
        _drop_modules()
