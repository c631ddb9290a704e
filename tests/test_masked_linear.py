"""masked_linear: against its twin on every path (values, gradients of x, weight, bias and
mask), opcheck, float64 gradcheck, odd shapes and layouts, bad input."""
import pytest
import torch

from robprune_fast import ops
from tests.helpers.masked import PATHS, SPARSITIES, compare, random_mask
from tests.helpers.ops import DEVICES


def inputs(lead, in_features, out_features, sparsity, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_features, generator=g, dtype=dtype).to(device)
    w = torch.randn(out_features, in_features, generator=g, dtype=dtype).to(device)
    b = torch.randn(out_features, generator=g, dtype=dtype).to(device) if bias else None
    return x, w, b, random_mask(w.shape, sparsity, dtype, device, g)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_twin(device, path, sparsity, dtype):
    compare("masked_linear", *inputs((7,), 33, 19, sparsity, dtype, device), {}, path, dtype,
            mask_grad=path == "dense")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lead,bias", [((1,), True), ((2, 3), False), ((), True), ((0,), True)])
def test_odd_shapes(path, lead, bias):
    compare("masked_linear", *inputs(lead, 5, 4, 0.5, torch.float64, "cpu", bias), {}, path,
            torch.float64, mask_grad=path == "dense")


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_inputs(path):
    _, _, b, m = inputs((6,), 8, 5, 0.5, torch.float64, "cpu")
    x = torch.randn(8, 6, dtype=torch.float64).t()  # (6, 8), transposed storage
    w = torch.randn(8, 5, dtype=torch.float64).t()  # (5, 8), transposed storage
    assert not x.is_contiguous() and not w.is_contiguous()
    compare("masked_linear", x, w, b, m, {}, path, torch.float64, mask_grad=path == "dense")


def test_without_mask_is_a_plain_linear():
    x, w, b, _ = inputs((4,), 6, 3, 0.0, torch.float64, "cpu")
    torch.testing.assert_close(ops.masked_linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_opcheck():
    x, w, b, m = inputs((4,), 6, 3, 0.5, torch.float32, "cpu")
    args = [t.requires_grad_(True) for t in (x, w, b, m)]
    torch.library.opcheck(torch.ops.robprune_fast.masked_linear, (*args, None))


def test_gradcheck_float64():
    x, w, b, m = inputs((3,), 5, 4, 0.5, torch.float64, "cpu")
    m = m + torch.rand_like(m)  # gradcheck moves the mask too: any values, not just 0/1
    assert torch.autograd.gradcheck(
        lambda *t: ops.masked_linear(*t, path="dense"),
        [t.requires_grad_(True) for t in (x, w, b, m)])


def test_weight_cache_pair_is_used_and_checked():
    x, w, b, m = inputs((4,), 6, 3, 0.5, torch.float32, "cpu")
    with ops.weight_cache():
        torch.testing.assert_close(ops.masked_linear(x, w, b, m), torch.nn.functional.linear(x, w * m, b))
    pair = ops.masked_weight_pair(w, m)
    pair[1].neg_()  # no longer the pair of (w, m)
    with pytest.raises(RuntimeError, match="weight_pair must be masked_weight_pair"):
        torch.ops.robprune_fast.masked_linear(x, w, b, m, pair)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(4, 7)), ValueError, r"in_features = 6"),
    (dict(weight=torch.randn(3, 6, dtype=torch.float64)), TypeError, "weight must have the dtype of x"),
    (dict(mask=torch.ones(6, 3)), ValueError, "mask must have the shape of weight"),
    (dict(bias=torch.ones(4)), ValueError, r"bias must have shape \(3,\)"),
    (dict(x=torch.randint(0, 2, (4, 6))), TypeError, "x must be float32 or float64"),
    (dict(path="fast"), ValueError, "path must be one of"),
])
def test_bad_input_names_the_argument(change, error, match):
    x, w, b, m = inputs((4,), 6, 3, 0.5, torch.float32, "cpu")
    args = dict(x=x, weight=w, bias=b, mask=m)
    args.update(change)
    with pytest.raises(error, match=match):
        ops.masked_linear(**args)
