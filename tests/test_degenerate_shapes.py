"""Direct torch.ops calls with empty or degenerate shapes (batch 0, no input or output
features, no rows or specifications, channels_last with batch 1) give what the twin gives,
values and gradients. Shapes no layer has (conv weights with a zero dimension, a kernel larger
than the padded input, an empty spatial input) are refused with an error naming the argument:
those are cases of op_error_cases.py (marked degenerate), run by test_errors_raise.py."""
import pytest
import torch

from tests.helpers.ops import DEVICES
from robprune_fast import reference

OPS = torch.ops.robprune_fast
GEOMETRY = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


# op -> (the op through torch.ops, its twin), both over the same tensors.
CALLS = {
    "interval_linear": (lambda c, r, w, b: OPS.interval_linear(c, r, w, b, None, None, True, True),
                        lambda c, r, w, b: reference.interval_linear(c, r, w, b, None, True, True)),
    "interval_conv2d": (lambda c, r, w, b: OPS.interval_conv2d(c, r, w, b, None, None, *GEOMETRY, True, True),
                        lambda c, r, w, b: reference.interval_conv2d(c, r, w, b, None, 1, 1, 1, 1, True, True)),
    "crown_linear_backward": (lambda A, w, b: OPS.crown_linear_backward(A, w, b, None, None),
                              lambda A, w, b: reference.crown_linear_backward(A, w, b, None)),
    "crown_conv2d_backward": (
        lambda A, w, b: OPS.crown_conv2d_backward(A, w, b, None, None, list(A.shape[-2:]), *GEOMETRY),
        lambda A, w, b: reference.crown_conv2d_backward(A, w, b, None, tuple(A.shape[-2:]), 1, 1, 1, 1)),
    "crown_relu_backward": (lambda A, l, u: OPS.crown_relu_backward(A, l, u, True),
                            lambda A, l, u: reference.crown_relu_backward(A, l, u, True)),
    "input_box": (lambda x, eps: OPS.input_box(x, eps, None, None),
                  lambda x, eps: reference.input_box(x, eps)),
    "masked_weight_pair": (lambda w, m: (OPS.masked_weight_pair(w, m),),
                           lambda w, m: (reference.masked_weight_pair(w, m),)),
}


def box(*shape):
    return [torch.randn(shape), torch.rand(shape)]


def relu_bounds(*shape):
    lower = torch.randn(shape)
    return [lower, lower + torch.rand(shape)]


# (id, op, tensors): each works and matches the twin.
WORKING = [
    ("batch0", "interval_linear", lambda: box(0, 5) + [torch.randn(4, 5), torch.randn(4)]),
    ("in_features0", "interval_linear", lambda: box(3, 0) + [torch.randn(4, 0), torch.randn(4)]),
    ("in_features0_batch0", "interval_linear", lambda: box(2, 0, 0) + [torch.randn(4, 0), torch.randn(4)]),
    ("out_features0", "interval_linear", lambda: box(3, 5) + [torch.randn(0, 5), torch.randn(0)]),
    ("batch0", "interval_conv2d", lambda: box(0, 3, 5, 5) + [torch.randn(4, 3, 3, 3), torch.randn(4)]),
    ("channels_last_batch1", "interval_conv2d",
     lambda: [cl(t) for t in box(1, 3, 5, 5)] + [torch.randn(4, 3, 3, 3), torch.randn(4)]),
    ("channels_last_batch1_1x1", "interval_conv2d",
     lambda: [cl(t) for t in box(1, 3, 1, 1)] + [cl(torch.randn(4, 3, 3, 3)), torch.randn(4)]),
    ("channels_last_batch1_weight", "interval_conv2d",
     lambda: box(1, 3, 5, 4) + [cl(torch.randn(4, 3, 3, 3)), torch.randn(4)]),
    ("rows0", "crown_linear_backward", lambda: [torch.randn(0, 4), torch.randn(4, 5), torch.randn(4)]),
    ("out_features0", "crown_linear_backward", lambda: [torch.randn(3, 0), torch.randn(0, 5), torch.randn(0)]),
    ("out_features0_lead", "crown_linear_backward", lambda: [torch.randn(2, 3, 0), torch.randn(0, 5), None]),
    ("in_features0", "crown_linear_backward", lambda: [torch.randn(3, 4), torch.randn(4, 0), torch.randn(4)]),
    ("rows0", "crown_conv2d_backward", lambda: [torch.randn(0, 4, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)]),
    ("channels_last_batch1", "crown_conv2d_backward",
     lambda: [cl(torch.randn(1, 4, 5, 5)), torch.randn(4, 3, 3, 3), torch.randn(4)]),
    ("channels_last_batch1_1x1", "crown_conv2d_backward",
     lambda: [cl(torch.randn(1, 4, 1, 1)), cl(torch.randn(4, 3, 3, 3)), torch.randn(4)]),
    ("batch0_shared_A", "crown_relu_backward", lambda: [torch.randn(1, 3, 5)] + relu_bounds(0, 5)),
    ("batch0", "crown_relu_backward", lambda: [torch.randn(0, 3, 5)] + relu_bounds(0, 5)),
    ("specs0", "crown_relu_backward", lambda: [torch.randn(2, 0, 5)] + relu_bounds(2, 5)),
    ("neurons0", "crown_relu_backward", lambda: [torch.randn(2, 3, 0)] + relu_bounds(2, 0)),
    ("neurons_last_batch1", "crown_relu_backward",
     lambda: [torch.randn(1, 3, 5, 4, 2).permute(0, 1, 4, 2, 3)] + relu_bounds(1, 2, 5, 4)),
    ("batch0", "input_box", lambda: [torch.rand(0, 3, 4, 4), torch.tensor(0.1)]),
    ("channels0", "input_box", lambda: [torch.rand(2, 0, 4, 4), torch.tensor(0.1)]),
    ("plane0", "input_box", lambda: [torch.rand(2, 3, 0), torch.tensor(0.1)]),
    ("empty", "masked_weight_pair", lambda: [torch.randn(0, 5), torch.ones(0, 5)]),
    ("empty_conv", "masked_weight_pair", lambda: [torch.randn(3, 0, 2, 2), None]),
]


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case_id,name,make", WORKING, ids=[f"{n}-{i}" for i, n, _ in WORKING])
def test_matches_twin(case_id, name, make, dtype, device):
    op, twin = CALLS[name]
    torch.manual_seed(0)
    tensors = [None if t is None else t.to(device, dtype) for t in make()]
    grad = name != "masked_weight_pair"  # a cache, not differentiable
    ins = [[None if t is None else t.detach().clone(memory_format=torch.preserve_format).requires_grad_(grad)
            for t in tensors] for _ in range(2)]
    got, want = op(*ins[0]), twin(*ins[1])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    pairs = [(g, w) for g, w in zip(got, want) if w.requires_grad]
    if not pairs:
        return
    cot = [torch.randn_like(w) for _, w in pairs]
    torch.autograd.backward([g for g, _ in pairs], cot)
    torch.autograd.backward([w for _, w in pairs], cot)
    for i, (a, b) in enumerate(zip(*ins)):
        if a is not None:
            want_grad = b.grad if b.grad is not None else torch.zeros_like(b)
            got_grad = a.grad if a.grad is not None else torch.zeros_like(a)
            torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5, msg=f"grad of input {i}")


def test_relu_box_empty():
    center, radius = torch.randn(0, 3), torch.rand(0, 3)
    OPS.relu_box_(center, radius, True)
    assert center.shape == (0, 3)

