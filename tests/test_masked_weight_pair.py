"""masked_weight_pair: kernel against reference twin, opcheck, layouts, bad input."""
import pytest
import torch

from tests.helpers.ops import DEVICES
from robprune_fast import ops, reference


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (8, 3, 4, 4), (1, 1)])
@pytest.mark.parametrize("mask", [None, "random", "zeros", "ones"])
def test_matches_reference(device, dtype, shape, mask):
    w = torch.randn(shape, dtype=dtype, device=device)
    m = {None: None, "random": (torch.rand(shape, device=device) > 0.5).to(dtype),
         "zeros": torch.zeros(shape, dtype=dtype, device=device),
         "ones": torch.ones(shape, dtype=dtype, device=device)}[mask]
    torch.testing.assert_close(ops.masked_weight_pair(w, m), reference.masked_weight_pair(w, m), rtol=0, atol=0)


def test_layouts():
    """A channels_last weight gives channels_last halves; transposed views are read correctly."""
    w = torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last)
    m = (torch.rand(6, 4, 3, 3) > 0.5).float()  # contiguous mask beside a channels_last weight
    pair = ops.masked_weight_pair(w, m)
    assert pair[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pair, reference.masked_weight_pair(w, m))
    wt = torch.randn(7, 5).t()
    torch.testing.assert_close(ops.masked_weight_pair(wt), reference.masked_weight_pair(wt))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(channels_last, device):
    w = torch.randn(6, 4, 3, 3, device=device)
    if channels_last:
        w = w.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.robprune_fast.masked_weight_pair,
                          (w, torch.rand(6, 4, 3, 3, device=device)))
    torch.library.opcheck(torch.ops.robprune_fast.masked_weight_pair, (w, None))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(3, 4).half(), None), "weight must be float32 or float64"),
    ((torch.randn(3, 4), torch.ones(4, 3)), "mask must have the shape of weight"),
    ((torch.randn(3, 4), torch.ones(3, 4, dtype=torch.float64)), "mask must have the dtype of weight"),
])
def test_bad_input(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ops.masked_weight_pair(*args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.robprune_fast.masked_weight_pair(*args)
