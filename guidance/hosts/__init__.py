"""Thin adapters between the host WebUIs (AUTOMATIC1111, Forge) and the host-independent core.

Both adapters offer the same two calls the script makes:
    prepare(p, state)  before every sampler run (process_before_every_sampling; again for hires)
    finish(p)          after the generation, and after any error: removes every patch and callback
"""

from __future__ import annotations

import importlib


def detect_host() -> str:
    """'forge' for Forge 2.x (its backend UNet patcher is importable and its version starts with
    '2.'), otherwise 'a1111'. Called once, when the script module loads."""
    try:
        importlib.import_module("backend.patcher.unet")
        version = importlib.import_module("modules_forge.forge_version").version
    except Exception:
        return "a1111"
    return "forge" if str(version).startswith("2.") else "a1111"


def make_adapter(host: str):
    if host == "forge":
        from .forge import ForgeAdapter

        return ForgeAdapter()
    from .a1111 import A1111Adapter

    return A1111Adapter()
