"""crown_relu_backward: kernel against reference twin (values and gradients), opcheck,
gradcheck, soundness of the bound it produces, bad input."""
import pytest
import torch

from tests.helpers.ops import DEVICES, TOL
from robprune_fast import ops, reference


def relu_inputs(batch, specs, neurons, dtype, device, shared=False, stable_frac=0.3):
    lower = torch.randn(batch, *neurons, dtype=dtype, device=device)
    upper = lower + 2 * torch.rand_like(lower)
    # Some neurons entirely active or inactive, and some degenerate boxes.
    upper = torch.where(torch.rand_like(lower) < stable_frac, lower, upper)
    A = torch.randn(1 if shared else batch, specs, *neurons, dtype=dtype, device=device)
    A = A * (torch.rand_like(A) > 0.1)  # exact zeros, as pruned weights give
    return A, lower, upper


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("batch,specs,neurons,shared", [
    (1, 1, (7,), False), (4, 9, (33,), False), (4, 9, (33,), True), (3, 2, (5, 6, 7), False),
    (2, 3, (4, 3, 3), True), (0, 3, (5,), False),
])
def test_matches_reference(device, dtype, upper_side, batch, specs, neurons, shared):
    A, lower, upper = relu_inputs(batch, specs, neurons, dtype, device, shared)
    ins_a = [t.clone().requires_grad_(True) for t in (A, lower, upper)]
    ins_b = [t.clone().requires_grad_(True) for t in (A, lower, upper)]
    got = ops.crown_relu_backward(*ins_a, upper_side=upper_side)
    want = reference.crown_relu_backward(*ins_b, upper_side=upper_side)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])
    cot = [torch.randn_like(w) for w in want]
    torch.autograd.backward(got, cot)
    torch.autograd.backward(want, cot)
    for name, a, b in zip(("A", "lower", "upper"), ins_a, ins_b):
        torch.testing.assert_close(a.grad, b.grad, **TOL[dtype], msg=f"grad of {name}")


def test_non_contiguous_inputs():
    A, lower, upper = relu_inputs(3, 4, (10,), torch.float32, "cpu")
    A_t = A.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    lower_t = torch.stack([lower, lower])[0]
    got = ops.crown_relu_backward(A_t, lower_t, upper, upper_side=True)
    want = reference.crown_relu_backward(A, lower, upper, upper_side=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(shared, device):
    A, lower, upper = relu_inputs(3, 4, (6,), torch.float32, device, shared, stable_frac=0.0)
    for upper_side in (False, True):
        args = [t.clone().requires_grad_(True) for t in (A, lower, upper)]
        torch.library.opcheck(torch.ops.robprune_fast.crown_relu_backward, (*args, upper_side))


@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_float64(upper_side, shared):
    torch.manual_seed(1)
    lower = torch.randn(2, 5, dtype=torch.float64)
    upper = lower + 0.5 + torch.rand_like(lower)  # away from the unstable set's edges
    A = torch.randn(1 if shared else 2, 3, 5, dtype=torch.float64)
    A = torch.where(A.abs() < 0.1, A + 0.3, A)  # away from A = 0, where the split has a kink
    tensors = [t.requires_grad_(True) for t in (A, lower, upper)]
    assert torch.autograd.gradcheck(lambda a, l, u: ops.crown_relu_backward(a, l, u, upper_side), tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bound_is_sound(dtype):
    """sum A relu(z) lies between the lower-side and upper-side linear bounds for sampled z."""
    torch.manual_seed(2)
    A, lower, upper = relu_inputs(3, 5, (40,), dtype, "cpu")
    Al, bl = ops.crown_relu_backward(A, lower, upper, upper_side=False)
    Au, bu = ops.crown_relu_backward(A, lower, upper, upper_side=True)
    slack = 1e-5 if dtype == torch.float32 else 1e-12
    for corner in (False, True):
        t = torch.rand(3, 300, 40, dtype=dtype)
        if corner:
            t = t.round()
        z = lower[:, None] + t * (upper - lower)[:, None]
        exact = torch.einsum("bsn,bpn->bsp", A, torch.relu(z))
        assert (torch.einsum("bsn,bpn->bsp", Al, z) + bl[..., None] <= exact + slack).all()
        assert (torch.einsum("bsn,bpn->bsp", Au, z) + bu[..., None] >= exact - slack).all()


@pytest.mark.parametrize("change,match", [
    (dict(lower=torch.zeros(2, 5, dtype=torch.float64)), "lower must have the dtype of A"),
    (dict(upper=torch.ones(2, 6)), "upper must have the shape of lower"),
    (dict(A=torch.randn(2, 3, 6)), r"A must have shape \(B or 1, S, \*neurons\)"),
    (dict(A=torch.randn(3, 3, 5)), r"A must have shape \(B or 1, S, \*neurons\)"),
    (dict(A=torch.randn(2, 3, 5).half()), "A must be float32 or float64"),
])
def test_bad_input(change, match):
    args = dict(A=torch.randn(2, 3, 5), lower=torch.zeros(2, 5), upper=torch.ones(2, 5))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.crown_relu_backward(**args)


def test_unordered_bounds_refused():
    lower, upper = torch.zeros(2, 5), torch.ones(2, 5)
    upper[1, 3] = -1
    with pytest.raises(RuntimeError, match="lower must be <= upper"):
        ops.crown_relu_backward(torch.randn(2, 3, 5), lower, upper)
    op = torch.ops.robprune_fast.crown_relu_backward
    with pytest.raises(RuntimeError, match="A's first dimension must be 1 or the batch size"):
        op(torch.randn(3, 3, 5), torch.zeros(2, 5), torch.ones(2, 5), False)


def neurons_last(t):
    """(B, S, C, H, W) laid out with the channels innermost, as CROWN's conv steps pass it."""
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_channels_last_A(upper_side, shared):
    """A with its neurons laid out channels-last: same values and gradients as the twin, and
    the output keeps A's layout (the next conv step then runs without a reorder)."""
    A, lower, upper = relu_inputs(3, 4, (5, 6, 7), torch.float64, "cpu", shared)
    ins_a = [t.clone().requires_grad_(True) for t in (neurons_last(A), lower, upper)]
    ins_b = [t.clone().requires_grad_(True) for t in (A, lower, upper)]
    got = ops.crown_relu_backward(*ins_a, upper_side=upper_side)
    want = reference.crown_relu_backward(*ins_b, upper_side=upper_side)
    assert got[0].permute(0, 1, 3, 4, 2).is_contiguous()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    cot = [torch.randn_like(w) for w in want]
    torch.autograd.backward(got, [neurons_last(cot[0]), cot[1]])
    torch.autograd.backward(want, cot)
    for name, a, b in zip(("A", "lower", "upper"), ins_a, ins_b):
        torch.testing.assert_close(a.grad, b.grad, msg=f"grad of {name}")


# Bounds whose width u - l is not finite: it overflows (float32 / float64), or a bound is
# infinite. Each pair (l, u) is one neuron of a (1, 5) bound, the others ordinary.
NON_FINITE = {
    torch.float32: [(-2e38, 2e38), (-3e38, 1e38), (-float("inf"), 1.0), (1.0, float("inf")),
                    (-float("inf"), -1.0)],
    torch.float64: [(-1e308, 1e308), (-1.7e308, 0.5e308), (-float("inf"), 1.0),
                    (1.0, float("inf")), (-float("inf"), float("inf"))],
}


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("specs", [1, 4], ids=["one_row", "shared_lines"])
def test_non_finite_width_gives_nan(device, dtype, upper_side, case, specs):
    """Overflow never tightens the relaxation: where l, u or u - l is not finite (the chord's
    slope u / (u - l) would round to 0 and drop the neuron), the lines are NaN, and so is every
    bound through them, which never certifies. The other batch element is untouched. Kernel
    and twin agree, values and gradients."""
    l0, u0 = NON_FINITE[dtype][case]
    lower = torch.tensor([[-1.0, l0, 0.5, -2.0, -0.5], [-1.0, -1.0, 0.5, -2.0, -0.5]], dtype=dtype)
    upper = torch.tensor([[1.0, u0, 2.0, -1.0, 3.0], [1.0, 2.0, 2.0, -1.0, 3.0]], dtype=dtype)
    slopes = reference.relu_relaxation(lower, upper)
    for t in slopes:
        assert torch.isnan(t[0, 1]) and torch.isfinite(t[1]).all() and torch.isfinite(t[0, [0, 2, 3, 4]]).all()
    A = torch.randn(2, specs, 5, dtype=dtype)
    A[0, 0, 1] = 0.0  # a zero coefficient is no way around it
    ins = [[t.to(device).requires_grad_(True) for t in (A, lower, upper)] for _ in range(2)]
    got = ops.crown_relu_backward(*ins[0], upper_side=upper_side)
    want = reference.crown_relu_backward(*ins[1], upper_side=upper_side)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, **TOL[dtype])
    new_A, bias = got
    assert torch.isnan(new_A[0, :, 1]).all() and torch.isnan(bias[0]).all()
    assert torch.isfinite(new_A[1]).all() and torch.isfinite(bias[1]).all()
    cot = [torch.randn_like(w) for w in want]
    torch.autograd.backward(got, cot)
    torch.autograd.backward(want, cot)
    for name, a, b in zip(("A", "lower", "upper"), *ins):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, **TOL[dtype], msg=f"grad of {name}")
