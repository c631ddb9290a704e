"""crown_linear_backward: kernel against reference twin (values and gradients, mask included),
opcheck, gradcheck, exactness of the step, the weight cache, bad input."""
import pytest
import torch

from tests.helpers.ops import DEVICES, MASKS, TOL, compare_with_reference, make_mask
from robprune_fast import ops

@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lead,out_f,in_f,bias", [
    ((1, 1), 5, 3, True), ((4, 9), 33, 17, True), ((4, 9), 10, 512, False), ((3,), 7, 7, True),
    ((), 6, 4, True), ((0, 3), 5, 4, True), ((2, 3, 4), 1, 1, True),
])
def test_matches_reference(device, dtype, mask, lead, out_f, in_f, bias):
    weight = torch.randn(out_f, in_f, dtype=dtype, device=device)
    tensors = dict(A=torch.randn(*lead, out_f, dtype=dtype, device=device), weight=weight,
                   bias=torch.randn(out_f, dtype=dtype, device=device) if bias else None,
                   mask=make_mask(mask, weight))
    compare_with_reference("crown_linear_backward", tensors, {}, dtype)


def test_non_contiguous_inputs():
    A = torch.randn(9, 4, 6).transpose(0, 1)  # (4, 9, 6), permuted strides
    weight = torch.randn(5, 6).t()  # (6, 5), a transposed view
    tensors = dict(A=A, weight=weight, bias=torch.randn(6), mask=make_mask("random", weight))
    compare_with_reference("crown_linear_backward", tensors, {}, torch.float32)


def test_step_is_exact():
    """A @ (W h + b) == (A W) @ h + A @ b for any h: the step loses nothing."""
    torch.manual_seed(0)
    weight, bias = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    mask = make_mask("random", weight)
    A = torch.randn(3, 4, 7, dtype=torch.float64)
    new_A, term = ops.crown_linear_backward(A, weight, bias, mask)
    h = torch.randn(3, 5, dtype=torch.float64)
    direct = torch.einsum("bso,bo->bs", A, torch.nn.functional.linear(h, weight * mask, bias))
    torch.testing.assert_close(torch.einsum("bsi,bi->bs", new_A, h) + term, direct)


@pytest.mark.parametrize("bias,mask", [(True, "random"), (False, "none"), (True, "zeros")])
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(bias, mask, device):
    weight = torch.randn(6, 4, device=device, requires_grad=True)
    args = (torch.randn(3, 2, 6, device=device, requires_grad=True), weight,
            torch.randn(6, device=device, requires_grad=True) if bias else None,
            None if mask == "none" else make_mask(mask, weight.detach()).requires_grad_(True), None)
    torch.library.opcheck(torch.ops.robprune_fast.crown_linear_backward, args)


def test_gradcheck_float64():
    torch.manual_seed(1)
    tensors = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
               for s in ((2, 3, 6), (6, 4), (6,), (6, 4))]
    assert torch.autograd.gradcheck(lambda *t: ops.crown_linear_backward(*t), tensors)


def test_weight_cache_follows_updates():
    """Inside weight_cache() the effective weight is made once, and remade after the weight
    changes through a torch op."""
    weight, mask = torch.randn(5, 4), make_mask("random", torch.empty(5, 4))
    A = torch.randn(2, 3, 5)
    with ops.weight_cache():
        first, _ = ops.crown_linear_backward(A, weight, None, mask)
        torch.testing.assert_close(first, A @ (weight * mask))
        with torch.no_grad():
            weight.mul_(2)
        second, _ = ops.crown_linear_backward(A, weight, None, mask)
    torch.testing.assert_close(second, A @ (weight * mask))


@pytest.mark.parametrize("change,match", [
    (dict(A=torch.randn(2, 3, 5)), "A's last dimension must equal weight.size"),
    (dict(weight=torch.randn(4, 3, dtype=torch.float64)), "weight must have the dtype of A"),
    (dict(weight=torch.randn(4, 3, 1)), "weight must be 2-D"),
    (dict(bias=torch.randn(3)), r"bias must have shape \(4,\)"),
    (dict(mask=torch.ones(3, 4)), "mask must have the shape of weight"),
    (dict(A=torch.randn(2, 4).half()), "A must be float32 or float64"),
])
def test_bad_input(change, match):
    args = dict(A=torch.randn(2, 4), weight=torch.randn(4, 3), bias=torch.randn(4), mask=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.crown_linear_backward(**args)
    # The C++ checks give the same message to a direct torch.ops call.
    with pytest.raises(RuntimeError, match=match):
        torch.ops.robprune_fast.crown_linear_backward(*args.values(), None)
