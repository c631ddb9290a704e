"""The benchmark's sparse section runs end to end at a toy size and writes its JSON (so it cannot
rot); its numbers are measured by `python -m robprune_fast.bench --sections sparse`, never
asserted here."""
import json

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


def test_pruned_layers_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/pruned_layers.py: every layer of cnn_large, both paths, both passes."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pruned_layers.py"
    spec = importlib.util.spec_from_file_location("pruned_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "layers.json"
    result = module.main(["--batch", "2", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["dense_over_sparse"] == result["dense_over_sparse"]
    assert set(result["dense_over_sparse"]) == {
        f"{name} {what}" for name, *_ in module.LAYERS for what in ("fwd", "fwd_bwd")}
