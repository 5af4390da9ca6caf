"""What the benchmark measures, through the real extension path: the A1111 stand-in host
(tests/a1111_host.py) with the real script and adapter around the real ldm UNet.

Plain CFG is the same host without the extension. A step is one call of the host's CFG denoiser
(`CFGDenoiser.forward`: the extension's callbacks, the UNet call with every row, the combination);
the harness times it from outside, with `torch.cuda.synchronize()` on CUDA only.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROMPT = "a red book, a gold clock, a green apple and a blue vase on a wooden table"
CONCEPTS_2 = "red book; gold clock"
CONCEPTS_4 = "red book; gold clock; green apple; blue vase"
EDITS_1 = "+ sunglasses : 5"
EDITS_4 = "+ sunglasses : 5; - blur : 4; + golden light : 3; - wooden table : 3"
TARGETS = "red book; gold clock"  # explicit, so regulation needs no spaCy detection
EDIT_1_COOL_025 = "+ sunglasses : 5 : 0.9 : 0.0 : 0.25"  # scale : threshold : warm-up : cool-down

# SDXL's UNet block layout (three levels, attention at the 2x and 4x levels only: input blocks 4, 5,
# 7, 8, the middle block, output blocks 0-5; linear projections), narrowed so that a CPU can run it,
# one transformer per block (SDXL has 2 and 10) and a 768-wide context as the stand-in's encoder gives.
BENCH_CONFIGS = {
    "sdxl-layout": dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=64,
        num_res_blocks=2,
        attention_resolutions=[2, 4],
        channel_mult=[1, 2, 4],
        num_head_channels=32,
        use_spatial_transformer=True,
        transformer_depth=1,  # this ldm's SpatialTransformer breaks on depth > 1 with one context
        context_dim=768,
        use_linear_in_transformer=True,
        legacy=False,
    ),
}


@dataclass(frozen=True)
class Configuration:
    name: str
    values: dict | None  # host.args(**values); None = the host without the extension
    # target on the time ratio: a number, "rows" for (2+K)/2·1.05 with K the extra rows per image,
    # or None (reported only)
    time_target: float | str | None = None
    memory_target: float | None = None
    # share of the steps whose extra rows some method reads (cool-downs): the "rows" target is then
    # 1 + share·K/2·1.05, reachable only where the adapter leaves unread rows out of the UNet batch
    active_share: float = 1.0


CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration("plain-cfg", None),
    Configuration(
        "disabled", dict(enable=False, concepts_enable=True, sega_enable=True, sega_edits=EDITS_4), 1.05, 1.05
    ),
    Configuration("concepts-2", dict(enable=True, concepts_enable=True, concepts=CONCEPTS_2), "rows"),
    Configuration("concepts-4", dict(enable=True, concepts_enable=True, concepts=CONCEPTS_4), "rows"),
    Configuration("sega-1-edit", dict(enable=True, sega_enable=True, sega_edits=EDITS_1), "rows"),
    Configuration("sega-4-edits", dict(enable=True, sega_enable=True, sega_edits=EDITS_4), "rows"),
    Configuration(
        "concepts-2-cool-0.5",
        dict(enable=True, concepts_enable=True, concepts=CONCEPTS_2, concept_cooldown=0.5),
        "rows",
        active_share=0.5,
    ),
    Configuration(
        "sega-1-cool-0.25",
        dict(enable=True, sega_enable=True, sega_edits=EDIT_1_COOL_025, sega_momentum=0.0),
        "rows",
        active_share=0.25,
    ),
    Configuration("s-cfg", dict(enable=True, scfg_enable=True), 1.10, 1.25),
    Configuration("s-cfg-r1", dict(enable=True, scfg_enable=True, scfg_mask_factor=1), None, 1.10),
    Configuration("regulation", dict(enable=True, regulation_enable=True, regulation_targets=TARGETS), 1.20),
    Configuration(
        "all-four",
        dict(
            enable=True,
            concepts_enable=True,
            concepts=CONCEPTS_2,
            sega_enable=True,
            sega_edits=EDITS_1,
            scfg_enable=True,
            regulation_enable=True,
            regulation_targets=TARGETS,
        ),
    ),
)
BY_NAME = {c.name: c for c in CONFIGURATIONS}


# ---------------------------------------------------------------------------------------------
# the model and the host


def _cache_path(model: str, seed: int) -> Path:
    return Path(os.environ.get("SF_BENCH_CACHE", "/tmp")) / f"semantic-fidelity-bench-{model}-seed{seed}.safetensors"


def _read_into_memory(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as copies in the process's own memory, the file closed: weights that stayed
    mapped from the file would be paged in by the first UNet call and counted as the run's growth."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as file:
        return {name: file.get_tensor(name).clone() for name in file.keys()}  # noqa: SIM118 - not a dict


def load_unet(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """`make_unet(model)`; the full-size weights are cached on disk (safetensors) after the first build
    (building 860M or 2.6G random parameters takes a while and every memory subprocess needs them)."""
    from tests.testbed.unet import CONFIGS, make_unet

    if model in BENCH_CONFIGS:
        CONFIGS.setdefault(model, BENCH_CONFIGS[model])  # the bench's own layouts, built like the others
        return make_unet(model, seed=seed, dtype=dtype, device=device)
    if model == "tiny":
        return make_unet(model, seed=seed, dtype=dtype, device=device)
    from safetensors.torch import save_file  # no pickle: plain tensors on disk

    path = _cache_path(model, seed)
    if path.exists():
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        from tests.testbed.unet import SdxlUNetModel

        layout = dict(CONFIGS[model])
        with torch.device("meta"):  # no random init: the file has every weight
            unet = (SdxlUNetModel if layout.get("num_classes") == "sequential" else UNetModel)(**layout)
        unet.load_state_dict(_read_into_memory(path), assign=True)
        return unet.eval().to(device=device, dtype=dtype)
    unet = make_unet(model, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({name: t.contiguous() for name, t in unet.state_dict().items()}, tmp)
    tmp.replace(path)
    return unet.to(device=device, dtype=dtype)


_placed: dict = {}


def place_stand_in(device: str) -> None:
    """Make the stand-in host's CPU-built tensors (noise, conditioning, sigma schedule) follow the
    UNet's device. Harness-only patches of the stand-in classes; nothing on CPU changes."""
    from modules import processing, sd_models

    if device == "cpu" or _placed.get(id(processing)) == device:  # once per import of the stand-in
        return
    from tests.testbed import sampling

    noise = processing.StableDiffusionProcessing.noise
    encode = sd_models.StandInSdModel.get_learned_conditioning
    init = sampling.CompVisEpsDenoiser.__init__
    get_sigmas = sampling.CompVisEpsDenoiser.get_sigmas

    def noise_on_device(self, *args, **kwargs):
        return noise(self, *args, **kwargs).to(device)

    def encode_on_device(self, texts):
        return encode(self, texts).to(device)

    def init_on_device(self, unet, *schedule):
        init(self, unet, *schedule)
        self.sigmas, self.log_sigmas = self.sigmas.to(device), self.log_sigmas.to(device)

    def sigmas_on_device(self, steps):
        saved = self.log_sigmas
        self.log_sigmas = saved.cpu()
        try:
            return get_sigmas(self, steps).to(device)
        finally:
            self.log_sigmas = saved

    processing.StableDiffusionProcessing.noise = noise_on_device
    sd_models.StandInSdModel.get_learned_conditioning = encode_on_device
    sampling.CompVisEpsDenoiser.__init__ = init_on_device
    sampling.CompVisEpsDenoiser.get_sigmas = sigmas_on_device
    _placed[id(processing)] = device


class StepTimer:
    """Times every call of the host's CFG denoiser (class-level wrap of `CFGDenoiser.forward`)."""

    def __init__(self, device: str):
        from modules import sd_samplers_cfg_denoiser

        self.cls = sd_samplers_cfg_denoiser.CFGDenoiser
        self.original = self.cls.forward
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.times: list[float] = []
        timer = self

        def timed_forward(denoiser, *args, **kwargs):
            timer.sync()
            start = time.perf_counter()
            result = timer.original(denoiser, *args, **kwargs)
            timer.sync()
            timer.times.append(time.perf_counter() - start)
            return result

        self.cls.forward = timed_forward

    def take(self) -> list[float]:
        times, self.times = self.times, []
        return times


@dataclass
class Bench:
    model: str
    device: str
    dtype: torch.dtype
    size: int
    steps: int
    host: object = None
    timer: StepTimer | None = None
    _modules: object = None

    def __post_init__(self):
        from tests.a1111_host import a1111_modules

        self._modules = a1111_modules()
        self._modules.__enter__()
        place_stand_in(self.device)
        self._load()
        self.timer = StepTimer(self.device)

    def _load(self) -> None:
        """The UNet and the stand-in host around it."""
        from tests.a1111_host import A1111StandIn

        self.host = A1111StandIn(load_unet(self.model, self.device, self.dtype))
        model = self.host.shared.sd_model
        model.cond_stage_model_empty_prompt = model.cond_stage_model_empty_prompt.to(self.device)

    def release(self) -> None:
        """Drops the UNet while the memory subprocesses run (SDXL's is 10 GB in float32: two copies
        would not fit a 24 GB machine); the next generation loads it again."""
        import gc

        self.host = None
        gc.collect()

    def close(self) -> None:
        """Back to plain `modules` (the stand-in's sys.path entry and modules removed)."""
        if self._modules is not None:
            self._modules.__exit__(None, None, None)
            self._modules = None

    def autocast(self):
        if self.device.startswith("cuda") and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def generate(self, configuration: Configuration, batch: int, steps: int | None = None):
        fields = dict(
            prompt=PROMPT,
            width=8 * self.size,
            height=8 * self.size,
            steps=steps or self.steps,
            batch_size=batch,
            cfg_scale=7.0,
            seed=1,
        )
        if self.host is None:
            self._load()
        with self.autocast():
            if configuration.values is None:
                processed = self.host.generate(extension=False, **fields)
            else:
                processed = self.host.generate(args=self.host.args(**configuration.values), **fields)
        if processed.errors:
            raise RuntimeError(f"{configuration.name}: the extension reported\n" + "\n".join(processed.errors))
        rows = list(processed.p.sampler.model_wrap_cfg.unet_calls)
        return processed, rows


# ---------------------------------------------------------------------------------------------
# memory


def _proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def _reset_peak() -> bool:
    """Linux ≥ 4.0: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        status = _proc_status()
        return status["VmHWM"] <= status["VmRSS"] + 64 * 1024
    except OSError:
        return False


CPU_MEMORY_METHOD = (
    "CPU memory, in a fresh subprocess per (configuration, repeat) after the host and UNet are loaded: "
    "peak tensor bytes of one whole generation (every tensor storage an operation creates, counted "
    "until it is freed: the CPU counterpart of torch.cuda.max_memory_allocated, kernels' internal "
    "scratch left out), the figure the targets apply to; beside it 'rss x', the peak resident set "
    "growth of a first generation (VmHWM after - VmRSS before, peak reset through /proc/self/clear_refs), "
    "which also holds what the C allocator keeps after frees"
)


class TensorBytes:
    """Peak bytes of the tensor storages created while it is entered (a TorchDispatchMode sees every
    operation's outputs; a storage counts from its first output until Python frees it). Storages
    that existed before (weights, caches) are not counted: the figure is the peak growth."""

    def __init__(self):
        import gc
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        gc.collect()
        before = {id(t.untyped_storage()) for t in gc.get_objects() if isinstance(t, torch.Tensor)}
        live: dict[int, int] = {}
        tracker = self
        self.now = self.peak = 0

        def freed(key: int) -> None:
            tracker.now -= live.pop(key)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in out if isinstance(out, (tuple, list)) else (out,):
                    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                        continue
                    storage = tensor.untyped_storage()
                    key = id(storage)
                    if key in live or key in before:
                        continue
                    live[key] = storage.nbytes()
                    weakref.finalize(storage, freed, key)
                    tracker.now += live[key]
                    tracker.peak = max(tracker.peak, tracker.now)
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def memory_child(options: dict) -> dict:
    """One fresh process: load host + UNet; reset the peak, run one generation, take the resident
    growth; then a second generation under `TensorBytes` for the peak tensor bytes."""
    torch.set_num_threads(options["threads"])
    bench = Bench(options["model"], "cpu", torch.float32, options["size"], options["steps"])
    import gc

    gc.collect()
    exact = _reset_peak()
    if exact:
        before = _proc_status()["VmRSS"]
    else:  # fallback: ru_maxrss, which cannot be reset (the baseline is the load's own peak)
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bench.generate(BY_NAME[options["configuration"]], options["batch"])
    if exact:
        peak = _proc_status()["VmHWM"]
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with TensorBytes() as tensors:
        bench.generate(BY_NAME[options["configuration"]], options["batch"])
    return dict(tensors=tensors.peak, growth=peak - before, baseline=before, exact=exact)


def run_memory_child(options: dict) -> dict:
    import subprocess

    command = [sys.executable, "-m", "tests.bench", "--memory-child", json.dumps(options)]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess failed for {options['configuration']}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Result:
    configuration: Configuration
    batch: int
    runs: list[list[float]] = field(default_factory=list)  # per repeat: the step times
    rows: list[int] = field(default_factory=list)  # UNet rows per call (first repeat)
    memory: list[float] = field(default_factory=list)  # per repeat: peak bytes (CUDA allocated, CPU tensors)
    resident: list[float] = field(default_factory=list)  # CPU, per repeat: peak resident growth

    @property
    def step_time(self) -> float:
        """Mean over the run's steps of each step's median over repeats (steps differ in cost:
        warm-ups, regulation's end), so noise from other processes drops out step by step."""
        per_step = [statistics.median(times) for times in zip(*self.runs, strict=False)]
        return sum(per_step) / len(per_step)

    @property
    def extra_rows(self) -> float:
        """K: extra UNet rows per image per step (the most in any step)."""
        per_step = max(self.rows) if self.rows else 0
        return per_step / self.batch - 2


def alternate(items: Sequence, round_index: int) -> list:
    """Round r starts at a different configuration, and odd rounds go backwards: no configuration
    always follows the same one."""
    shift = round_index % len(items)
    order = list(items[shift:]) + list(items[:shift])
    return order[::-1] if round_index % 2 else order


def measure(
    bench: Bench,
    configurations: Sequence[Configuration],
    batch: int,
    repeats: int,
    warmup_steps: int,
    memory_repeats: int,
    threads: int,
    log=print,
) -> dict[str, Result]:
    results = {c.name: Result(c, batch) for c in configurations}
    cuda = bench.device.startswith("cuda")
    log(f"# batch {batch}: warm-up ({warmup_steps} steps per configuration)")
    for configuration in configurations:
        bench.generate(configuration, batch, steps=warmup_steps)
        bench.timer.take()
    for round_index in range(repeats):
        started = time.perf_counter()
        for configuration in alternate(configurations, round_index):
            result = results[configuration.name]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            _, rows = bench.generate(configuration, batch)
            if cuda:
                torch.cuda.synchronize()
                result.memory.append(torch.cuda.max_memory_allocated() - base)
            result.runs.append(bench.timer.take())
            if not result.rows:
                result.rows = rows
        log(f"# batch {batch}: timing round {round_index + 1}/{repeats} ({time.perf_counter() - started:.1f} s)")
    if not cuda:
        bench.release()
        for round_index in range(memory_repeats):
            started = time.perf_counter()
            for configuration in alternate(configurations, round_index):
                options = dict(
                    model=bench.model,
                    size=bench.size,
                    steps=bench.steps,
                    batch=batch,
                    configuration=configuration.name,
                    threads=threads,
                )
                child = run_memory_child(options)
                results[configuration.name].memory.append(child["tensors"])
                results[configuration.name].resident.append(child["growth"])
            log(
                f"# batch {batch}: memory round {round_index + 1}/{memory_repeats} "
                f"({time.perf_counter() - started:.1f} s)"
            )
    return results
