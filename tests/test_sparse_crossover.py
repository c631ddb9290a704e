"""path="auto" (ops.crossover): it takes the compressed path below the crossover density, which
is measured once per key into a JSON table in the cache directory and reused, or forced by
set_crossover / ROBPRUNE_SPARSE_CROSSOVER. The suite forces 0 (tests/conftest.py); the tests
here that measure ask for it with a temporary cache."""
import json
import time

import pytest
import torch

from robprune_fast import ops
from robprune_fast.ops import crossover, masked
from tests.helpers.masked import random_mask


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the compressed path's layer functions."""
    seen = {"linear": 0, "conv2d": 0}
    for name in seen:
        real = getattr(masked.sparse, name)

        def counted(*args, name=name, real=real):
            seen[name] += 1
            return real(*args)
        monkeypatch.setattr(masked.sparse, name, counted)
    return seen


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """No forced crossover, a fresh table in a temporary cache directory."""
    monkeypatch.delenv(crossover.ENV, raising=False)
    monkeypatch.setenv("ROBPRUNE_CACHE", str(tmp_path))
    crossover.set_crossover(None)
    crossover.reset_table()
    yield tmp_path / crossover.TABLE_NAME
    crossover.reset_table()


def layer(sparsity, n=8):
    x, w, b = torch.randn(n, 64), torch.randn(32, 64), torch.randn(32)
    return x, w, b, random_mask(w.shape, sparsity, torch.float32, "cpu")


def test_forced_crossover_picks_the_path(calls):
    x, w, b, m = layer(0.9)
    want = torch.nn.functional.linear(x, w * m, b)
    try:
        crossover.set_crossover(0.5)
        torch.testing.assert_close(ops.masked_linear(x, w, b, m), want)
        assert calls["linear"] == 1  # density 0.1 < 0.5
        crossover.set_crossover(0.05)
        ops.masked_linear(x, w, b, m)
        assert calls["linear"] == 1  # density 0.1 >= 0.05: dense
        crossover.set_crossover(1.0)
        ops.masked_linear(x, w, b, torch.ones_like(m))
        assert calls["linear"] == 1  # nothing pruned: dense
        m.requires_grad_(True)
        ops.masked_linear(x, w, b, m)
        assert calls["linear"] == 1  # the mask's gradient is the dense path's
    finally:
        crossover.set_crossover(None)
    with pytest.raises(ValueError, match="crossover must lie in"):
        crossover.set_crossover(1.5)


def test_environment_forces_the_crossover(calls, monkeypatch):
    x, w, b, m = layer(0.9, n=2)
    conv_w = torch.randn(8, 3, 3, 3)
    conv_m = random_mask(conv_w.shape, 0.9, torch.float32, "cpu")
    monkeypatch.setenv(crossover.ENV, "1")
    ops.masked_linear(x, w, b, m)
    ops.masked_conv2d(torch.randn(2, 3, 8, 8), conv_w, None, conv_m, padding=1)
    assert calls == {"linear": 1, "conv2d": 1}
    monkeypatch.setenv(crossover.ENV, "0")
    ops.masked_linear(x, w, b, m)
    assert calls["linear"] == 1


def test_measured_once_then_reused(measured, monkeypatch):
    x, w, b, m = layer(0.95, n=16)
    start = time.perf_counter()
    ops.masked_linear(x, w, b, m)
    assert time.perf_counter() - start < 1.0, "a measurement must stay well under a second"
    table = json.loads(measured.read_text())
    assert len(table) == 1
    (key, value), = table.items()
    assert key.startswith("linear|batch=16|") and 0 <= value <= 1

    def refuse(*args):
        raise AssertionError("measured twice")
    monkeypatch.setattr(crossover, "measure", refuse)
    ops.masked_linear(torch.randn(13, 64), w, b, m)  # same key: batch 13 rounds up to 16
    crossover.reset_table()  # as a new process: read back from the file
    assert crossover.crossover("linear", x.shape, w.shape, (), x.dtype, x.device) == value
    ops.masked_linear(x, w, b, torch.ones_like(m))  # a full mask never needs a crossover


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_on_a_gpu_per_model(measured):
    """On a GPU the compressed path (CUDA kernels) is timed against cuDNN / cuBLAS, under a key of
    that GPU's model."""
    x, w, b, m = (t.cuda() for t in layer(0.95, n=16))
    ops.masked_linear(x, w, b, m)
    (key, value), = json.loads(measured.read_text()).items()
    assert f"|cuda:{torch.cuda.get_device_name()}|" in key and 0 <= value <= 1


def test_measure_conv(measured):
    x, w = torch.randn(4, 8, 12, 12), torch.randn(16, 8, 3, 3)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    start = time.perf_counter()
    value = crossover.measure("conv2d", tuple(x.shape), tuple(w.shape), geometry, torch.float32, x.device)
    assert time.perf_counter() - start < 1.0 and 0 <= value <= 1


def test_crossing_interpolates_between_the_timed_densities():
    timed = [(0.05, 1.0), (0.25, 3.0), (0.6, 6.5)]
    assert crossover.crossing(0.5, timed) == 0.0  # slower already at the lowest density
    assert crossover.crossing(2.0, timed) == pytest.approx(0.15)
    assert crossover.crossing(4.75, timed) == pytest.approx(0.425)
    assert crossover.crossing(8.25, timed) == pytest.approx(0.775)  # past the last: extrapolated
    assert crossover.crossing(100.0, timed) == 1.0
