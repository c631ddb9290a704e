"""The microbenchmark runs end to end at a toy size and writes its JSON (so it cannot rot);
its numbers are measured by `python -m robprune_fast.bench`, never asserted here. The bounds
benchmark's reference variant really runs the twins."""
import json

import pytest
import torch

from robprune_fast import bench, bounds, models, ops
from robprune_fast.ops import box as ops_box, crown as ops_crown, interval as ops_interval
from robprune_fast.ops import weight_pair as ops_weight_pair


def test_bench_runs_at_toy_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--batch", "2", "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [row["layer"].split(":")[1] for row in result["layers"]] == ["Conv2d"] * 4 + ["Linear"] * 3
    assert set(result["network"]) == {"forward", "forward+backward"}
    assert [row["op"] for row in result["crown_steps"]] == [
        "crown_relu_backward", "crown_conv2d_backward", "crown_conv2d_backward", "crown_linear_backward"]
    assert all(set(row["forward"]) == {"fused", "reference"} for row in result["crown_steps"])
    assert "whole cnn_large" in capsys.readouterr().out


def test_reference_only_runs_no_kernel(monkeypatch):
    """The benchmarks' reference variants run the twins end to end: with the compiled ops
    unreachable the engine still works inside ops.reference_only(), and fails outside it."""
    torch.manual_seed(0)
    model, x = models.digits_cnn().eval(), torch.rand(4, 1, 8, 8)
    C = bounds.margin_spec(torch.tensor([0, 1, 2, 3]), 10)
    fused = {m: bounds.compute_bounds(model, x, 0.02, m, C) for m in ("ibp", "crown-ibp")}

    class Unreachable:
        def __getattr__(self, name):
            raise AssertionError(f"compiled op {name} called on the reference path")

    for family in (ops_box, ops_interval, ops_crown, ops_weight_pair):
        monkeypatch.setattr(family, "OPS", Unreachable())
    with ops.reference_only(), torch.no_grad():
        for method, want in fused.items():
            for got, w in zip(bounds.compute_bounds(model, x, 0.02, method, C), want):
                torch.testing.assert_close(got, w, atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError, match="compiled op"), torch.no_grad():
        bounds.compute_bounds(model, x, 0.02, "ibp", C)


def test_turn_orders_vary_each_variants_predecessor():
    """Every repetition runs each variant once, and over the repetitions each variant follows
    several different others (a rotation of one order would keep every predecessor fixed)."""
    names = ["forward", "floor", "ibp", "ibp_reference", "crown-ibp", "crown-ibp_reference"]
    orders = bench.turn_orders(names, 20)
    assert all(sorted(order) == sorted(names) for order in orders)
    assert orders == bench.turn_orders(names, 20)  # seeded: runs repeat
    for name in names:
        before = {order[order.index(name) - 1] for order in orders if order.index(name) > 0}
        assert len(before) >= 3, (name, before)
