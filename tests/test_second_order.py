"""Second derivatives: the ops that compute gradients have no derivative of their own, so a
second backward through them (create_graph: a gradient penalty, a Hessian-vector product)
raises instead of treating them as constants, which torch's default does with only a warning;
where the first backward runs ops that do have one (a compressed convolution's input gradient
is its transposed product), the second derivative equals the twin's. A first-order gradient
taken with create_graph stays right either way."""
import pytest
import torch

from robprune_fast import ops, reference
from tests.helpers.masked import random_mask

g = torch.Generator().manual_seed(0)
X = torch.randn(3, 12, generator=g, dtype=torch.float64)
W = torch.randn(5, 12, generator=g, dtype=torch.float64)
B = torch.randn(5, generator=g, dtype=torch.float64)
M = random_mask(W.shape, 0.5, torch.float64, "cpu", g)
XC = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
WC = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
MC = random_mask(WC.shape, 0.5, torch.float64, "cpu", g)
R, RC = 0.1 * X.abs(), 0.1 * XC.abs()


def first(out):
    return out[0] if isinstance(out, tuple) else out


# (name, op on the input x, its twin, the input, the op that has no derivative: None where the
# second derivative exists)
LAYERS = [
    ("masked_linear dense", lambda x: ops.masked_linear(x, W, B, M, path="dense"),
     lambda x: reference.masked_linear(x, W, B, M), X, "masked_linear_backward"),
    ("masked_linear sparse", lambda x: ops.masked_linear(x, W, B, M, path="sparse"),
     lambda x: reference.masked_linear(x, W, B, M), X, "sparse_linear_backward"),
    ("masked_conv2d dense", lambda x: ops.masked_conv2d(x, WC, None, MC, padding=1, path="dense"),
     lambda x: reference.masked_conv2d(x, WC, None, MC, 1, 1, 1, 1), XC, "masked_conv2d_backward"),
    ("masked_conv2d sparse", lambda x: ops.masked_conv2d(x, WC, None, MC, padding=1, path="sparse"),
     lambda x: reference.masked_conv2d(x, WC, None, MC, 1, 1, 1, 1), XC, None),
    ("interval_linear", lambda x: first(ops.interval_linear(x, R, W, B, M, relu_in=True)),
     lambda x: first(reference.interval_linear(x, R, W, B, M, relu_in=True)), X, "interval_linear_backward"),
    ("sparse interval_linear", lambda x: first(ops.sparse.interval_linear(x, R, W, B, M, relu_in=True)),
     lambda x: first(reference.interval_linear(x, R, W, B, M, relu_in=True)), X,
     "sparse_interval_linear_backward"),
    ("interval_conv2d", lambda x: first(ops.interval_conv2d(x, RC, WC, None, MC, padding=1, relu_in=True)),
     lambda x: first(reference.interval_conv2d(x, RC, WC, None, MC, padding=1, relu_in=True)), XC,
     "interval_conv2d_backward"),
    ("sparse interval_conv2d",
     lambda x: first(ops.sparse.interval_conv2d(x, RC, WC, None, MC, padding=1, relu_in=True)),
     lambda x: first(reference.interval_conv2d(x, RC, WC, None, MC, padding=1, relu_in=True)), XC,
     "sparse_interval_conv2d_backward"),
    ("crown_linear_backward", lambda a: first(ops.crown_linear_backward(a, W, B, M)),
     lambda a: first(reference.crown_linear_backward(a, W, B, M)), torch.randn(2, 4, 5, dtype=torch.float64),
     "crown_linear_backward_grad"),
]


@pytest.mark.parametrize("name,op,twin,x,backward_op", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_second_backward_raises_and_first_order_stays_right(name, op, twin, x, backward_op):
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad((op(a) ** 2).sum(), a, create_graph=True)
    (gb,) = torch.autograd.grad((twin(b) ** 2).sum(), b, create_graph=True)
    torch.testing.assert_close(ga, gb)
    assert ga.requires_grad, f"{name}: a gradient taken with create_graph must be part of the graph"
    if backward_op is None:
        (gb ** 2).sum().backward()
        (ga ** 2).sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
        return
    with pytest.raises(RuntimeError, match=f"derivative for robprune_fast::{backward_op} is not implemented"):
        (ga ** 2).sum().backward()


def test_compressed_conv2d_weight_second_derivative_raises():
    w = WC.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad((ops.masked_conv2d(XC, w, None, MC, padding=1, path="sparse") ** 2).sum(), w,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for robprune_fast::sparse_conv2d_values_grad"):
        (gw ** 2).sum().backward()


def test_crown_relu_backward_second_derivative_raises():
    lower = torch.randn(2, 6, dtype=torch.float64)
    upper = lower + torch.rand(2, 6, dtype=torch.float64)
    A = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    (gA,) = torch.autograd.grad((first(ops.crown_relu_backward(A, lower, upper)) ** 2).sum(), A,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for robprune_fast::crown_relu_backward_grad"):
        (gA ** 2).sum().backward()
