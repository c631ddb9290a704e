"""Timing for the benchmarks: interleaved repetitions (variants take turns, in a fresh seeded
order each time, so the machine's drift hits them alike), medians, and what ran them."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device | str = "cpu") -> str:
    """What ran a benchmark, for its JSON: the GPU's name, or the CPU's model and how many
    cores this process may use (platform.processor() is often just "x86_64")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    return f"{name}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def write_result(result: dict, out) -> dict:
    """A benchmark script's result: written as JSON to out (its folder made), printed, returned."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def turn_orders(names: list, repeats: int) -> list[list]:
    """The order of the variants in each repetition: a fresh permutation every time (seeded, so
    runs repeat), so that no variant always runs right after the same other one. A variant that
    follows one with large tensors finds cold caches and a freshly trimmed heap; rotating one
    fixed order would not help, as every variant would keep its predecessor."""
    rng = random.Random(0)
    return [rng.sample(names, len(names)) for _ in range(repeats)]


def timeit(fns: dict, device, repeats: int, warmup: int = 2) -> dict:
    """Median wall time in seconds of each of fns' callables. The variants take turns within
    every repetition, so a drift in the machine's speed (these shared machines swing by 1.5x)
    hits them alike and their ratios stay meaningful; the turn order changes from one
    repetition to the next (turn_orders)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for order in turn_orders(list(fns), repeats):
        for name in order:
            fn = fns[name]
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(device, repeats: int) -> float:
    """Measured float32 GEMM rate (GFLOP/s) on square matrices: the roofline's compute roof."""
    n = 4096 if device.type == "cuda" else 1536
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timeit({"mm": lambda: torch.mm(a, b)}, device, repeats)["mm"] / 1e9
