"""The compressed linear ops (sparse_linear, sparse_linear_t, sparse_linear_values_grad and the
fused sparse_linear_backward) called through torch.ops against their twins: values and
gradients, batch sizes around the kernels' vector width, layouts, empty and full masks; opcheck;
float64 gradcheck."""
import pytest
import torch

from robprune_fast import reference
from robprune_fast.ops import sparse  # noqa: F401  (registers the fake kernels and autograd)
from tests.helpers.masked import SPARSITIES, TOL, compare_op, compressed, random_mask

OPS = torch.ops.robprune_fast
BATCHES = [1, 7, 16, 37, 128]


def problem(n, in_features, out_features, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=dtype)
    w = torch.randn(out_features, in_features, generator=g, dtype=dtype)
    b = torch.randn(out_features, generator=g, dtype=dtype)
    index, values = compressed(w, random_mask(w.shape, sparsity, dtype, "cpu", g))
    return x, values, b, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n", BATCHES)
def test_linear_matches_twin(n, sparsity, dtype):
    x, v, b, index = problem(n, 45, 19, sparsity, dtype)
    args = (x, v, b, index.row_ptr, index.col, 19)
    compare_op(OPS.sparse_linear, reference.sparse_linear, args, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n", BATCHES)
def test_transpose_matches_twin(n, sparsity, dtype):
    x, v, _, index = problem(n, 45, 19, sparsity, dtype)
    g = torch.randn(n, 19, dtype=dtype)
    args = (g, v, *index.csc, 45)
    compare_op(OPS.sparse_linear_t, reference.sparse_linear_t, args, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", BATCHES)
def test_values_grad_matches_twin(n, dtype):
    x, _, _, index = problem(n, 45, 19, 0.5, dtype)
    g = torch.randn(n, 19, dtype=dtype)
    compare_op(OPS.sparse_linear_values_grad, reference.sparse_linear_values_grad, (g, x, *index.csc), dtype,
               grads=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("n", BATCHES)
def test_fused_backward_matches_its_parts(n, sparsity, dtype):
    """sparse_linear_backward (one pass) gives what sparse_linear_t and the values' gradient give."""
    x, v, _, index = problem(n, 45, 19, sparsity, dtype)
    g = torch.randn(n, 19, dtype=dtype)
    g_x, g_v = OPS.sparse_linear_backward(g, x, v.detach(), *index.csc, [True, True])
    torch.testing.assert_close(g_x, reference.sparse_linear_t(g, v.detach(), *index.csc, 45), **TOL[dtype])
    torch.testing.assert_close(g_v, reference.sparse_linear_values_grad(g, x, *index.csc), **TOL[dtype])
    only_x, none = OPS.sparse_linear_backward(g, x, v.detach(), *index.csc, [True, False])
    assert torch.equal(only_x, g_x) and none.numel() == 0


@pytest.mark.parametrize("layout", ["column_major", "non_contiguous", "wide_batch"])
def test_layouts(layout):
    dtype = torch.float64
    n = 300 if layout == "wide_batch" else 9
    x, v, b, index = problem(n, 40, 24, 0.7, dtype)
    if layout == "column_major":
        x = x.t().contiguous().t()
    if layout == "non_contiguous":
        x = torch.randn(n, 80, dtype=dtype)[:, ::2]
    compare_op(OPS.sparse_linear, reference.sparse_linear, (x, v, b, index.row_ptr, index.col, 24), dtype)
    g = torch.randn(n, 24, dtype=dtype)
    g = g.t().contiguous().t() if layout == "column_major" else g
    compare_op(OPS.sparse_linear_t, reference.sparse_linear_t, (g, v, *index.csc, 40), dtype)
    compare_op(OPS.sparse_linear_values_grad, reference.sparse_linear_values_grad, (g, x, *index.csc), dtype,
               grads=False)


def test_degenerate_shapes():
    dtype = torch.float64
    for n, in_features, out_features in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        x, v, b, index = problem(n, in_features, out_features, 0.5, dtype)
        compare_op(OPS.sparse_linear, reference.sparse_linear, (x, v, b, index.row_ptr, index.col, out_features),
                   dtype)


def test_opcheck():
    x, v, b, index = problem(6, 20, 9, 0.5, torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, v, b)]
    torch.library.opcheck(OPS.sparse_linear, (*leaves, index.row_ptr, index.col, 9))
    g = torch.randn(6, 9, requires_grad=True)
    torch.library.opcheck(OPS.sparse_linear_t, (g, v, *index.csc, 20))
    torch.library.opcheck(OPS.sparse_linear_values_grad, (g.detach(), x.detach(), *index.csc))
    torch.library.opcheck(OPS.sparse_linear_backward, (g.detach(), x.detach(), v.detach(), *index.csc, [True, True]))


def test_gradcheck_float64():
    x, v, b, index = problem(3, 7, 5, 0.5, torch.float64)
    assert torch.autograd.gradcheck(lambda x, v, b: OPS.sparse_linear(x, v, b, index.row_ptr, index.col, 5),
                                    [t.requires_grad_(True) for t in (x, v, b)])
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, v: OPS.sparse_linear_t(g, v, *index.csc, 7), [g, v])


def test_masked_weight_gradient_is_zero_where_pruned():
    """Through the values' gather, a pruned weight's gradient is exactly 0."""
    from robprune_fast import ops

    w = torch.randn(8, 12, requires_grad=True)
    m = random_mask(w.shape, 0.6, torch.float32, "cpu")
    ops.masked_linear(torch.randn(5, 12), w, None, m, path="sparse").sum().backward()
    assert bool((w.grad[m == 0] == 0).all()) and bool((w.grad[m == 1] != 0).any())
