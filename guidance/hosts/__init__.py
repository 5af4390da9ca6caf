"""Thin adapters between the host WebUIs (AUTOMATIC1111, Forge 2.x, Forge Neo) and the host-independent
core.

Every adapter offers the same calls the script makes:
    prepare(p, state)  before every sampler run (process_before_every_sampling; again for hires)
    finish(p)          after the generation, and after any error: removes every patch and callback
"""

from __future__ import annotations

import importlib

HOSTS = ("a1111", "forge", "neo")


def host_of_version(version: str) -> str:
    """The adapter for a Forge-family `modules_forge.forge_version.version`: '2.x…' is Forge 2, 'neo'
    is Forge Neo; anything else (Forge 1's ldm_patched era, unknown forks) gets the A1111 adapter."""
    version = str(version).strip().lower()
    if version.startswith("2."):
        return "forge"
    if version.startswith("neo"):
        return "neo"
    return "a1111"


def detect_host() -> str:
    """'forge' or 'neo' where Forge's backend UNet patcher is importable, otherwise 'a1111'. Called
    once, when the script module loads."""
    try:
        importlib.import_module("backend.patcher.unet")
        version = importlib.import_module("modules_forge.forge_version").version
    except Exception:
        return "a1111"
    return host_of_version(version)


def make_adapter(host: str):
    if host == "neo":
        from .forge_neo import NeoAdapter

        return NeoAdapter()
    if host == "forge":
        from .forge import ForgeAdapter

        return ForgeAdapter()
    from .a1111 import A1111Adapter

    return A1111Adapter()
