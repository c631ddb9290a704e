"""Loss fusion for CROWN-IBP training: a sound upper bound on the cross-entropy loss itself.

Without fusion, CROWN-IBP bounds the K-1 margins ``z_y - z_j`` (K-1 specification rows per input,
swept back through the whole network) and trains on ``log(1 + sum_j exp(-lower_j))``.  Fusion
bounds the loss ``CE(z, y) = log(sum_j exp(t_j))`` with ``t_j = z_j - z_y`` (t_y = 0) directly,
so the backward sweep carries ONE row per input:

1. IBP (already run for CROWN-IBP's intermediate bounds) gives l_j <= t_j <= u_j on the ball:
   the margins' IBP bounds with the sign flipped.
2. exp is convex, so on [l_j, u_j] it lies below its chord:
       exp(t) <= exp(l_j) + b_j (t - l_j),   b_j = (exp(u_j) - exp(l_j)) / (u_j - l_j) >= 0.
   Hence for every input of the ball
       s(x) = sum_j exp(t_j(x)) <= 1 + sum_{j != y} (a_j + b_j t_j(x)),   a_j = exp(l_j) - b_j l_j,
   a linear function of the logits: its coefficient row is sum_j b_j (e_j - e_y).
3. One CROWN-IBP sweep from that row gives U >= max over the ball of the right-hand side.
4. log is increasing, so  CE(z(x), y) = log s(x) <= log U  for every x of the ball.

(auto_LiRPA also relaxes log by a tangent line; since s's linear bound does not depend on where that
tangent touches, taking log of the concretised bound, as here, is the optimum of that choice.)

Numerics: everything is scaled by exp(-M), M = max(0, max_j u_j), so no exp overflows; the scale
cancels exactly in log U = M + log(U e^-M).  The chord slope uses expm1 for narrow intervals.  The
bound is sound up to float rounding, like every bound of ``bounds``: errors of a few ulps of the
magnitudes summed (the intercepts a_j cancel b_j t_j when |t_j| is large, so the absolute error
scales with b_j |l_j|).  It is a training loss, never a certificate: verification goes through
``bounds.verified_accuracy``, with its tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bounds


def exp_chord(lower: torch.Tensor, upper: torch.Tensor, shift: torch.Tensor):
    """(slope, intercept) of the chord of exp(t - shift) over [lower, upper], element-wise.

    exp(t - shift) <= slope * t + intercept for every t in [lower, upper] (exp is convex).  A
    zero-width interval gets the tangent, which is exact there.  shift broadcasts against lower.
    """
    width = upper - lower
    narrow = width <= 1
    ones = torch.ones_like(width)
    base = torch.exp(lower - shift)
    # Narrow: base * expm1(w)/w, which does not cancel as w -> 0.  Wide: the plain difference
    # quotient, which cannot overflow (upper <= shift) where expm1(w) would.  Each branch sees
    # safe arguments only, so the unused one puts no NaN into the gradient.
    w_narrow = torch.where(narrow & (width > 0), width, ones)
    growth = torch.where(width > 0, torch.expm1(w_narrow) / w_narrow, ones)
    w_wide = torch.where(narrow, ones, width)
    slope = torch.where(narrow, base * growth, (torch.exp(upper - shift) - base) / w_wide)
    return slope, base - slope * lower


def _fused_row(margin_lower, margin_upper, C):
    """The fused specification row and the pieces of the bound that do not need the sweep.

    margin_*: (B, K-1) IBP bounds of the margins C @ z = z_y - z_j; C: (B, K-1, K).
    Returns (row (B, 1, K), constant (B,), shift M (B,)) with
    s(x) e^-M <= row @ z(x) + constant on the ball.
    """
    t_lower, t_upper = -margin_upper, -margin_lower           # bounds of t_j = z_j - z_y
    shift = t_upper.max(1).values.clamp(min=0).detach()       # cancels exactly; detach saves graph
    slope, intercept = exp_chord(t_lower, t_upper, shift.unsqueeze(1))
    # sum_j slope_j (e_j - e_y) = -sum_j slope_j C_j
    row = -(slope.unsqueeze(-1) * C).sum(1, keepdim=True)
    constant = torch.exp(-shift) + intercept.sum(1)           # the true class's exp(0), scaled
    return row, constant, shift


def fused_ce_bound(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, num_classes: int, *,
                   max_memory: int = bounds.DEFAULT_MAX_MEMORY):
    """Upper bound, per input, of CE(model(x'), y) over the L-inf ball of radius eps (in [0, 1]).

    Returns (bound (B,), training bounds): the CROWN-IBP bound of the fused loss, and the
    ``bounds.TrainingBounds`` of the pass, whose IBP bounds of the margins z_y - z_j (j != y,
    ascending) come for free and serve the IBP term of a beta mix, the training accuracy and
    the warm-up regulariser (its relu_bounds).  Differentiable in the model's parameters.
    """
    C = bounds.margin_spec(y, num_classes, dtype=torch.float64 if x.dtype == torch.float64
                           else torch.float32)
    pieces = {}

    def spec(margin_lower, margin_upper):
        row, pieces["constant"], pieces["shift"] = _fused_row(margin_lower, margin_upper,
                                                              C.to(margin_lower.dtype))
        return row

    b = bounds.training_bounds(model, x, eps, C, spec, crown_lower=False, crown_upper=True,
                               max_memory=max_memory)
    scaled = b.crown_upper.squeeze(1) + pieces["constant"]
    # The scaled sum is truly >= exp(-M) > 0; raising a rounded bound to that only loosens it.
    scaled = torch.maximum(scaled, torch.exp(-pieces["shift"]))
    return pieces["shift"] + torch.log(scaled), b


def robust_ce(margin_lower: torch.Tensor, y: torch.Tensor):
    """CE of the worst-case logits built from margin lower bounds, per input, and those logits.

    z has 0 at the true class and -margin_lower_j at every other class j, so
    CE(z, y) = log(1 + sum_j exp(-margin_lower_j)) >= CE(model(x'), y) for every x' of the ball.
    argmax z == y exactly when every margin lower bound is positive (the point is certified).
    Returns (loss (B,), z (B, K)).
    """
    batch, others = margin_lower.shape
    z = margin_lower.new_zeros(batch, others + 1)
    not_true = torch.ones_like(z, dtype=torch.bool).scatter_(1, y.view(-1, 1), False)
    z = z.masked_scatter(not_true, -margin_lower)
    return F.cross_entropy(z, y, reduction="none"), z
