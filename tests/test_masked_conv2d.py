"""masked_conv2d: against its twin on every path (values, gradients of x, weight, bias and
mask), geometry (stride, padding, dilation, groups), layouts, opcheck, float64 gradcheck, bad
input."""
import pytest
import torch

from robprune_fast import ops
from tests.helpers.masked import PATHS, SPARSITIES, compare, random_mask
from tests.helpers.ops import DEVICES

GEOMETRIES = [dict(stride=1, padding=1, dilation=1, groups=1),
              dict(stride=2, padding=1, dilation=1, groups=1),
              dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=1),
              dict(stride=1, padding=2, dilation=2, groups=2)]


def inputs(n, c_in, c_out, k, size, groups, sparsity, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *size, generator=g, dtype=dtype).to(device)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=dtype).to(device)
    b = torch.randn(c_out, generator=g, dtype=dtype).to(device) if bias else None
    return x, w, b, random_mask(w.shape, sparsity, dtype, device, g)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_matches_twin(device, path, sparsity, geometry):
    dtype = torch.float32
    x, w, b, m = inputs(3, 4, 6, 3, (9, 8), geometry["groups"], sparsity, dtype, device)
    compare("masked_conv2d", x, w, b, m, geometry, path, dtype, mask_grad=path == "dense")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["batch1", "channels_last", "non_contiguous", "no_bias", "1x1"])
def test_layouts_and_odd_shapes(path, layout):
    dtype = torch.float64
    k = 1 if layout == "1x1" else 3
    x, w, b, m = inputs(1 if layout == "batch1" else 2, 3, 5, k, (7, 6), 1, 0.5, dtype, "cpu",
                        bias=layout != "no_bias")
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, permuted strides
    compare("masked_conv2d", x, w, b, m, dict(stride=1, padding=1), path, dtype,
            mask_grad=path == "dense")


def test_channels_last_stays_channels_last():
    x, w, b, m = inputs(2, 3, 5, 3, (7, 6), 1, 0.5, torch.float32, "cpu")
    y = ops.masked_conv2d(x.to(memory_format=torch.channels_last), w, b, m, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_opcheck():
    x, w, b, m = inputs(2, 4, 6, 3, (6, 5), 2, 0.5, torch.float32, "cpu")
    args = [t.requires_grad_(True) for t in (x, w, b, m)]
    torch.library.opcheck(torch.ops.robprune_fast.masked_conv2d, (*args, None, [2, 1], [1, 1], [1, 1], 2))


def test_gradcheck_float64():
    x, w, b, m = inputs(2, 2, 3, 3, (5, 4), 1, 0.5, torch.float64, "cpu")
    m = m + torch.rand_like(m)
    assert torch.autograd.gradcheck(
        lambda *t: ops.masked_conv2d(*t, stride=2, padding=1, path="dense"),
        [t.requires_grad_(True) for t in (x, w, b, m)])


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(2, 5, 6, 6)), ValueError, "x has 5 channels but weight expects"),
    (dict(x=torch.randn(2, 4, 6)), ValueError, "x must be 4-D"),
    (dict(mask=torch.ones(6, 4, 3, 1)), ValueError, "mask must have the shape of weight"),
    (dict(stride=0), ValueError, "stride must be two positive ints"),
    (dict(padding=1.5), ValueError, "padding must be an int or a pair of ints"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
])
def test_bad_input_names_the_argument(change, error, match):
    x, w, b, m = inputs(2, 4, 6, 3, (6, 6), 1, 0.5, torch.float32, "cpu")
    args = dict(x=x, weight=w, bias=b, mask=m)
    args.update(change)
    with pytest.raises(error, match=match):
        ops.masked_conv2d(**args)
