"""sparse_gather (a pruned weight's kept values, in the CSR's order) and sparse_scatter_ (the
values back into a dense weight, zeros elsewhere: the gather's gradient) against their twins:
weight shapes of linear and conv layers, empty and full masks, layouts; the gather's gradient
through its autograd formula; opcheck; float64 gradcheck; on every device (CUDA where there is
one). Bad input: tests/test_sparse_errors.py."""
import pytest
import torch

from robprune_fast import reference
from robprune_fast.ops import sparse_index
from tests.helpers.masked import SPARSITIES, random_mask
from tests.helpers.ops import DEVICES

OPS = torch.ops.robprune_fast
SHAPES = [(7, 11), (1, 1), (33, 40), (6, 3, 3, 2), (5, 0), (0, 4)]


def problem(shape, sparsity, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype).to(device)
    return w, sparse_index.pack_mask(random_mask(shape, sparsity, dtype, "cpu", g).to(device))


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_twin(shape, sparsity, dtype, device):
    w, index = problem(shape, sparsity, dtype, device)
    values = OPS.sparse_gather(w, index.row_ptr, index.col)
    assert values.shape == (index.nnz,) and values.dtype == dtype
    torch.testing.assert_close(values, reference.sparse_gather(w, index.row_ptr, index.col), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.take(w, index.flat_index), rtol=0, atol=0)
    # scatter writes all of out: memory full of NaN comes back as the twin's zeros and values
    got, want = torch.full_like(w, float("nan")), torch.full_like(w, float("nan"))
    OPS.sparse_scatter_(got, values * 3, index.row_ptr, index.col)
    reference.sparse_scatter_(want, values * 3, index.row_ptr, index.col)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, 3 * w * (got != 0), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_any_weight_layout_gathers_in_logical_order(layout, device):
    if layout == "transposed":
        w = torch.randn(9, 6, device=device).t()
    elif layout == "channels_last":
        w = torch.randn(4, 3, 2, 2, device=device).contiguous(memory_format=torch.channels_last)
    else:
        w = torch.randn(5, 14, device=device)[:, 2:9]
    index = sparse_index.pack_mask(random_mask(w.shape, 0.5, torch.float32, "cpu").to(device))
    torch.testing.assert_close(OPS.sparse_gather(w, index.row_ptr, index.col), torch.take(w, index.flat_index),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("shape", [(7, 11), (6, 3, 3, 2)], ids=str)
def test_gradient_is_the_values_gradient_at_the_kept_weights(shape, device):
    w, index = problem(shape, 0.6, torch.float32, device)
    w.requires_grad_(True)
    cot = torch.randn(index.nnz, device=device)
    OPS.sparse_gather(w, index.row_ptr, index.col).backward(cot)
    torch.testing.assert_close(w.grad, torch.zeros_like(w).put_(index.flat_index, cot), rtol=0, atol=0)


def test_channels_last_weight_gradient():
    """A weight the scatter does not write in place (channels-last): the twin's formula, same
    numbers."""
    w = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    index = sparse_index.pack_mask(random_mask(w.shape, 0.5, torch.float32, "cpu"))
    cot = torch.randn(index.nnz)
    sparse_index.gather_values(w, index).backward(cot)
    torch.testing.assert_close(w.grad, torch.zeros_like(w).put_(index.flat_index, cot), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    w, index = problem((6, 3, 2, 2), 0.5, torch.float32, device)
    torch.library.opcheck(OPS.sparse_gather, (w.requires_grad_(True), index.row_ptr, index.col))
    out = torch.empty_like(w.detach())
    torch.library.opcheck(OPS.sparse_scatter_, (out, torch.randn(index.nnz, device=device), index.row_ptr, index.col))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_gradcheck_float64(device):
    w, index = problem((5, 7), 0.5, torch.float64, device)
    assert torch.autograd.gradcheck(lambda w: OPS.sparse_gather(w, index.row_ptr, index.col), [w.requires_grad_(True)])
    assert torch.autograd.gradgradcheck(lambda w: OPS.sparse_gather(w, index.row_ptr, index.col) ** 2, [w])
