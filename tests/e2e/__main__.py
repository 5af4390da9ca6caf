"""End-to-end checks of Semantic Fidelity in a real WebUI, through its HTTP API and its web UI.

    python -m tests.e2e --host a1111|forge [--extension PATH] [--ui] [--fresh-install] [--screenshots DIR]
    python -m tests.e2e --host a1111|forge|neo [--extension PATH] --compat | --soak | --prompts
    python -m tests.e2e --host a1111|forge|neo [--extension PATH] --browser    (the --ui checks without the API ones)
    any of these with --model sdxl: the same checks on an SDXL-architecture checkpoint (models.py)

The run, against the harness's host (../shared/tools/a1111-e2e, ../shared/tools/forge-e2e):
1. unlinks the extension, restarts the host and takes the baseline without it (a PNG; with --ui
   also the console errors of a plain page load);
2. links this checkout, runs its install.py the way the WebUI launcher does (the host's python,
   cwd and PYTHONPATH = the host's root) and compares pip freeze before and after; with
   --fresh-install spaCy and the pipeline are removed first, so install.py does its whole job;
3. restarts the host (it must still start) and runs the API checks (api_checks.py);
4. with --ui, the browser checks (browser.py) in headless Chromium.
With --compat (compat.py), --soak (soak.py) or --prompts (prompt_checks.py) the run instead links the
extension, restarts the host and runs only that. --extension chooses the checkout that is linked (default: this one).
One line per check (name, PASS/FAIL, seconds), then `N passed, M failed`; exit status 1 on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from . import browser, compat, install_check, models, prompt_checks, soak  # browser needs playwright only for --ui
from .api_checks import ApiChecks
from .common import Api, Checks
from .hosts import EXTENSION_NAME, HOSTS, ROOT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=sorted(HOSTS), required=True)
    parser.add_argument("--ui", action="store_true", help="also serve the web UI and run the browser checks")
    parser.add_argument(
        "--fresh-install",
        action="store_true",
        help="uninstall spaCy and its pipeline first (install.py installs them again)",
    )
    parser.add_argument("--screenshots", type=Path, help="save the accordion and X/Y/Z grid screenshots here")
    parser.add_argument(
        "--extension",
        type=Path,
        default=Path(os.environ.get("SF_E2E_EXTENSION", ROOT)),
        help="the extension checkout linked into the host (default: $SF_E2E_EXTENSION, else this repository)",
    )
    parser.add_argument(
        "--model",
        choices=("sd15", "sdxl"),
        default="sd15",
        help="the checkpoint the checks run on: the harness's SD1.5, or random SDXL-architecture weights",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--compat", action="store_true", help="only the matrix of host tools x our methods")
    only.add_argument("--soak", action="store_true", help="only the 100-request soak run")
    only.add_argument("--prompts", action="store_true", help="only the AND/schedule/BREAK prompt checks")
    only.add_argument(
        "--browser", action="store_true", help="only the browser checks (and their baseline without us); implies --ui"
    )
    args = parser.parse_args(argv)
    host = HOSTS[args.host]
    extension = args.extension.resolve()
    args.ui = args.ui or args.browser
    if args.ui:
        os.environ[host.ui_variable] = "1"  # the harness's restart reads it
    api = Api(host.port)
    checks = Checks()
    started = time.time()

    def harness(*words):
        done = subprocess.run(host.command(*words), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            print(done.stdout[-3000:], flush=True)
            done.check_returncode()

    launch_args = os.environ.get(host.extra_args_variable, "") if host.extra_args_variable else ""
    checkpoint = models.checkpoint_of(host, args.model)
    if checkpoint is not None:
        models.place(host, checkpoint)  # before the first restart: hosts list their models at start

    def restart_with(extra_args: str = "") -> None:
        """Restarts the host with `extra_args` after the user's own launch arguments ('' = as before)
        and waits until its start has finished: Forge answers the API before its scripts are set up,
        and a request in that window fails inside the host (IndexError in init_script_args)."""
        if host.extra_args_variable:
            os.environ[host.extra_args_variable] = f"{launch_args} {extra_args}".strip()
        harness("restart")
        deadline = time.time() + 300
        while host.log is not None and time.time() < deadline:
            if "Startup time" in host.log.read_text(errors="replace"):
                break
            time.sleep(1)
        if checkpoint is not None:
            problem = models.select(api, checkpoint.name)
            if problem:
                raise RuntimeError(problem)

    try:
        if args.compat or args.soak or args.prompts:
            return linked_only(args, host, extension, harness, restart_with, api, checks, started)
        return full_run(args, host, extension, harness, restart_with, api, checks, started)
    finally:
        if checkpoint is not None:  # the next run starts on the harness's model again
            with contextlib.suppress(Exception):  # a host that did not start has no model to choose
                models.select(api, models.SD15)


def full_run(args, host, extension: Path, harness, restart_with, api: Api, checks: Checks, started) -> int:
    """Baseline without the extension, install.py, restart with it, the API checks, the browser checks."""
    baseline: dict[str, bytes] = {}
    baseline_page_errors: list[list[str]] = []

    def take_baseline():
        harness("unlink-ext", EXTENSION_NAME)
        restart_with()
        if api.extension_listed():
            return "the extension is still loaded"
        if host.attention_optimizations:  # an earlier run may have left another one selected
            api.call("/sdapi/v1/options", {"cross_attention_optimization": "Automatic"})
        baseline["txt2img"] = api.generate()[0][0]
        if args.ui:
            baseline_page_errors.extend(browser.host_path_errors(api.url))
            print(f"    the host's own page errors, load by load: {baseline_page_errors}", flush=True)
        return None

    def install():
        harness("link-ext", str(extension), EXTENSION_NAME)
        return install_check.check(host.python, host.root, host.extension_dir, args.fresh_install)

    def host_starts():
        restart_with()
        return None if api.extension_listed() else "not listed in /sdapi/v1/scripts"

    if not checks.run("baseline without the extension", take_baseline):
        print(f"{checks.passed} passed, {checks.failed} failed (no baseline, nothing else run)")
        return 1
    checks.run("install.py as the launcher runs it changes no host package", install)
    if checks.run("host starts with the extension, which loads", host_starts):
        if not args.browser:
            ApiChecks(api, host, baseline, args.screenshots, restart_with).run(checks)
        if args.ui:
            browser.run(checks, api.url, args.screenshots, host.name, baseline_page_errors)
    minutes = (time.time() - started) / 60
    kind = " browser only" if args.browser else " with UI" if args.ui else ""
    what = f"{args.host}{kind}, {args.model}, {minutes:.1f} min"
    print(f"{checks.passed} passed, {checks.failed} failed ({what})")
    return 1 if checks.failed else 0


def linked_only(args, host, extension: Path, harness, restart_with, api: Api, checks: Checks, started) -> int:
    """--compat / --soak / --prompts: link the extension (and, for --compat, the random ControlNet and the
    host options of the matrix's rows), restart, run."""

    def loaded():
        harness("link-ext", str(extension), EXTENSION_NAME)
        if args.compat:
            compat.ensure_controlnet_model(host)
        restart_with()
        if args.compat and compat.set_host_options(api, host):
            restart_with()  # the scripts that an option shows decide at start
        return None if api.extension_listed() else "not listed in /sdapi/v1/scripts"

    print(f"    extension: {extension} at {compat.git_head(extension)}", flush=True)
    if checks.run("host starts with the extension, which loads", loaded):
        part = compat if args.compat else soak if args.soak else prompt_checks
        part.run(api, host, checks)
    kind = "compat" if args.compat else "soak" if args.soak else "prompts"
    what = f"{args.host} {kind}, {args.model}, {(time.time() - started) / 60:.1f} min"
    print(f"{checks.passed} passed, {checks.failed} failed ({what})")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
