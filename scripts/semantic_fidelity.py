"""Semantic Fidelity: the WebUI script (AUTOMATIC1111 1.9-1.10 and Forge 2.x).

Only the Script class lives here. The controls come from guidance/params.py; everything else is in
the `guidance` package beside this folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from modules import script_callbacks, scripts

EXTENSION_ROOT = Path(__file__).resolve().parent.parent
_OWN_PACKAGE_ALIAS = "semantic_fidelity_guidance"
NO_METHOD_NOTE = "no method on (preset Custom and no method ticked) - the image is the WebUI's own."


def _load_guidance():
    """This extension's `guidance` package. The WebUI puts the extension root on sys.path while
    scripts load, but a PyPI package of the same name may already be imported; then ours is
    loaded under another name (the package uses only relative imports, so that works)."""
    try:
        import guidance

        if getattr(guidance, "EXTENSION_MARKER", None) == "semantic-fidelity":
            return guidance
    except ImportError:
        pass
    if _OWN_PACKAGE_ALIAS in sys.modules:
        return sys.modules[_OWN_PACKAGE_ALIAS]
    init = EXTENSION_ROOT / "guidance" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        _OWN_PACKAGE_ALIAS, init, submodule_search_locations=[str(init.parent)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[_OWN_PACKAGE_ALIAS] = package
    spec.loader.exec_module(package)
    return package


_guidance = _load_guidance()
params = importlib.import_module(f"{_guidance.__name__}.params")
_hosts = importlib.import_module(f"{_guidance.__name__}.hosts")
_common = importlib.import_module(f"{_guidance.__name__}.hosts.common")
_xyz = importlib.import_module(f"{_guidance.__name__}.hosts.webui_xyz")
_api = importlib.import_module(f"{_guidance.__name__}.hosts.webui_api")
_ui = importlib.import_module(f"{_guidance.__name__}.hosts.webui_ui")
_pictures = importlib.import_module(f"{_guidance.__name__}.hosts.webui_diagnostics")

# The one registry the host requires: this host's adapter, chosen when the script module loads.
HOST = _hosts.detect_host()
ADAPTER = _hosts.make_adapter(HOST)
ADAPTER.register_callbacks()
script_callbacks.on_app_started(_api.add_routes)
# at import for --nowebui (the API builds its UI before on_before_ui), and again before the UI
_xyz.register_axes()
script_callbacks.on_before_ui(_xyz.register_axes)
script_callbacks.on_ui_settings(_ui.add_settings)


class SemanticFidelityScript(scripts.Script):
    def title(self):
        return "Semantic Fidelity"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        components = _ui.build_ui(self, is_img2img)
        self.infotext_fields = _ui.infotext_fields(components)
        self.paste_field_names = [p.infotext_key for p in params.PARAMS]
        return components

    def after_component(self, component, **kwargs):
        # the host hands over every component it builds: the UI keeps the tab's prompt box for Detect
        _ui.after_component(self, component, **kwargs)

    def process(self, p, *args):
        """Validate the settings once per generation; bad input is reported, never raised."""
        ADAPTER.reset()  # a generation that raised never reached postprocess: nothing of it may stay
        # XYZ cells share one extra_generation_params dict: no key of an earlier cell may stay
        for key in [k for k in p.extra_generation_params if k.startswith(params.INFOTEXT_PREFIX)]:
            del p.extra_generation_params[key]
        try:
            settings = params.settings_from_args(args, fallback={"preset": _ui.default_preset()})
            overrides = _xyz.overrides_of(p)
            if overrides:
                settings = settings.replace(**overrides)
            settings = params.resolve_preset(settings, is_sdxl=_is_sdxl(p))
        except params.InvalidSettings as error:
            _common.attach_state(p, None)
            if _switched_on(p, args):
                _common.report(p, "; ".join(error.problems) + ". Generating without Semantic Fidelity.")
            return
        acting = settings.enable and bool(settings.active_methods)
        _common.attach_state(p, settings if acting else None)
        if acting:
            p.extra_generation_params.update(params.infotext_fields(settings))
        elif settings.enable:
            _common.report(p, NO_METHOD_NOTE)

    def process_before_every_sampling(self, p, *args, **kwargs):
        state = _common.state_of(p)
        if state is None or state.settings is None or state.failed:
            return
        try:
            ADAPTER.prepare(p, state)
        except Exception as error:  # never break generation: host CFG for this image
            _fail(p, state, error)

    def postprocess_batch(self, p, *args, **kwargs):
        # each batch gets a fresh run in prepare(); nothing of this batch may reach the next
        ADAPTER.finish(p)

    def postprocess(self, p, processed, *args):
        ADAPTER.finish(p)
        # with "Show diagnostics" on: one picture per image after the images (never raises)
        _pictures.add_pictures(p, processed)


def _is_sdxl(p) -> bool:
    """Whether the model being sampled is SDXL (both hosts set `is_sdxl`; a missing model is not)."""
    return bool(getattr(getattr(p, "sd_model", None), "is_sdxl", False))


def _switched_on(p, args) -> bool:
    """Whether the request meant to use the extension (then bad input deserves a message)."""
    if _xyz.overrides_of(p).get("enable"):
        return True
    if not args:
        return False
    first = args[0]
    if isinstance(first, dict):
        return bool(first.get("enable", True))
    return bool(first)


def _fail(p, state, error: Exception) -> None:
    ADAPTER.finish(p)
    state.failed = True
    _common.report(p, f"{type(error).__name__}: {error}. This image uses the host's plain CFG.")
