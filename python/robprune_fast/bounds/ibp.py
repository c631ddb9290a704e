"""Interval bound propagation through the ops of ``layers``, and the specification folded into
a final linear layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops, reference
from .affine import Linear
from .layers import ReLU, Residual

# spec_bounds shares folded weights between inputs when there are at most 1/this as many
# distinct specifications as inputs (the shared GEMM computes every distinct C's radii for
# every input).
DISTINCT_SPEC_FRACTION = 4


def walk(seq, c, r, keep_pending=False, in_place=False, budget=None, widen=None):
    """Push the box (c, r) through seq.  A ReLU is held back ("pending") until the next op, so that
    a linear/conv layer can apply it in its relu_in prologue.  Returns (c, r) or, with
    ``keep_pending``, (c, r, pending) leaving a final pending ReLU to the caller.

    ``in_place``: nobody reads a ReLU's pre-activation box (no ReLU bounds wanted, no autograd)
    and the walk owns every box it makes, so a ReLU maps the box where it lies
    (ops.unchecked.relu_box_) and records nothing: no prologue copies, and on the CPU none of
    their page faults.

    ``budget``: a rounding.Budget carried along (every op moves it; every ReLU takes its slack).
    ``widen``: a rounding.Widening that widens every op's box by its rounding instead.
    """
    pending = False
    for op in seq:
        op.in_shape = tuple(c.shape[1:])
        if isinstance(op, ReLU):
            if pending:  # ReLU after ReLU: the true (non-negative) input box
                c, r = reference.relu_box(c, r)
            if budget is not None:
                budget.through_relu(op, c, r)
            if in_place:
                c, r = (ops.unchecked.relu_box_(c, r, check_radius=False)
                        if c.stride() == r.stride() else reference.relu_box(c, r))
            else:
                op.record(c, r)
                pending = True
            op.out_shape = tuple(c.shape[1:])
            continue
        if budget is not None:
            h = budget.magnitude(c, r)
        if pending and op.fuses_relu:
            if widen is not None:
                r = widen.before(op, c, r, relu_pending=True)
            c, r = op.ibp(c, r, relu_in=True)
            pending = False
        else:
            if pending and not op.commutes_with_relu:
                c, r = reference.relu_box(c, r)
                pending = False
            if widen is not None:
                r = widen.before(op, c, r, relu_pending=False)
            c, r = _residual(op, c, r, widen) if isinstance(op, Residual) else op.ibp(c, r)
        op.out_shape = tuple(c.shape[1:])
        if widen is not None:
            r = widen.after(op, r)
        if budget is not None and not isinstance(op, Residual):
            budget.T = op.rounding(budget.T, h, budget)
            # A reshape passes what a ReLU let through on to the next op.
            budget.relu_magnitude = (op.rounding(budget.relu_magnitude, None, budget)
                                     if op.commutes_with_relu and budget.relu_magnitude is not None
                                     else None)
    if keep_pending:
        return c, r, pending
    return reference.relu_box(c, r) if pending else (c, r)


def _residual(block: Residual, c, r, widen):
    """The two branches' boxes added (the interval of a sum lies in the sum of the intervals),
    widened by the addition's rounding when sound. Residual blocks are IBP only (the CROWN
    methods refuse them in api.ibp_stage), so no CROWN budget reaches here."""
    oc, orad = walk(block.pre, c, r, widen=widen)
    mc, mr = walk(block.main, oc, orad, widen=widen)
    sc, sr = (c, r) if block.shortcut is None else walk(block.shortcut, oc, orad, widen=widen)
    out_c, out_r = mc + sc, mr + sr
    if widen is not None:
        out_r = widen.around_sum(out_c, out_r)
    return out_c, out_r


def output_bounds(seq, c, r, C, in_place=False, budget=None, widen=None):
    """IBP ((lower, upper), C) of the output, or of C @ output with C folded into a final Linear;
    C comes back checked and expanded to (B, S, K). in_place, budget and widen: as in walk;
    with either the bounds hold in floating point."""
    if C is not None and seq and isinstance(seq[-1], Linear):
        c, r, pending = walk(seq[:-1], c, r, keep_pending=True, in_place=in_place, budget=budget,
                             widen=widen)
        last = seq[-1]
        last.in_shape = tuple(c.shape[1:])
        C = expand_spec(C, c.shape[0], last.shape[0])
        last.out_shape = (last.shape[0],)
        if budget is not None:
            budget.T = last.rounding(budget.T, budget.magnitude(c, r), budget)
        centre, radius = spec_bounds(last, c, r, C, relu_in=pending)
        if widen is not None:
            radius = _widen_spec(widen, last, c, r, C, pending, radius)
        lower, upper = centre - radius, centre + radius
    else:
        c, r = walk(seq, c, r, in_place=in_place, budget=budget, widen=widen)
        if widen is not None:  # a last ReLU box's own rounding
            r = widen.around_sum(c, r)
        if C is not None:
            if c.dim() != 2:
                raise ValueError(f"C needs a model with flat outputs (B, K), got outputs of shape "
                                 f"{tuple(c.shape)}")
            C = expand_spec(C, c.shape[0], c.shape[1])
            u = c.abs() + r
            c, r = (C @ c.unsqueeze(-1)).squeeze(-1), (C.abs() @ r.unsqueeze(-1)).squeeze(-1)
            if widen is not None:  # C's products: K terms each
                r = r + 2 * widen.gamma(C.shape[2] + 2) * (C.abs() @ u.unsqueeze(-1)).squeeze(-1)
        lower, upper = c - r, c + r
    if budget is not None:
        slack = budget.slack(C)
        lower, upper = lower - slack, upper + slack
    if widen is not None:
        lower, upper = widen.outward(lower, upper)
    return (lower, upper), C


def _widen_spec(widen, last: Linear, c, r, C, pending, radius):
    """The folded last layer's radius widened by its rounding. Its radius |C W| r may cancel
    where C's rows meet (a margin's two logits), but the logits' rounding errors do not: the
    error is bounded through |C| |W| (one small extra product, K outputs per input)."""
    u = torch.relu(c + r) if pending else c.abs() + r
    g = widen.gamma(last.terms + C.shape[2] + 2)
    per_logit = F.linear(u, last.abs_weight())
    if last.bias is not None:
        per_logit = per_logit + last.bias.detach().abs()
    return radius * (1 + g) + 3 * g * (C.abs() @ per_logit.unsqueeze(-1)).squeeze(-1)


def spec_bounds(last: Linear, c, r, C, relu_in):
    """(centre, radius) of C @ (W h + b) with C folded into W; C: (B, S, K).

    The centre is linear, so it is C @ (W c + b) (one GEMM, then a tiny batched product).
    The radius needs the folded weight: |C_b W| r_b, tighter than |C_b| |W| r_b. Inputs
    with the same C share their folded weight, and margin specifications have at most K
    distinct C (one per true class): with few distinct C, the radii of all of them come
    from one GEMM against every input's r and each input picks its own; otherwise each
    input's folded weight is made (a skinny (B S, K) x (K, in) product) and applied in a
    batched product.
    """
    if relu_in:
        c, r = reference.relu_box(c, r)
    weight = last.effective_weight()
    centre = (C @ F.linear(c, weight, last.bias).unsqueeze(-1)).squeeze(-1)
    batch, specs = C.shape[:2]
    # Grouping costs a few small ops: not worth it where no batch this small could share.
    distinct, which = distinct_specs(C) if batch >= DISTINCT_SPEC_FRACTION else (None, None)
    if distinct is not None and distinct.shape[0] * DISTINCT_SPEC_FRACTION <= batch:
        folded = (distinct @ weight).abs().reshape(-1, weight.shape[1])  # (U S, in)
        every = (r @ folded.t()).view(batch, -1, specs)                   # (B, U, S)
        radius = every.gather(1, which.view(batch, 1, 1).expand(batch, 1, specs)).squeeze(1)
    else:
        radius = ((C @ weight).abs() @ r.unsqueeze(-1)).squeeze(-1)
    return centre, radius


def distinct_specs(C):
    """(the distinct specifications (U, S, K), each input's index into them (B,)), or
    (None, None) when grouping fails. Inputs are grouped by a projection of their C (a 1-D
    unique, far cheaper than torch.unique over dim 0), and the grouping is then checked
    exactly, so a collision of projections can never pair an input with another's C."""
    batch = C.shape[0]
    flat = C.reshape(batch, -1)
    weights = torch.linspace(1.0, 2.0, flat.shape[1], dtype=C.dtype, device=C.device)
    keys, which = torch.unique(flat @ weights, return_inverse=True)
    member = torch.empty(keys.shape[0], dtype=torch.long, device=C.device)
    member.scatter_(0, which, torch.arange(batch, device=C.device))
    distinct = C[member]
    if not torch.equal(distinct[which], C):
        return None, None
    return distinct, which


def expand_spec(C, batch, num_outputs):
    """C as (B, S, K), checked against the batch size B and the number of outputs K."""
    if C.dim() == 2:
        C = C.unsqueeze(0).expand(batch, -1, -1)
    if C.dim() != 3 or C.shape[0] != batch or C.shape[2] != num_outputs or C.shape[1] < 1:
        raise ValueError(f"C must have shape (B, S, K) or (S, K) with B={batch} inputs and "
                         f"K={num_outputs} outputs, got {tuple(C.shape)}")
    return C
