"""The microbenchmark runs end to end at a toy size and writes its JSON (so it cannot rot);
its numbers are measured by `python -m robprune_fast.bench`, never asserted here."""
import json

from robprune_fast import bench


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
