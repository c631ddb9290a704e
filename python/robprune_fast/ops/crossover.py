"""When path="auto" takes the compressed path: below a mask density that is measured, per layer
shape and machine, rather than guessed.

On the first auto call of a key (op, batch rounded up to a power of two, the other input and
weight dimensions, geometry, dtype, device (a GPU by its model), threads; the kernels' and
torch's versions) the dense and the compressed layer are timed, forward + backward, interleaved,
on random masks of three densities (on a GPU each call synchronised, so the time is the work's,
not the launch's; the dense layer there is cuBLAS / cuDNN, which the compressed path must beat
to be taken); the compressed path's time grows about linearly with the density, so
interpolating between the timed densities gives the one at which it meets the dense time: the
crossover. It lands in a small JSON table in the cache directory
($ROBPRUNE_CACHE, else the user's, see data.default_cache_dir) and every later process reuses
it. A measurement costs well under a second: the batch is cut down where the layer is large
(the ratio of the two paths hardly depends on it).

Forcing: ``set_crossover(d)`` or the environment variable ROBPRUNE_SPARSE_CROSSOVER=d makes d
the crossover of every key (0: auto never takes the compressed path, 1: always, where a mask
prunes anything); ``set_crossover(None)`` goes back to the table. Tests force it.
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from pathlib import Path

import torch

ENV = "ROBPRUNE_SPARSE_CROSSOVER"
TABLE_NAME = "sparse_crossover.json"
# Part of every key: bump it when the kernels of either path change speed, so that a table
# measured with the old ones is not reused (torch's version is in the key too).
KERNELS = "3"
# Densities the compressed path is timed at, and the work (multiply-adds of one dense forward)
# a measurement's batch is cut down to.
DENSITIES = (0.05, 0.25, 0.6)
WORK = 3e8
REPEATS = 3

_forced: float | None = None
_table: dict[str, float] | None = None


def set_crossover(value: float | None) -> None:
    """Force the crossover of every key to value (in [0, 1]), or None to use the measured table."""
    global _forced
    if value is not None and not 0 <= value <= 1:
        raise ValueError(f"crossover must lie in [0, 1], got {value!r}")
    _forced = value


def table_path() -> Path:
    from ..data import default_cache_dir

    return default_cache_dir() / TABLE_NAME


def _load() -> dict[str, float]:
    global _table
    if _table is None:
        try:
            _table = {k: float(v) for k, v in json.loads(table_path().read_text()).items()}
        except (OSError, ValueError, AttributeError):
            _table = {}
    return _table


def _save(table: dict[str, float]) -> None:
    from .._atomic import atomic_write

    path = table_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1, sort_keys=True)))


def reset_table() -> None:
    """Forget the table this process loaded (the next lookup reads the file again)."""
    global _table
    _table = None


def _forced_value() -> float | None:
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV)
    if env:
        value = float(env)
        if not 0 <= value <= 1:
            raise ValueError(f"{ENV} must lie in [0, 1], got {env!r}")
        return value
    return None


def device_key(device: torch.device) -> str:
    """The device part of a key: the device type, and a GPU's model (one machine may hold
    several kinds, each with its own crossover)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def key(op: str, x_shape, weight_shape, geometry, dtype: torch.dtype, device: torch.device) -> str:
    """The table's key: op, batch (rounded up to a power of two), input and weight shapes,
    geometry, dtype, device, threads, and the versions of the kernels and of torch."""
    batch = 1 << max(0, math.ceil(math.log2(max(x_shape[0], 1))))
    rest = tuple(x_shape[1:])
    return (f"{op}|batch={batch}|x={rest}|w={tuple(weight_shape)}|geometry={tuple(map(str, geometry))}|"
            f"{str(dtype).replace('torch.', '')}|{device_key(device)}|threads={torch.get_num_threads()}|"
            f"kernels={KERNELS}|torch={torch.__version__}")


def crossover(op: str, x_shape, weight_shape, geometry, dtype: torch.dtype, device: torch.device) -> float:
    """The density below which the compressed path is faster for a layer call (measured once per
    key, see the module docstring). op: "linear" (x_shape (N, in_features)) or "conv2d" (x_shape
    (N, C, H, W); geometry: stride, padding, dilation as pairs, groups)."""
    forced = _forced_value()
    if forced is not None:
        return forced
    k = key(op, x_shape, weight_shape, geometry, dtype, device)
    table = _load()
    if k not in table:
        table[k] = measure(op, tuple(x_shape), tuple(weight_shape), geometry, dtype, device)
        _save(table)
    return table[k]


def measure(op: str, x_shape, weight_shape, geometry, dtype, device) -> float:
    """Times the dense and the compressed layer (forward + backward into x, weight and bias) on
    random data and returns the crossover density, 0 when the compressed path never wins."""
    from .masked import masked_conv2d, masked_linear

    per_sample = math.prod(weight_shape) * (math.prod(x_shape[2:]) if op == "conv2d" else 1)
    batch = max(1, min(x_shape[0], int(WORK // max(per_sample, 1))))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *x_shape[1:], generator=g, dtype=dtype).to(device).requires_grad_(True)
    weight = torch.randn(*weight_shape, generator=g, dtype=dtype).to(device).requires_grad_(True)
    bias = torch.zeros(weight_shape[0], dtype=dtype, device=device, requires_grad=True)
    masks = {d: (torch.rand(*weight_shape, generator=g) < d).to(dtype=dtype, device=device) for d in DENSITIES}

    def run(path, mask):
        def step():
            if op == "linear":
                y = masked_linear(x, weight, bias, mask, path=path)
            else:
                y = masked_conv2d(x, weight, bias, mask, *geometry, path=path)
            y.sum().backward()
        return step

    fns = {"dense": run("dense", masks[DENSITIES[0]])}
    fns.update({d: run("sparse", m) for d, m in masks.items()})
    with torch.inference_mode(False), torch.enable_grad():
        times = _timeit(fns, device)
    return crossing(times["dense"], [(d, times[d]) for d in DENSITIES])


def crossing(dense: float, sparse: list) -> float:
    """The density at which the compressed path's time, interpolated piecewise linearly between
    the timed (density, time) points (and extrapolated past the last, up to 1), meets the dense
    time; 0 when it is slower already at the lowest density."""
    if sparse[0][1] >= dense:
        return 0.0
    for (d0, t0), (d1, t1) in zip(sparse, sparse[1:]):
        if t1 >= dense:
            return d0 + (d1 - d0) * (dense - t0) / (t1 - t0)
    (d0, t0), (d1, t1) = sparse[-2:]
    if t1 <= t0:  # within the noise: faster at every timed density
        return 1.0
    return min(1.0, d1 + (d1 - d0) * (dense - t1) / (t1 - t0))


def _sync(device: torch.device) -> None:
    """Waits for the device's queued work (a GPU runs it asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fns: dict, device: torch.device) -> dict:
    """Median time of each callable over REPEATS turns in shuffled order, after one warm-up;
    every call timed from an idle device to its work's end."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    rng = random.Random(0)
    for _ in range(REPEATS):
        for name in rng.sample(list(fns), len(fns)):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
