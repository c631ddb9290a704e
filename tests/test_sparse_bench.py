"""The benchmark's sparse section runs end to end at a toy size and writes its JSON (so it cannot
rot); its numbers are measured by `python -m robprune_fast.bench --sections sparse`, never
asserted here."""
import importlib.util
import json
from pathlib import Path

from robprune_fast import bench


def test_sparse_section_runs_at_toy_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--sections", "sparse", "--batch", "2", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["sparse"]
    assert [(row["layer"].split()[0], row["sparsity"]) for row in rows] == [
        (layer, s) for layer in ("linear", "conv") for s in bench.SPARSITIES]
    for row in rows:
        assert set(row["forward"]) == ({"dense", "sparse", "kept_values", "torch_csr"}
                                       if row["layer"].startswith("linear") else {"dense", "sparse", "kept_values"})
        assert set(row["interval forward"]) == {"dense_fused", "sparse"}
        assert row["auto"] == "dense"  # the suite forces the crossover to 0 (tests/conftest.py)
    assert "Compressed path" in capsys.readouterr().out


def _script(name):
    """benchmarks/<name>.py as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pruned_layers_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/pruned_layers.py: every layer of cnn_large, both paths, both passes."""
    module = _script("pruned_layers")
    out = tmp_path / "layers.json"
    result = module.main(["--batch", "2", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["dense_over_sparse"] == result["dense_over_sparse"]
    assert set(result["dense_over_sparse"]) == {
        f"{name} {what}" for name, *_ in module.LAYERS for what in ("fwd", "fwd_bwd")}


def test_small_batch_benchmark_runs(tmp_path):
    """benchmarks/small_batch.py: every variant at batch 1 and 2, both sparsities."""
    module = _script("small_batch")
    out = tmp_path / "small.json"
    result = module.main(["--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [(r["batch"], r["sparsity"]) for r in result["rows"]] == [(1, 0.9), (1, 0.99), (2, 0.9), (2, 0.99)]
    assert set(result["rows"][0]["us"]) == {"dense", "masked", "compressed", "interval_dense", "interval_sparse"}
