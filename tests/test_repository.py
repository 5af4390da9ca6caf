"""Facts about the repository that the WebUI and CI rely on."""

import re
from pathlib import Path

from guidance.params import PARAMS

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_folder_holds_one_script():
    # the WebUI executes every .py in scripts/ as a script module
    assert sorted(p.name for p in (ROOT / "scripts").iterdir() if p.suffix == ".py") == ["semantic_fidelity.py"]


def test_layout():
    for path in [
        "guidance/__init__.py",
        "guidance/params.py",
        "guidance/prompts.py",
        "guidance/engine.py",
        "guidance/attention.py",
        "guidance/methods/__init__.py",
        "guidance/hosts/__init__.py",
        "javascript/semantic_fidelity.js",
        "style.css",
        "install.py",
        "README.md",
        "pyproject.toml",
        "requirements.txt",
        "requirements-test.txt",
        ".ci/run",
    ]:
        assert (ROOT / path).is_file(), path


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Run the tests:\n\n```sh\n(.+)\n```", readme).group(1)
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert command == "python -m pytest -q"
    assert command in ci_lines


def test_readme_documents_every_control():
    readme = (ROOT / "README.md").read_text()
    for param in PARAMS:
        assert f"| `{param.key}` | {param.label} |" in readme, param.key


def test_core_uses_no_pickle_and_no_network():
    for path in list((ROOT / "guidance").rglob("*.py")) + [ROOT / "scripts/semantic_fidelity.py"]:
        text = path.read_text()
        assert not re.search(r"\bpickle\b|torch\.load\(|urllib|requests\.", text), path


def test_guidance_uses_relative_imports_only():
    # the script may load the package under another name when a PyPI 'guidance' is imported first
    for path in (ROOT / "guidance").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) guidance\b", path.read_text(), re.M), path
