"""Every op's bad input, called through torch.ops.robprune_fast directly so that the C++ checks
fire (the Python wrappers would refuse most of it first): one table of (op, arguments,
expected message), the cases of the op tests' bad-input tests plus the shapes no layer has
(tests/test_degenerate_shapes.py has the degenerate shapes that work) and the weight pairs that are
not masked_weight_pair(weight, mask). tests/test_errors_raise.py runs the whole table in a
subprocess (a check that crashed would take pytest down with it), then case by case.

    python -m tests.helpers.op_error_cases cpu [cuda]

runs the table on those devices and prints one JSON line per case (what the subprocess does).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable

import torch

import robprune_fast.ops  # noqa: F401  (loads the extension: registers torch.ops.robprune_fast)

F32, F64 = torch.float32, torch.float64
WEIGHT_PAIR = r"weight_pair must be masked_weight_pair\(weight, mask\)"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    op: str
    args: Callable[[str], tuple]  # device -> the op's arguments
    match: str  # a regex the error's message must contain

    def call(self, device: str):
        return getattr(torch.ops.robprune_fast, self.op)(*self.args(device))


def randn(*shape, d, dtype=F32):
    return torch.randn(shape, dtype=dtype, device=d)


def rand(*shape, d, dtype=F32):
    return torch.rand(shape, dtype=dtype, device=d)


def ones(*shape, d, dtype=F32):
    return torch.ones(shape, dtype=dtype, device=d)


def pair(weight, mask=None):
    return torch.ops.robprune_fast.masked_weight_pair(weight, mask)


# --- interval family --------------------------------------------------------------------------


def masked_weight_pair_cases():
    op = "masked_weight_pair"
    return [
        Case("pair-half-weight", op, lambda d: (randn(3, 4, d=d).half(), None), "weight must be float32 or float64"),
        Case("pair-mask-shape", op, lambda d: (randn(3, 4, d=d), ones(4, 3, d=d)),
             "mask must have the shape of weight"),
        Case("pair-mask-dtype", op, lambda d: (randn(3, 4, d=d), ones(3, 4, d=d, dtype=F64)),
             "mask must have the dtype of weight"),
    ]


def input_box_cases():
    op = "input_box"

    def args(x=None, eps=None, scale=None, shift=None):
        return lambda d: (rand(2, 3, 4, 4, d=d) if x is None else x(d),
                          torch.tensor(0.1, device=d) if eps is None else eps(d),
                          None if scale is None else scale(d), None if shift is None else shift(d))

    return [
        Case("box-x-outside", op, args(x=lambda d: torch.full((2, 3, 4, 4), 1.5, device=d)), r"x must lie in \[0, 1\]"),
        Case("box-x-nan", op, args(x=lambda d: torch.full((2, 3, 4, 4), float("nan"), device=d)),
             r"x must lie in \[0, 1\]"),
        Case("box-eps-negative", op, args(eps=lambda d: torch.tensor(-0.1, device=d)), "eps must be >= 0"),
        Case("box-eps-shape", op, args(eps=lambda d: ones(4, d=d)), "eps must have one element or the shape of x"),
        Case("box-scale-shape", op, args(scale=lambda d: ones(4, d=d)), r"scale must have shape \(C,\) = \(3,\)"),
        Case("box-shift-dtype", op, args(shift=lambda d: ones(3, d=d, dtype=F64)), "shift must have the dtype of x"),
        Case("box-x-half", op,
             args(x=lambda d: rand(2, 3, 4, 4, d=d).half(), eps=lambda d: torch.tensor(0.1, device=d).half()),
             "x must be float32 or float64"),
        Case("box-x-1d", op, args(x=lambda d: rand(5, d=d)), r"x must have shape \(N, C, \*\)"),
    ]


def relu_box_cases():
    op = "relu_box_"

    def args(make):
        return lambda d: (*make(randn(4, 6, d=d), rand(4, 6, d=d)), True)

    return [
        Case("relu_box-negative", op, args(lambda c, r: (c, -r - 1)), "radius must be >= 0"),
        Case("relu_box-nan", op, args(lambda c, r: (c, torch.full_like(r, float("nan")))), "radius must be >= 0"),
        Case("relu_box-dtype", op, args(lambda c, r: (c, r.double())), "radius must have the dtype of center"),
        Case("relu_box-shape", op, args(lambda c, r: (c, r[:2])), "radius must have the shape of center"),
        Case("relu_box-half", op, args(lambda c, r: (c.half(), r.half())), "center must be float32 or float64"),
        Case("relu_box-layout", op, args(lambda c, r: (c, r.t().contiguous().t())), "dense and laid out alike"),
        Case("relu_box-strided", op, args(lambda c, r: (c[:, ::2], r[:, ::2])), "dense and laid out alike"),
        Case("relu_box-overlap", op, args(lambda c, r: (c, c)), "unsupported operation|overlap"),
    ]


def interval_linear_cases():
    op = "interval_linear"

    def args(c=None, r=None, w=None, b=None, m=None, p=None):
        def make(d):
            weight = randn(2, 4, d=d) if w is None else w(d)
            return (randn(3, 4, d=d) if c is None else c(d), rand(3, 4, d=d) if r is None else r(d), weight,
                    randn(2, d=d) if b is None else b(d), None if m is None else m(d),
                    None if p is None else p(d, weight), False, True)
        return make

    return [
        Case("linear-radius-shape", op, args(r=lambda d: rand(3, 5, d=d)), "radius must have the shape of center"),
        Case("linear-radius-dtype", op, args(r=lambda d: rand(3, 4, d=d, dtype=F64)),
             "radius must have the dtype of center"),
        Case("linear-center-half", op, args(c=lambda d: randn(3, 4, d=d).half(), r=lambda d: rand(3, 4, d=d).half()),
             "center must be float32 or float64"),
        Case("linear-center-int", op, args(c=lambda d: torch.randint(0, 3, (3, 4), device=d)),
             "center must be float32 or float64"),
        Case("linear-in-features", op, args(w=lambda d: randn(2, 5, d=d)), r"in_features = 5"),
        Case("linear-weight-3d", op, args(w=lambda d: randn(2, 4, 1, d=d)), "weight must be 2-D"),
        Case("linear-bias-shape", op, args(b=lambda d: randn(3, d=d)), r"bias must have shape \(2,\)"),
        Case("linear-mask-shape", op, args(m=lambda d: ones(4, 2, d=d)), "mask must have the shape of weight"),
        Case("linear-pair-shape", op, args(p=lambda d, w: ones(2, 4, d=d)), "weight_pair must have shape"),
        Case("linear-pair-other-weight", op, args(p=lambda d, w: pair(torch.randn_like(w))), WEIGHT_PAIR),
        Case("linear-pair-negated", op,
             args(p=lambda d, w: pair(w) * torch.tensor([1.0, -1.0], device=d).view(2, 1, 1)),
             WEIGHT_PAIR),
        Case("linear-radius-negative", op, args(r=lambda d: -rand(3, 4, d=d) - 1), "radius must be >= 0"),
        Case("linear-radius-nan", op, args(r=lambda d: torch.full((3, 4), float("nan"), device=d)),
             "radius must be >= 0"),
    ]


def interval_linear_backward_cases():
    op = "interval_linear_backward"

    def args(grad_shape, w=None, p=None):
        def make(d):
            weight = randn(2, 4, d=d)
            return (randn(*grad_shape, d=d), randn(*grad_shape, d=d), randn(3, 4, d=d), rand(3, 4, d=d),
                    weight, None, None if p is None else p(d, weight), True, True, [True] * 5)
        return make

    return [
        Case("linear_backward-grad-shape", op, args((3, 3)), "grad_a and grad_b must have the layer's output shape"),
        Case("linear_backward-pair-other-weight", op, args((3, 2), p=lambda d, w: pair(torch.randn_like(w))),
             WEIGHT_PAIR),
    ]


def interval_conv2d_cases():
    op = "interval_conv2d"

    def args(c=None, r=None, w=None, m=None, p=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
        def make(d):
            center = randn(2, 4, 8, 8, d=d) if c is None else c(d)
            weight = randn(2, 4, 3, 3, d=d) if w is None else w(d)
            radius = torch.rand_like(center) if r is None else r(d)
            return (center, radius, weight, None, None if m is None else m(d), None if p is None else p(d, weight),
                    list(stride), list(padding), list(dilation), groups, False, False)
        return make

    # Shapes no layer has.
    degenerate = [
        Case("conv-out-channels0", op, args(w=lambda d: randn(0, 4, 3, 3, d=d)),
             r"weight must have .*out_channels.* >= 1.*got shape \[0, 4, 3, 3\]"),
        Case("conv-in-channels0", op, args(c=lambda d: randn(2, 0, 8, 8, d=d), w=lambda d: randn(2, 0, 3, 3, d=d)),
             r"weight must have .*in_channels.* >= 1.*got shape \[2, 0, 3, 3\]"),
        Case("conv-kernel0", op, args(w=lambda d: randn(2, 4, 0, 3, d=d)),
             r"weight must have .*kH, kW.* >= 1.*got shape \[2, 4, 0, 3\]"),
        Case("conv-kernel-larger", op, args(w=lambda d: randn(2, 4, 9, 3, d=d), padding=(0, 0)),
             r"center's spatial size \[8, 8\] plus padding \[0, 0\] is smaller than the dilated kernel \(9\)"),
        Case("conv-spatial0", op, args(c=lambda d: randn(2, 4, 0, 8, d=d), w=lambda d: randn(2, 4, 1, 1, d=d),
                                       padding=(1, 1)),
             r"center's spatial size must be positive, got \[0, 8\]"),
    ]
    return degenerate + [
        Case("conv-center-3d", op, args(c=lambda d: randn(2, 4, 8, d=d)), "center must be 4-D"),
        Case("conv-in-channels", op, args(w=lambda d: randn(2, 3, 3, 3, d=d)), "weight expects in_channels"),
        Case("conv-mask-shape", op, args(m=lambda d: ones(2, 4, 3, 1, d=d)), "mask must have the shape of weight"),
        Case("conv-stride0", op, args(stride=(0, 1)), "stride must be two positive ints"),
        Case("conv-groups-divide", op, args(groups=3), r"must be divisible by groups = 3"),
        Case("conv-groups0", op, args(groups=0), "groups must be positive"),
        Case("conv-padding-negative", op, args(padding=(-1, -1)), "padding must be two non-negative ints"),
        Case("conv-radius-dtype", op, args(r=lambda d: rand(2, 4, 8, 8, d=d, dtype=F64)),
             "radius must have the dtype of center"),
        Case("conv-dilation", op, args(dilation=(5, 5)), "smaller than the dilated kernel"),
        Case("conv-radius-negative", op, args(r=lambda d: -rand(2, 4, 8, 8, d=d) - 1), "radius must be >= 0"),
        Case("conv-pair-other-weight", op, args(p=lambda d, w: pair(torch.randn_like(w))), WEIGHT_PAIR),
    ]


def interval_conv2d_backward_cases():
    op = "interval_conv2d_backward"

    def args(grad_shape, w=None):
        def make(d):
            g = randn(*grad_shape, d=d)
            return (g, g, randn(2, 4, 8, 8, d=d), rand(2, 4, 8, 8, d=d), randn(2, 4, 3, 3, d=d) if w is None else w(d),
                    None, None, [1, 1], [0, 0], [1, 1], 1, False, False, [True] * 5)
        return make

    return [
        Case("conv_backward-grad-shape", op, args((2, 2, 6)), "grad_a and grad_b must have the layer's output shape"),
        Case("conv_backward-out-channels0", op, args((2, 0, 6, 6), w=lambda d: randn(0, 4, 3, 3, d=d)),
             r"weight must have .*out_channels.* >= 1"),
    ]


# --- CROWN family -----------------------------------------------------------------------------


def crown_relu_cases():
    op = "crown_relu_backward"

    def args(A=None, lower=None, upper=None):
        return lambda d: (randn(2, 3, 5, d=d) if A is None else A(d),
                          torch.zeros(2, 5, device=d) if lower is None else lower(d),
                          ones(2, 5, d=d) if upper is None else upper(d), False)

    def unordered(d):
        upper = ones(2, 5, d=d)
        upper[1, 3] = -1
        return upper

    return [
        Case("relu-lower-dtype", op, args(lower=lambda d: torch.zeros(2, 5, dtype=F64, device=d)),
             "lower must have the dtype of A"),
        Case("relu-upper-shape", op, args(upper=lambda d: ones(2, 6, d=d)), "upper must have the shape of lower"),
        Case("relu-A-neurons", op, args(A=lambda d: randn(2, 3, 6, d=d)),
             r"A must have shape \(B or 1, S, \*neurons\)"),
        Case("relu-A-batch", op, args(A=lambda d: randn(3, 3, 5, d=d)),
             "A's first dimension must be 1 or the batch size"),
        Case("relu-A-half", op, args(A=lambda d: randn(2, 3, 5, d=d).half()), "A must be float32 or float64"),
        Case("relu-lower-0d", op, args(A=lambda d: randn(1, 3, d=d), lower=lambda d: torch.tensor(0.0, device=d),
                                       upper=lambda d: torch.tensor(1.0, device=d)),
             r"lower must have shape \(B, \*neurons\)"),
        Case("relu-unordered", op, args(upper=unordered), "lower must be <= upper"),
        Case("relu-nan-bound", op, args(lower=lambda d: torch.full((2, 5), float("nan"), device=d)),
             "lower must be <= upper"),
    ]


def crown_relu_grad_cases():
    op = "crown_relu_backward_grad"
    return [
        Case("relu_grad-shapes", op, lambda d: (randn(2, 3, 4, d=d), randn(2, 3, d=d), randn(2, 3, 5, d=d),
                                                torch.zeros(2, 5, device=d), ones(2, 5, d=d), False),
             "grad_A_out and grad_bias must have the shapes of crown_relu_backward's outputs"),
    ]


def crown_linear_cases():
    op = "crown_linear_backward"

    def args(A=None, w=None, b=None, m=None, p=None):
        def make(d):
            weight = randn(4, 3, d=d) if w is None else w(d)
            return (randn(2, 4, d=d) if A is None else A(d), weight, randn(4, d=d) if b is None else b(d),
                    None if m is None else m(d), None if p is None else p(d, weight))
        return make

    return [
        Case("crown_linear-A-last", op, args(A=lambda d: randn(2, 3, 5, d=d)),
             "A's last dimension must equal weight.size"),
        Case("crown_linear-weight-dtype", op, args(w=lambda d: randn(4, 3, d=d, dtype=F64)),
             "weight must have the dtype of A"),
        Case("crown_linear-weight-3d", op, args(w=lambda d: randn(4, 3, 1, d=d)), "weight must be 2-D"),
        Case("crown_linear-bias-shape", op, args(b=lambda d: randn(3, d=d)), r"bias must have shape \(4,\)"),
        Case("crown_linear-mask-shape", op, args(m=lambda d: ones(3, 4, d=d)), "mask must have the shape of weight"),
        Case("crown_linear-A-half", op, args(A=lambda d: randn(2, 4, d=d).half()), "A must be float32 or float64"),
        Case("crown_linear-pair-other-weight", op, args(p=lambda d, w: pair(torch.randn_like(w))), WEIGHT_PAIR),
    ]


def crown_linear_grad_cases():
    op = "crown_linear_backward_grad"
    return [
        Case("crown_linear_grad-shapes", op,
             lambda d: (randn(2, 4, d=d), randn(2, d=d), randn(2, 4, d=d), randn(4, 3, d=d), None, None, None,
                        [True] * 4),
             "grad_A_out and grad_bias_term must have the shapes of crown_linear_backward's outputs"),
    ]


def crown_conv2d_cases():
    op = "crown_conv2d_backward"

    def args(A=None, w=None, b=None, m=None, p=None, input_size=(8, 8), stride=(2, 2), padding=(1, 1), groups=1):
        def make(d):
            weight = randn(6, 4, 3, 3, d=d) if w is None else w(d)
            return (randn(2, 6, 4, 4, d=d) if A is None else A(d), weight, randn(6, d=d) if b is None else b(d),
                    None if m is None else m(d), None if p is None else p(d, weight), list(input_size), list(stride),
                    list(padding), [1, 1], groups)
        return make

    # Shapes no layer has.
    degenerate = [
        Case("crown_conv-out-channels0", op,
             args(A=lambda d: randn(2, 0, 4, 4, d=d), w=lambda d: randn(0, 4, 3, 3, d=d), b=lambda d: randn(0, d=d)),
             r"weight must have .*out_channels.* >= 1.*got shape \[0, 4, 3, 3\]"),
        Case("crown_conv-in-channels0", op, args(w=lambda d: randn(6, 0, 3, 3, d=d)),
             r"weight must have .*in_channels.* >= 1.*got shape \[6, 0, 3, 3\]"),
        Case("crown_conv-kernel-larger", op, args(input_size=(1, 1), padding=(0, 0)),
             "input_size's spatial size .* is smaller than the dilated kernel"),
    ]
    return degenerate + [
        Case("crown_conv-A-2d", op, args(A=lambda d: randn(6, 16, d=d)),
             r"A must have shape \(\*, C_out, H_out, W_out\)"),
        Case("crown_conv-A-channels", op, args(A=lambda d: randn(2, 5, 4, 4, d=d)),
             r"A's channel dimension \(dim -3\)"),
        Case("crown_conv-weight-dtype", op, args(w=lambda d: randn(6, 4, 3, 3, d=d, dtype=F64)),
             "weight must have the dtype of A"),
        Case("crown_conv-mask-shape", op, args(m=lambda d: ones(6, 4, 3, 1, d=d)),
             "mask must have the shape of weight"),
        Case("crown_conv-input-size0", op, args(input_size=(0, 8)), "input_size must be two positive ints"),
        Case("crown_conv-groups0", op, args(groups=0), "groups must be positive"),
        Case("crown_conv-stride0", op, args(stride=(2, 0)), "stride must be two positive ints"),
        Case("crown_conv-input-size", op, args(input_size=(12, 8)),
             "A's spatial size .* must be the layer's output size"),
        Case("crown_conv-groups-divide", op, args(groups=4),
             r"weight.size\(0\) \(out_channels = 6\) must be divisible by groups = 4"),
        Case("crown_conv-pair-other-weight", op, args(p=lambda d, w: pair(torch.randn_like(w))), WEIGHT_PAIR),
    ]


def crown_conv2d_grad_cases():
    op = "crown_conv2d_backward_grad"
    return [
        Case("crown_conv_grad-shapes", op, lambda d: (randn(2, 4, 8, 7, d=d), randn(2, d=d), randn(2, 6, 4, 4, d=d),
                                                      randn(6, 4, 3, 3, d=d), None, None, None, [8, 8], [2, 2], [1, 1],
                                                      [1, 1], 1, [True] * 4),
             "grad_A_out and grad_bias_term must have the shapes of crown_conv2d_backward's outputs"),
    ]


CASES = (masked_weight_pair_cases() + input_box_cases() + relu_box_cases() + interval_linear_cases()
         + interval_linear_backward_cases() + interval_conv2d_cases() + interval_conv2d_backward_cases()
         + crown_relu_cases() + crown_relu_grad_cases() + crown_linear_cases() + crown_linear_grad_cases()
         + crown_conv2d_cases() + crown_conv2d_grad_cases())
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def run(devices):
    """Runs every case on every device; prints a START line before each (so a crash names its
    case) and a JSON result line after."""
    for device in devices:
        for case in CASES:
            key = f"{case.id}@{device}"
            print(f"START {key}", flush=True)
            try:
                case.call(device)
                result = dict(key=key, error=None, message="")
            except Exception as error:  # every kind, to report what was raised instead
                result = dict(key=key, error=type(error).__name__, message=str(error))
            print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    run(sys.argv[1:] or ["cpu"])
