"""`modules.script_callbacks` (a1111.md §2): registration lists, parameter objects and callers.
Like the host, a callback's exception is reported and swallowed, never raised."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

_CATEGORIES = (
    "cfg_denoiser",
    "cfg_denoised",
    "cfg_after_cfg",
    "list_optimizers",
    "app_started",
    "before_ui",
    "ui_settings",
)
callbacks: dict[str, list] = {name: [] for name in _CATEGORIES}
reported: list[str] = []


def clear_callbacks() -> None:
    for entries in callbacks.values():
        entries.clear()
    reported.clear()


def on_cfg_denoiser(callback, *, name=None):
    callbacks["cfg_denoiser"].append(callback)


def on_cfg_denoised(callback, *, name=None):
    callbacks["cfg_denoised"].append(callback)


def on_cfg_after_cfg(callback, *, name=None):
    callbacks["cfg_after_cfg"].append(callback)


def on_list_optimizers(callback, *, name=None):
    callbacks["list_optimizers"].append(callback)


def on_app_started(callback, *, name=None):
    callbacks["app_started"].append(callback)


def on_before_ui(callback, *, name=None):
    callbacks["before_ui"].append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks["ui_settings"].append(callback)


def _call(category: str, *args) -> None:
    for callback in callbacks[category]:
        try:
            callback(*args)
        except Exception:
            reported.append(traceback.format_exc())


@dataclass
class CFGDenoiserParams:
    x: Any
    image_cond: Any
    sigma: Any
    sampling_step: int
    total_sampling_steps: int
    text_cond: Any
    text_uncond: Any
    denoiser: Any = None


@dataclass
class CFGDenoisedParams:
    x: Any
    sampling_step: int
    total_sampling_steps: int
    inner_model: Any


@dataclass
class AfterCFGCallbackParams:
    x: Any
    sampling_step: int
    total_sampling_steps: int


def cfg_denoiser_callback(params: CFGDenoiserParams) -> None:
    _call("cfg_denoiser", params)


def cfg_denoised_callback(params: CFGDenoisedParams) -> None:
    _call("cfg_denoised", params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams) -> None:
    _call("cfg_after_cfg", params)


def list_optimizers_callback() -> list:
    res: list = []
    _call("list_optimizers", res)
    return res


def app_started_callback(demo, app) -> None:
    _call("app_started", demo, app)


def before_ui_callback() -> None:
    _call("before_ui")


def ui_settings_callback() -> None:
    _call("ui_settings")
