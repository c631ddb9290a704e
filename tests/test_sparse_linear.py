"""The compressed linear ops (sparse_linear, sparse_linear_t, sparse_linear_values_grad and the
fused sparse_linear_backward) called through torch.ops against their twins: values and
gradients, batch sizes around the kernels' vector width, layouts, empty and full masks; opcheck;
float64 gradcheck; on every device (CUDA where there is one)."""
import pytest
import torch

from robprune_fast import reference
from robprune_fast.ops import sparse  # noqa: F401  (registers the fake kernels and autograd)
from tests.helpers.masked import SPARSITIES, TOL, compare_op, compressed, random_mask
from tests.helpers.ops import DEVICES

OPS = torch.ops.robprune_fast
BATCHES = [1, 7, 16, 37, 128]


def problem(n, in_features, out_features, sparsity, dtype, device="cpu", seed=0):
    """The same numbers on every device (drawn on the CPU), packed on the device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=dtype).to(device)
    w = torch.randn(out_features, in_features, generator=g, dtype=dtype).to(device)
    b = torch.randn(out_features, generator=g, dtype=dtype).to(device)
    index, values = compressed(w, random_mask(w.shape, sparsity, dtype, "cpu", g).to(device))
    return x, values, b, index


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("op", ["linear", "transpose"])
def test_matches_twin(op, n, sparsity, dtype, device):
    """y = x W^T + b, and the transpose g W (the input gradient, CROWN's step)."""
    x, v, b, index = problem(n, 45, 19, sparsity, dtype, device)
    if op == "linear":
        compare_op(OPS.sparse_linear, reference.sparse_linear, (x, v, b, index.row_ptr, index.col, 19), dtype)
    else:
        g = torch.randn(n, 19, dtype=dtype, device=device)
        compare_op(OPS.sparse_linear_t, reference.sparse_linear_t, (g, v, *index.csc, 45), dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", BATCHES)
def test_values_grad_matches_twin(n, dtype, device):
    x, _, _, index = problem(n, 45, 19, 0.5, dtype, device)
    g = torch.randn(n, 19, dtype=dtype, device=device)
    compare_op(OPS.sparse_linear_values_grad, reference.sparse_linear_values_grad, (g, x, *index.csc), dtype,
               grads=False)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("n", BATCHES)
def test_fused_backward_matches_its_parts(n, sparsity, dtype, device):
    """sparse_linear_backward (one pass) gives what sparse_linear_t and the values' gradient give."""
    x, v, _, index = problem(n, 45, 19, sparsity, dtype, device)
    g = torch.randn(n, 19, dtype=dtype, device=device)
    g_x, g_v = OPS.sparse_linear_backward(g, x, v.detach(), *index.csc, [True, True])
    torch.testing.assert_close(g_x, reference.sparse_linear_t(g, v.detach(), *index.csc, 45), **TOL[dtype])
    torch.testing.assert_close(g_v, reference.sparse_linear_values_grad(g, x, *index.csc), **TOL[dtype])
    only_x, none = OPS.sparse_linear_backward(g, x, v.detach(), *index.csc, [True, False])
    assert torch.equal(only_x, g_x) and none.numel() == 0


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("layout", ["column_major", "non_contiguous", "wide_batch"])
def test_layouts(layout, device):
    dtype = torch.float64
    n = 300 if layout == "wide_batch" else 9
    x, v, b, index = problem(n, 40, 24, 0.7, dtype, device)
    if layout == "column_major":
        x = x.t().contiguous().t()
    if layout == "non_contiguous":
        x = torch.randn(n, 80, dtype=dtype, device=device)[:, ::2]
    compare_op(OPS.sparse_linear, reference.sparse_linear, (x, v, b, index.row_ptr, index.col, 24), dtype)
    g = torch.randn(n, 24, dtype=dtype, device=device)
    g = g.t().contiguous().t() if layout == "column_major" else g
    compare_op(OPS.sparse_linear_t, reference.sparse_linear_t, (g, v, *index.csc, 40), dtype)
    compare_op(OPS.sparse_linear_values_grad, reference.sparse_linear_values_grad, (g, x, *index.csc), dtype,
               grads=False)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_degenerate_shapes(device):
    dtype = torch.float64
    for n, in_features, out_features in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        x, v, b, index = problem(n, in_features, out_features, 0.5, dtype, device)
        compare_op(OPS.sparse_linear, reference.sparse_linear, (x, v, b, index.row_ptr, index.col, out_features),
                   dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    x, v, b, index = problem(6, 20, 9, 0.5, torch.float32, device)
    leaves = [t.requires_grad_(True) for t in (x, v, b)]
    torch.library.opcheck(OPS.sparse_linear, (*leaves, index.row_ptr, index.col, 9))
    g = torch.randn(6, 9, device=device, requires_grad=True)
    torch.library.opcheck(OPS.sparse_linear_t, (g, v, *index.csc, 20))
    torch.library.opcheck(OPS.sparse_linear_values_grad, (g.detach(), x.detach(), *index.csc))
    torch.library.opcheck(OPS.sparse_linear_backward, (g.detach(), x.detach(), v.detach(), *index.csc, [True, True]))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_gradcheck_float64(device):
    x, v, b, index = problem(3, 7, 5, 0.5, torch.float64, device)
    assert torch.autograd.gradcheck(lambda x, v, b: OPS.sparse_linear(x, v, b, index.row_ptr, index.col, 5),
                                    [t.requires_grad_(True) for t in (x, v, b)])
    g = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, v: OPS.sparse_linear_t(g, v, *index.csc, 7), [g, v])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_masked_weight_gradient_is_zero_where_pruned(device):
    """Through the values' gather, a pruned weight's gradient is exactly 0."""
    from robprune_fast import ops

    w = torch.randn(8, 12, device=device, requires_grad=True)
    m = random_mask(w.shape, 0.6, torch.float32, device)
    ops.masked_linear(torch.randn(5, 12, device=device), w, None, m, path="sparse").sum().backward()
    assert bool((w.grad[m == 0] == 0).all()) and bool((w.grad[m == 1] != 0).any())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operands_on_two_devices_are_refused():
    x, v, b, index = problem(4, 6, 3, 0.5, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="row_ptr must be on the device of x"):
        OPS.sparse_linear(x, v, b, index.row_ptr.cpu(), index.col, 3)
    with pytest.raises(RuntimeError, match="values must be on the device of x"):
        OPS.sparse_linear(x, v.cpu(), b, index.row_ptr, index.col, 3)
