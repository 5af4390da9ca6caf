"""`--soak` (issue 16.6): 100 mixed requests against one host, then its memory and its plain output.

The requests cycle through every method alone and all together, three samplers, batch 1 and 2,
hires fix and img2img; every tenth is interrupted (POST /sdapi/v1/interrupt from a thread while it
samples). Passes when every request answered with images, the host process's resident memory
(VmRSS in /proc/PID/status) grew by at most 100 MB from request 10 to request 100, and a request
without the extension decodes to the same pixels as the baseline taken first.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

from .api_checks import METHODS
from .common import Api, Checks, same_pixels, with_extension
from .hosts import Host

REQUESTS = 100
RSS_GROWTH_LIMIT_MB = 100.0
SAMPLERS = ("Euler", "Euler a", "DPM++ 2M")
INTERRUPT_EVERY = 10
INTERRUPT_AFTER_S = 3.0  # a 64x64 request samples for about 8 s on 2 cores
COMBINATIONS = [[name] for name in METHODS] + [list(METHODS)]


def resident_mb(pid: int) -> float:
    """The process's resident set size in MB, from /proc/PID/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def host_pid(host: Host) -> int:
    """The host's process id, from the pid file its harness keeps beside its log."""
    return int((host.log.parent / f"{host.name}.pid").read_text().split()[0])


def soak_request(i: int, hires_extra: dict) -> tuple[str, list | bool, dict]:
    """Request number i (0-based): (kind, our args, request overrides); every sixth is without us."""
    if i % 6 == 5:
        extension_args: list | bool = [False]
    else:
        values = {}
        for name in COMBINATIONS[i % len(COMBINATIONS)]:
            values.update(METHODS[name])
        extension_args = with_extension(**values)
    request = {"sampler_name": SAMPLERS[i % len(SAMPLERS)], "seed": 1000 + i, "batch_size": 1 + (i // 2) % 2}
    kind = "txt2img"
    if i % 7 == 3:
        request.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2)
        request.update(denoising_strength=0.6, **hires_extra)
    elif i % 7 == 6:
        kind = "img2img"
        request.update(denoising_strength=0.6)
    return kind, extension_args, request


def interrupt_later(api: Api, seconds: float) -> threading.Thread:
    """Starts a thread that asks the host to interrupt the running request after `seconds`."""

    def interrupt():
        time.sleep(seconds)
        api.call("/sdapi/v1/interrupt", {})

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


class Soak:
    def __init__(self, api: Api, host: Host):
        self.api, self.host = api, host
        self.baseline: list[bytes] = []
        self.rss: dict[int, float] = {}  # request number (1-based) -> host RSS in MB after it
        self.failures: list[str] = []

    def one(self, i: int) -> None:
        kind, extension_args, request = soak_request(i, self.host.hires_extra)
        if kind == "img2img":
            request["init_images"] = [base64.b64encode(self.baseline[0]).decode()]
        interrupter = interrupt_later(self.api, INTERRUPT_AFTER_S) if (i + 1) % INTERRUPT_EVERY == 0 else None
        try:
            images, _ = self.api.generate(extension_args, kind=kind, **request)
            if not images:
                self.failures.append(f"request {i + 1} ({kind}, {request['sampler_name']}): no image")
        except Exception as error:
            self.failures.append(f"request {i + 1} ({kind}, {request['sampler_name']}): {error}")
        if interrupter is not None:
            interrupter.join()

    def requests(self) -> str | None:
        """The baseline, then the 100 requests; None when each answered with images."""
        self.baseline = self.api.generate([False])[0]
        pid, started = host_pid(self.host), time.time()
        for i in range(REQUESTS):
            self.one(i)
            self.rss[i + 1] = resident_mb(pid)
            if (i + 1) % 10 == 0:
                minutes = (time.time() - started) / 60
                print(f"    after request {i + 1}: host RSS {self.rss[i + 1]:.0f} MB, {minutes:.1f} min", flush=True)
        return "; ".join(self.failures[:5]) or None

    def memory(self) -> str | None:
        """None when the host's RSS grew by at most the limit from request 10 to request 100."""
        if 10 not in self.rss or REQUESTS not in self.rss:
            return "the requests did not run"
        growth = self.rss[REQUESTS] - self.rss[10]
        print(f"    host RSS: {self.rss[10]:.0f} MB after request 10, {self.rss[REQUESTS]:.0f} MB after {REQUESTS}")
        return None if growth <= RSS_GROWTH_LIMIT_MB else f"grew by {growth:.0f} MB (limit {RSS_GROWTH_LIMIT_MB:.0f})"

    def plain_unchanged(self) -> str | None:
        images, _ = self.api.generate([False])
        return None if same_pixels(images, self.baseline) else "the request without the extension differs"


def run(api: Api, host: Host, checks: Checks) -> None:
    soak = Soak(api, host)
    checks.run(f"soak: {REQUESTS} mixed requests answer (every {INTERRUPT_EVERY}th interrupted)", soak.requests)
    checks.run(f"soak: host RSS grows <= {RSS_GROWTH_LIMIT_MB:.0f} MB from request 10 to {REQUESTS}", soak.memory)
    checks.run("soak: then without the extension, same pixels as the first baseline", soak.plain_unchanged)
