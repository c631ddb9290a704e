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
        assert set(row["forward"]) == ({"dense", "sparse", "torch_csr"} if row["layer"].startswith("linear")
                                       else {"dense", "sparse"})
        assert set(row["interval forward"]) == {"dense_fused", "sparse"}
        assert row["auto"] == "dense"  # the suite forces the crossover to 0 (tests/conftest.py)
    assert "Compressed path" in capsys.readouterr().out
