"""Stand-in for the WebUI's `launch` module (../shared/hosts/a1111.md §9) for install.py tests.

Behaviour comes from SF_LAUNCH_SCENARIO (JSON): `installed` names, and commands that `fail`.
Every call is appended to the JSON lines file SF_LAUNCH_LOG; run_pip also records the contents of
a constraints file it is given.
"""

import json
import os
import re

_SCENARIO = json.loads(os.environ["SF_LAUNCH_SCENARIO"])


def _log(entry):
    with open(os.environ["SF_LAUNCH_LOG"], "a") as file:
        file.write(json.dumps(entry) + "\n")


def is_installed(package):
    _log({"call": "is_installed", "package": package})
    return package in _SCENARIO["installed"]


def run_pip(command, desc=None, live=False):
    entry = {"call": "run_pip", "command": command, "desc": desc}
    match = re.search(r'-c "([^"]+)"', command)
    if match:
        with open(match.group(1)) as file:
            entry["constraints"] = file.read().split()
    _log(entry)
    if any(word in command for word in _SCENARIO.get("fail", [])):
        raise RuntimeError(f"Couldn't install {desc}.")
    return ""


def run(command, desc=None, errdesc=None, custom_env=None, live=False):
    _log({"call": "run", "command": command})
    if any(word in command for word in _SCENARIO.get("fail", [])):
        raise RuntimeError(f"{errdesc or 'Error running command'}.\nCommand: {command}\nError code: 1")
    return ""
