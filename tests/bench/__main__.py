"""`python -m tests.bench [--quick] [--issue16] [--device cpu|cuda] [--dtype fp32|fp16] [--model tiny|sd15|sdxl]
[--size N ...] [--batch 1 4] [--repeats R]`: step time and peak memory of every configuration as
ratios to plain CFG measured in the same run. Run by hand, not by CI."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from tests.bench.harness import BY_NAME, CONFIGURATIONS, CPU_MEMORY_METHOD, Bench, Result, measure, memory_child

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the test-bed UNet only, on CPU (< 3 minutes)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument(
        "--model",
        choices=("tiny", "sd15", "sdxl-layout", "sdxl"),
        action="append",
        help="default: tiny (+ sd15 unless --quick); sdxl: SDXL's full-size UNet layout (2.6G parameters)",
    )
    parser.add_argument(
        "--issue16",
        action="store_true",
        help="issue 16's rows: S-CFG memory (SD1.5 layout R=1, SDXL layout batch 4) and scheduled extra rows",
    )
    parser.add_argument(
        "--size", type=int, nargs="+", help="latent sizes (default tiny 16; sd15 32 on CPU, 64 128 on GPU)"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timing rounds (default 2 quick, 3 full; 1 for sd15 on CPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="sampling steps per run (default 6, 4 with --quick, 3 for sd15 on CPU)"
    )
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--memory-repeats", type=int, default=None, help="CPU memory subprocesses per configuration")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 1 on CPU: steadier ratios, no OpenMP thrashing)",
    )
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGURATIONS[1:]], help="a subset")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        args.device = "cpu"
        args.model = args.model or ["tiny"]
    if args.dtype is None:
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if args.dtype == "fp16" and args.device != "cuda":
        parser.error("fp16 is measured on CUDA only")
    args.model = args.model or ["tiny", "sd15"]
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else torch.get_num_threads()
    return args


def machine(args) -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"machine: CPU {cpu} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, python {platform.python_version()}",
    ]
    if args.device == "cuda":
        lines.append(f"device: cuda {torch.cuda.get_device_name()} {args.dtype} (autocast), CUDA {torch.version.cuda}")
    else:
        lines.append(f"device: cpu {args.dtype}")
    if hasattr(os, "getloadavg"):
        lines.append("load average at start: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    return lines


def time_target(result: Result) -> float | None:
    target = result.configuration.time_target
    if target == "rows" and result.configuration.active_share < 1:
        return 1 + result.configuration.active_share * result.extra_rows / 2 * 1.05
    if target == "rows":
        return (2 + result.extra_rows) / 2 * 1.05
    return target


def verdict(value: float, target: float | None) -> str:
    if target is None:
        return "-"
    return "PASS" if value <= target else "MISS"


def spread(result: Result, plain: Result) -> str:
    """The time ratio of each round on its own (same round's plain CFG): min-max, to see the noise."""
    per_round = [sum(a) / sum(b) for a, b in zip(result.runs, plain.runs, strict=False) if sum(b) > 0]
    if len(per_round) < 2:
        return "-"
    return f"{min(per_round):.2f}-{max(per_round):.2f}"


def median_ratio(values: list[float], plain: list[float]) -> float:
    if not values or not plain or statistics.median(plain) <= 0:
        return float("nan")
    return statistics.median(values) / statistics.median(plain)


def table(results: dict[str, Result], label: str, memory_kind: str) -> tuple[list[str], list[str]]:
    plain = results["plain-cfg"]
    plain_time = plain.step_time
    resident = bool(plain.resident)  # CPU: the resident growth beside the tensor peak
    header = (
        f"{'configuration':<24}{'K':>4}{'step ms':>10}{memory_kind + ' MiB':>12}"
        f"{'time x':>8}{'target':>8}{'':>6}{'rounds x':>12}{'mem x':>8}{'target':>8}{'':>6}"
        + (f"{'rss x':>8}" if resident else "")
    )
    lines, ratios = [header, "-" * len(header)], []
    for name, result in results.items():
        step = result.step_time
        memory = statistics.median(result.memory) if result.memory else float("nan")
        t_ratio = step / plain_time
        m_ratio = median_ratio(result.memory, plain.memory)
        r_ratio = median_ratio(result.resident, plain.resident)
        t_target, m_target = time_target(result), result.configuration.memory_target
        if name == "plain-cfg":
            t_target = m_target = None
        k = f"{result.extra_rows:.0f}" if result.rows else "?"
        lines.append(
            f"{name + '/b' + str(result.batch):<24}{k:>4}{step * 1e3:>10.1f}{memory / 2**20:>12.1f}"
            f"{t_ratio:>8.2f}{'<=' + format(t_target, '.2f') if t_target else '-':>8}{verdict(t_ratio, t_target):>6}"
            f"{spread(result, plain):>12}"
            f"{m_ratio:>8.2f}{'<=' + format(m_target, '.2f') if m_target else '-':>8}{verdict(m_ratio, m_target):>6}"
            + (f"{r_ratio:>8.2f}" if resident else "")
        )
        if name != "plain-cfg":
            line = f"ratio {name}/b{result.batch} time={t_ratio:.2f} memory={m_ratio:.2f}"
            ratios.append(line + (f" resident={r_ratio:.2f}" if resident else ""))
    return lines, ratios


def issue16_sections(cuda: bool) -> list[dict]:
    """Issue 16's rows. On CUDA at the issue's sizes; on a CPU at reduced sizes, said in the output."""
    memory = ["s-cfg", "s-cfg-r1"]
    schedule = ["concepts-2", "concepts-2-cool-0.5", "sega-1-edit", "sega-1-cool-0.25"]
    if cuda:
        return [
            dict(model="sd15", size=128, batch=1, names=memory, steps=6, note="SD1.5 hires 1024² R=1"),
            dict(model="sdxl-layout", size=128, batch=4, names=memory, steps=6, note="SDXL layout 1024² batch 4"),
            dict(model="sd15", size=64, batch=1, names=schedule, steps=8, note="scheduled extra rows"),
        ]
    reduced = "REDUCED SIZE ON CPU: "
    sd15 = "SD1.5 hires R=1 as SD1.5's full-width UNet at latent 64 (512 px), not 1024²"
    test_bed = "SD1.5 hires R=1 on the SD1.5-layout test bed (width 32, heads of 4) at latent 64 (512 px)"
    sdxl = "SDXL layout with narrow channels at latent 32 (256 px) batch 4, not SDXL at 1024²"
    scheduled = "scheduled extra rows on the SD1.5-layout test bed, latent 16"
    return [
        dict(model="sd15", size=64, batch=1, names=memory, steps=2, note=reduced + sd15),
        dict(model="tiny", size=64, batch=1, names=memory, steps=3, note=reduced + test_bed),
        dict(model="sdxl-layout", size=32, batch=4, names=memory, steps=3, note=reduced + sdxl),
        dict(model="tiny", size=16, batch=1, names=schedule, steps=8, note=reduced + scheduled),
    ]


def run_section(args, memory_kind: str, model: str, size: int, batch: int, names, steps: int, note: str) -> None:
    """One model, size and batch: the named configurations against plain CFG of the same run."""
    configurations = [BY_NAME["plain-cfg"]] + [BY_NAME[name] for name in names]
    repeats = args.repeats or (1 if model in ("sd15", "sdxl") and args.device == "cpu" else 2)
    bench = Bench(model, args.device, DTYPES[args.dtype], size, steps)
    print(f"\n## {note}: model {model}, latent {size}x{size}, batch {batch}, {steps} steps", flush=True)
    results = measure(
        bench,
        configurations,
        batch,
        repeats,
        args.warmup_steps,
        args.memory_repeats or 1,
        args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    lines, ratios = table(results, f"{model}/{size}", memory_kind)
    print("\n".join(lines))
    print("\n".join(ratios), flush=True)
    bench.close()


def main(argv=None) -> int:
    args = parse(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("Semantic Fidelity benchmark", "(quick)" if args.quick else "(full)")
    for line in machine(args):
        print(line)
    cuda = args.device == "cuda"
    memory_kind = "peak" if cuda else "tensors"
    print(
        "memory: "
        + (
            "CUDA peak allocated (torch.cuda.max_memory_allocated - allocated before the run, reset per run)"
            if cuda
            else CPU_MEMORY_METHOD
        )
    )
    print(
        "time: per host CFG-denoiser call (extension callbacks + UNet with every row + CFG combination); "
        "per step the median over repeats, then the mean over the run's steps; configurations alternate "
        "each round after a warm-up run of each"
    )
    if args.issue16:
        for section in issue16_sections(cuda):
            run_section(args, memory_kind, **section)
        print(f"\nwall time {time.perf_counter() - started:.0f} s")
        return 0
    configurations = [BY_NAME["plain-cfg"]] + [
        BY_NAME[n] for n in (args.configs or [c.name for c in CONFIGURATIONS[1:]])
    ]
    for model in args.model:
        if args.size:
            sizes = args.size
        elif model == "tiny" or (model == "sdxl" and not cuda):
            sizes = [16]  # SDXL's full UNet on a CPU: 2.6G parameters, seconds a row even at 128 px
        else:
            sizes = [64, 128] if cuda else [32]
        full_on_cpu = model in ("sd15", "sdxl") and not cuda
        # --quick stays under 3 minutes on a 2-core CPU: fewer steps and rounds for the test bed
        steps = args.steps or (3 if full_on_cpu else 4 if args.quick else 6)
        repeats = args.repeats or (1 if full_on_cpu else 2 if args.quick else 3)
        memory_repeats = args.memory_repeats or 1
        for size in sizes:
            load_started = time.perf_counter()
            bench = Bench(model, args.device, DTYPES[args.dtype], size, steps)
            print(
                f"\n## model {model}, latent {size}x{size}, {steps} steps, {repeats} timing rounds, "
                f"{'' if cuda else str(memory_repeats) + ' memory subprocesses per configuration, '}"
                f"loaded in {time.perf_counter() - load_started:.1f} s",
                flush=True,
            )
            for batch in args.batch:
                section = time.perf_counter()
                results = measure(
                    bench,
                    configurations,
                    batch,
                    repeats,
                    args.warmup_steps,
                    memory_repeats,
                    args.threads,
                    log=lambda line: print(line, file=sys.stderr, flush=True),
                )
                lines, ratios = table(results, f"{model}/{size}", memory_kind)
                print(f"\n{model}, latent {size}x{size}, batch {batch} ({time.perf_counter() - section:.0f} s)")
                print("\n".join(lines))
                print("\n".join(ratios), flush=True)
            bench.close()
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
