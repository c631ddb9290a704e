"""A small batch of a compressed linear layer's input read in place (sparse_planes.h:
sample_rows; the CPU's in_place_rows kernel): below kRowsInPlace samples, in a forward that
keeps nothing for a backward, sparse_linear and sparse_interval_linear read each sample's row as
it is instead of transposing the batch. Against the twins and against the batch-contiguous
path (the same op with values that require grad), at every batch size around the switch."""
import pytest
import torch

from robprune_fast import nn as rnn
from robprune_fast import reference
from robprune_fast.ops import sparse  # noqa: F401  (registers the fake kernels and autograd)
from tests.helpers.masked import SPARSITIES, TOL, compressed, random_mask

OPS = torch.ops.robprune_fast
BATCHES = [1, 2, 3, 4, 7]  # kRowsInPlace is 3


def problem(n, sparsity, dtype, seed=0, in_features=45, out_features=19):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=dtype)
    w = torch.randn(out_features, in_features, generator=g, dtype=dtype)
    b = torch.randn(out_features, generator=g, dtype=dtype)
    index, values = compressed(w, random_mask(w.shape, sparsity, dtype, "cpu", g))
    return x, values.detach(), b, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "no bias"])
def test_linear_matches_twin_and_the_batch_path(layout, n, sparsity, dtype):
    x, v, b, index = problem(n, sparsity, dtype)
    if layout == "strided":
        x = torch.cat([x, x], 1)[:, ::2]
    if layout == "no bias":
        b = None
    args = (v, b, index.row_ptr, index.col, 19)
    got = OPS.sparse_linear(x, *args)
    torch.testing.assert_close(got, reference.sparse_linear(x, *args), **TOL[dtype])
    # The values requiring grad keep the batch-contiguous path (its planes serve the backward).
    batch = OPS.sparse_linear(x, v.clone().requires_grad_(), *args[1:])
    torch.testing.assert_close(got, batch.detach(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("relu_in,out_bounds", [(False, False), (True, False), (False, True), (True, True)])
def test_interval_matches_twin_and_the_batch_path(relu_in, out_bounds, n, sparsity, dtype):
    x, v, b, index = problem(n, sparsity, dtype, seed=1)
    r = torch.rand_like(x) * (torch.rand_like(x) > 0.2)
    args = (b, index.row_ptr, index.col, 19, relu_in, out_bounds)
    got = OPS.sparse_interval_linear(x, r, v, *args)
    want = reference.sparse_interval_linear(x, r, v, *args)
    batch = OPS.sparse_interval_linear(x, r, v.clone().requires_grad_(), *args)
    for g, w, c in zip(got, want, batch):
        torch.testing.assert_close(g, w, **TOL[dtype])
        torch.testing.assert_close(g, c.detach(), **TOL[dtype])


def test_interval_radius_is_checked_in_place():
    x, v, b, index = problem(2, 0.5, torch.float32)
    r = torch.rand_like(x)
    r[1, 3] = -1.0
    with pytest.raises(RuntimeError, match="radius"):
        OPS.sparse_interval_linear(x, r, v, b, index.row_ptr, index.col, 19, True, False)
    r[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="radius"):
        OPS.sparse_interval_linear(x, r, v, b, index.row_ptr, index.col, 19, False, True)


def test_a_compressed_layer_infers_in_place_and_trains_through_the_batch_path():
    """A compressed layer's parameters require grad: without grad (inference) its values are
    passed detached, so a small batch reads its rows in place; with grad, the forward keeps its
    planes and the gradients are the twin's."""
    torch.manual_seed(0)
    masked = rnn.MaskedLinear(45, 19, dtype=torch.float64)
    masked.set_mask(torch.rand(19, 45) < 0.3)
    layer = rnn.compress(torch.nn.Sequential(masked))[0]
    x = torch.randn(3, 45, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), masked(x), rtol=1e-12, atol=1e-12)
    xl = x.clone().requires_grad_()
    layer(xl).square().sum().backward()
    xm = x.clone().requires_grad_()
    masked(xm).square().sum().backward()
    torch.testing.assert_close(xl.grad, xm.grad, rtol=1e-12, atol=1e-12)
    kept = masked.weight.grad.flatten()[masked.weight_mask.flatten() != 0]
    torch.testing.assert_close(layer.weight_values.grad, kept, rtol=1e-12, atol=1e-12)
