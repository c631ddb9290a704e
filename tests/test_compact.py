"""The compact file format: exact round trips, its size against a dense checkpoint, damage."""
import copy

import pytest
import torch
from torch import nn

from robprune_fast import checkpoint, compact, models
from robprune_fast import nn as rnn


def _pruned(sparsity, seed=0, name="cnn_large"):
    torch.manual_seed(seed)
    model = rnn.convert(models.build(name)).eval()
    g = torch.Generator().manual_seed(seed)
    for layer in rnn.masked_modules(model).values():
        keep = torch.rand(layer.weight.shape, generator=g) >= sparsity
        layer.set_mask(keep)
    return model


@pytest.mark.parametrize("sparsity,limit", [(0.9, 0.15), (0.99, 0.03)])
def test_size_against_the_dense_checkpoint(tmp_path, sparsity, limit):
    model = _pruned(sparsity)
    dense = tmp_path / "dense.safetensors"
    checkpoint.save(dense, rnn.strip(copy.deepcopy(model)))
    header = compact.save_compact(model, tmp_path / "model.compact")
    ratio = (tmp_path / "model.compact").stat().st_size / dense.stat().st_size
    assert ratio <= limit, ratio
    assert "delta" in header["masked"] or "bitmap" in header["masked"]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("target", ["masked", "plain"])
def test_round_trip_reproduces_the_outputs_exactly(tmp_path, sparsity, target):
    model = _pruned(sparsity, name="cnn_small")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    compact.save_compact(model, tmp_path / "m.compact", meta={"model": "cnn_small"})
    fresh = models.build("cnn_small").eval()
    if target == "masked":
        rnn.convert(fresh)
    assert compact.load_compact(fresh, tmp_path / "m.compact") == {"model": "cnn_small"}
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    if target == "masked":
        for name, layer in rnn.masked_modules(fresh).items():
            assert torch.equal(layer.weight_mask, rnn.masked_modules(model)[name].weight_mask)


def test_both_encodings_decode_the_same_positions():
    for keep in (0.5, 0.001):  # bitmap wins at 50%, delta at 0.1%
        mask = torch.rand(300, 700) < keep
        mask[0, 0] = True
        mask[-1, -1] = True
        mask[5, 300:] = False  # a gap wider than 255 forces an escape
        encoding, parts = compact._encode_positions(mask)
        positions = compact._decode_positions(encoding, parts, mask.numel(), int(mask.sum()))
        assert encoding == ("bitmap" if keep == 0.5 else "delta")
        assert torch.equal(torch.from_numpy(positions), mask.flatten().nonzero().squeeze(1))


def test_damaged_files_are_refused(tmp_path):
    model = _pruned(0.9, name="cnn_small")
    path = tmp_path / "m.compact"
    compact.save_compact(model, path)
    data = path.read_bytes()
    for name, damaged in [("truncated", data[: len(data) // 2]),
                          ("flipped", data[:-100] + bytes([data[-100] ^ 0x10]) + data[-99:]),
                          ("garbage", b"\x00" * 64)]:
        bad = tmp_path / f"{name}.compact"
        bad.write_bytes(damaged)
        with pytest.raises(compact.CompactFileError, match=str(bad.name)):
            compact.load_compact(rnn.convert(models.build("cnn_small")), bad)
    with pytest.raises(compact.CompactFileError, match="does not match the model"):
        compact.load_compact(rnn.convert(models.build("cnn_large")), path)
    with pytest.raises(FileNotFoundError, match="not found"):
        compact.load_compact(model, tmp_path / "missing.compact")
