"""Rounding: what makes every bound sound in floating point, for the model's own floating-point
forward as well as for the exact network. Two ways: IBP widens its boxes as it goes
(``Widening``, at the end of this docstring); the CROWN methods carry a budget (``Budget``).

Why. The engine computes in float32 (or float64). Each dot product it evaluates, and each one
the model's own forward evaluates, is off by rounding: summing n terms in any order, with
IEEE arithmetic rounding to nearest, lands within gamma_n * (sum of |terms|) of the exact sum,
gamma_n = n u / (1 - n u), u the unit roundoff (Higham, Accuracy and Stability of Numerical
Algorithms, ch. 3). With logits in the thousands those errors exceed any fixed tolerance, and a
bound computed in exact-arithmetic style can certify a point that the model's float32 forward
misclassifies.

The budget (CROWN-IBP, CROWN). Alongside the IBP walk the engine carries T, per neuron of the layer reached, the sum over
earlier layers of each layer's local rounding error propagated through the magnitudes of the
layers after it:

    T_in = gamma_8 * h_0,     T_out = |W| (T + gamma_w * h) + gamma_b * |b|   (linear, conv)

per input, where h is an upper bound of |x| over the layer's input box (|centre| + radius),
gamma_w covers the layer's dot products (fan-in for the forward and IBP, fan-out for CROWN's
A W) and gamma_b the sums over all the layer's neurons (CROWN's bias terms). Element-wise maps
scale T by |scale|, pooling pools it. A ReLU stops T at neurons it proves inactive (0 in every
computation) and adds gamma_16 * h at unstable ones for the relaxation. T costs one more GEMM
per layer, like the radius. By induction (each layer's magnitude map bounds how an error at
its input moves its output), T bounds:
  - the model's own forward: |f_float(x) - f(x)| <= T for every x in the ball;
  - the IBP computation: centre and radius each within T of their exact values;
  - a CROWN sweep from a specification C: its bound within |C| T of the exact-arithmetic
    one (the A matrices' errors at every step are |A| times a local term of T, and |A| is at
    most |C| times the magnitudes of the layers after; relaxation slopes lie in [0, 1]).
(For IBP the errors of centre and radius together stay within T, since h = |centre| + radius
covers both.) So a bound moved outward by KAPPA * |C| T (KAPPA = 3 >= 1 for the computation +
1 for the forward, with room for second-order terms: the rounding of T itself, products of
(1 + gamma)) holds for the exact network and for the model's float forward, and every
intermediate bound moved outward by KAPPA * T holds for the exact pre-activations that the
relaxations need. CROWN's last step, the concretisation over the input
box (a sum over every input pixel), runs in float64.

What is guaranteed. A certificate covers the model as the engine reads it, evaluated in the
engine's dtype with IEEE float32 / float64 arithmetic in any summation order: PyTorch's CPU
kernels, and CUDA with TF32 and reduced-precision reductions off. It does not cover a forward in
bfloat16/float16 or TF32, nor convolution algorithms that transform the input (FFT, Winograd;
cuDNN may pick them on the GPU), nor batch statistics of a batch norm in training mode (their
rounding is not bounded; training never needs certificates). Both are worst-case bounds:
typical errors are far smaller, so they cost little tightness (BENCHMARKS.md measures it).

The widening (IBP). A box needs no separate budget: each op's rounding is added to its own
output radius (``Widening``), which costs a few element-wise passes and no product, where the
budget costs one more product per layer. CROWN needs the budget because its sweeps reuse the
IBP stage's bounds and their rounding through |A|.
"""
from __future__ import annotations

import math

import torch

KAPPA = 3.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next float: 2^-24 (float32) or 2^-53 (float64)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u): the relative error of a sum of n terms; inf once n u >= 1."""
    nu = n * unit_roundoff(dtype)
    return nu / (1 - nu) if nu < 1 else float("inf")


def magnitude(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """An upper bound of |x| over the box (c, r), per input."""
    return c.abs() + r


class Budget:
    """The rounding budget T of one bound computation, carried through the walk (see above).

    ``T`` has the shape (B, *neurons) of the layer reached: one budget per input, so a point's
    certificate never depends on the batch it came in. Ops move it with their ``rounding``
    method; a ReLU moves it itself (``through_relu``) and keeps KAPPA * T of its input as
    ``slack`` for its pre-activation bounds.
    """

    def __init__(self, x: torch.Tensor, eps: torch.Tensor, forward_dtype: torch.dtype,
                 crown: bool):
        """The budget at the input: x (B, ...) in [0, 1], its ball clipped to [0, 1].
        forward_dtype: the dtype the model's own forward runs in; the budget takes the unit
        roundoff of the coarser of it and x's (the engine's). crown: a CROWN sweep will run,
        whose transposed products and bias sums round too (IBP alone needs neither)."""
        coarser = max((x.dtype, forward_dtype), key=unit_roundoff)
        self.dtype, self.crown = coarser, crown
        self.T = gamma(8, coarser) * (x + eps).clamp(max=1)
        self.relu_magnitude = None

    def magnitude(self, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """|input| of the next op. Right after a ReLU it is what the ReLU lets through (its
        widened upper bound, clipped at 0), whether the box went through the ReLU in place or
        is still pending: both paths then carry the same budget."""
        return self.relu_magnitude if self.relu_magnitude is not None else magnitude(c, r)

    def through_relu(self, relu, c: torch.Tensor, r: torch.Tensor) -> None:
        """The budget through a ReLU whose input box is (c, r). Where the widened upper bound is
        <= 0 the neuron is 0 in the exact network and in the float forward alike (and CROWN's
        relaxation multiplies it by an exact 0): its budget stops there. Where the widened
        lower bound is >= 0 the ReLU is the identity. Only unstable neurons add the rounding of
        their relaxation."""
        slack = KAPPA * self.T
        relu.slack = slack
        upper, lower = c + r + slack, c - r - slack
        live = upper > 0
        unstable = live & (lower < 0)
        self.T = torch.where(live, self.T, 0) + torch.where(unstable, self.gamma(16) * (c.abs() + r), 0)
        self.relu_magnitude = torch.relu(upper)

    def gamma(self, n: int) -> float:
        return gamma(n, self.dtype)

    def slack(self, C: torch.Tensor | None = None) -> torch.Tensor:
        """KAPPA * T, or KAPPA * |C| T per specification row: (B, *neurons) or (B, S)."""
        if C is None:
            return KAPPA * self.T
        return KAPPA * (C.abs() @ self.T.flatten(1).unsqueeze(-1)).squeeze(-1)


class Widening:
    """IBP's rounding folded into its boxes (IBP alone needs no separate budget).

    Each op's dot products (n terms) are off by at most gamma_n (|W| |v| + |b|) in the
    centre and in the model's own forward, v what each reads (the centre, a point of the box),
    and the radius is rounded down by at most a factor (1 - gamma_n). Before each op that
    rounds, the input radius grows by 6 gamma_n u, u the largest value the op reads
    (|centre| + radius, or relu(centre + radius) under a pending ReLU): every point of the old
    box then lies 6 gamma_n u inside the new one, which through |W| covers both errors with room
    for the ReLU box's own element-wise rounding. One exception: where a pending ReLU clamps a
    box's lower end at 0 the widening cannot move that end, but there every point is >= 0, so
    the forward's error is paid by its own distance from the end, and the centre's error
    (gamma_n |W| c, c = r there) by growing the output radius by the factor (1 + 3 gamma_n),
    which also undoes its rounding down. A bias adds 3 gamma_n |b|. So the widened box holds
    the exact outputs and the float forward's, and the next op starts from a box that holds
    both. Element-wise sums (a residual block's) widen by 3 gamma_2 (|c| + r); the last bounds
    are rounded outward (one ulp). This costs a few element-wise passes per layer and no
    product: a tracked budget would cost one more convolution per layer, which CROWN needs
    (``Budget``) but IBP does not.
    """

    def __init__(self, dtype: torch.dtype, forward_dtype: torch.dtype):
        self.dtype = max((dtype, forward_dtype), key=unit_roundoff)

    def gamma(self, n: int) -> float:
        return gamma(n, self.dtype)

    # Without autograd the passes reuse their buffers (three passes and one new tensor before
    # an op, one pass after it): on a large network they are most of what soundness costs.

    def before(self, op, c: torch.Tensor, r: torch.Tensor, relu_pending: bool) -> torch.Tensor:
        """The radius an op reads (a new tensor; r is left as it is)."""
        if not op.terms:
            return r
        alpha = 6 * self.gamma(op.terms + 2)
        if torch.is_grad_enabled():
            u = torch.relu(c + r) if relu_pending else c.abs() + r
            return torch.add(r, u, alpha=alpha)
        u = torch.add(c, r).relu_() if relu_pending else torch.abs(c).add_(r)
        return torch.add(r, u, alpha=alpha, out=u)

    def after(self, op, r: torch.Tensor) -> torch.Tensor:
        """The op's output radius widened (in place without autograd: it is the op's own)."""
        if not op.terms:
            return r
        g = self.gamma(op.terms + 2)
        added = op.added_magnitude()
        if torch.is_grad_enabled():
            r = r * (1 + 3 * g)
            return r if added is None else torch.add(r, added, alpha=3 * g)
        if added is None:
            return r.mul_(1 + 3 * g)
        return torch.add(added * (3 * g), r, alpha=1 + 3 * g, out=r)

    def around_sum(self, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The radius of an element-wise sum (or of a last ReLU box) widened by its rounding
        in the centre, the radius and the forward."""
        return torch.add(r, c.abs() + r, alpha=3 * self.gamma(2))

    @staticmethod
    def outward(lower: torch.Tensor, upper: torch.Tensor):
        """(lower, upper) moved one ulp outward: the rounding of c - r and c + r."""
        return (torch.nextafter(lower, lower.new_tensor(-math.inf)),
                torch.nextafter(upper, upper.new_tensor(math.inf)))
