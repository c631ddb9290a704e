"""CROWN: the backward sweep of linear bounds through the ops of ``layers`` (the steps are in
``crown_steps``), chunked under a memory cap, and CROWN's own pre-activation bounds."""
from __future__ import annotations

import math

import torch

from . import crown_steps as steps
from .layers import ReLU

# Live (rows x neurons) tensors at the peak of a backward step (both sides, positive and negative
# parts, their scaled copies); used to turn the memory cap into a number of rows.
LIVE_COPIES = 8


def _add(acc, term):
    return acc if term is None else acc + term


def sweep(seq, A_lower, A_upper, batch):
    """Walk the bound matrices back from the output of seq to its input.

    ``batch`` selects the inputs the rows belong to (for the ReLUs' pre-activation bounds).
    Returns (A_lower, bias_lower, A_upper, bias_upper) at the input; a side given as None stays None.
    """
    bias_lower = bias_upper = 0
    for op in reversed(seq):
        if isinstance(op, ReLU):
            A_lower, dl, A_upper, du = steps.backward_relu(A_lower, A_upper, op.lower[batch],
                                                           op.upper[batch])
        else:
            A_lower, dl = op.backward(A_lower) if A_lower is not None else (None, None)
            A_upper, du = op.backward(A_upper) if A_upper is not None else (None, None)
        bias_lower, bias_upper = _add(bias_lower, dl), _add(bias_upper, du)
    return A_lower, bias_lower, A_upper, bias_upper


def chunk_sizes(batch, specs, row_numel, elem_size, max_memory):
    """(inputs per chunk, specification rows per chunk) for a working set under max_memory."""
    rows = max(1, max_memory // (LIVE_COPIES * row_numel * elem_size))
    if batch * specs <= rows:
        return batch, specs
    if specs <= rows:
        return rows // specs, specs
    return 1, rows


def _one_hot_rows(neurons, shape, like):
    """Identity rows (1, len(neurons), *shape) picking the given flat neuron indices."""
    A = like.new_zeros(1, neurons.numel(), math.prod(shape))
    A[0, torch.arange(neurons.numel(), device=A.device), neurons] = 1
    return A.view(1, neurons.numel(), *shape)


def bounds(seq, spec, box, lower, upper, max_memory, float64_input=False):
    """CROWN bounds of spec @ (output of seq) over the input box (c0, r0).

    spec is either a tensor (B, S, *out_shape) of specification rows or a 1-d tensor of flat output
    neuron indices (identity rows, shared by the batch).  Returns (lower, upper), each (B, S) or
    None for a side not asked for.  float64_input: concretise over the input box in float64
    (see crown_steps.concretize).
    """
    c0, r0 = box
    num_inputs = c0.shape[0]
    neuron_rows = spec.dim() == 1
    num_specs = spec.shape[0] if neuron_rows else spec.shape[1]
    widest = max(math.prod(s) for op in seq for s in (op.in_shape, op.out_shape))
    per_batch, per_spec = chunk_sizes(num_inputs, num_specs, widest, c0.element_size(),
                                      max_memory)
    lows, ups = [], []
    for b0 in range(0, num_inputs, per_batch):
        batch = slice(b0, b0 + per_batch)
        lo_parts, up_parts = [], []
        for s0 in range(0, num_specs, per_spec):
            if neuron_rows:
                A = _one_hot_rows(spec[s0:s0 + per_spec], seq[-1].out_shape, c0)
            else:
                A = spec[batch, s0:s0 + per_spec]
            Al, bl, Au, bu = sweep(seq, A if lower else None, A if upper else None, batch)
            if lower:
                lo_parts.append(steps.concretize(Al, bl, c0[batch], r0[batch], False, float64_input))
            if upper:
                up_parts.append(steps.concretize(Au, bu, c0[batch], r0[batch], True, float64_input))
        lows.append(torch.cat(lo_parts, 1) if lower else None)
        ups.append(torch.cat(up_parts, 1) if upper else None)
    return (torch.cat(lows) if lower else None), (torch.cat(ups) if upper else None)


def _relu_bounds(prefix, relu, box, intersect_ibp, max_memory):
    """Replace the IBP pre-activation bounds of ``relu`` (fed by ``prefix``) with CROWN's,
    widened by the ReLU's rounding slack when it has one."""
    ibp_lower, ibp_upper = relu.lower.flatten(1), relu.upper.flatten(1)
    if intersect_ibp:
        # Neurons IBP proves stable keep IBP's bounds: their relaxation is exact either way.
        neurons = ((ibp_lower < 0) & (ibp_upper > 0)).any(0).nonzero().squeeze(1)
        if neurons.numel() == 0:
            return
    else:
        neurons = torch.arange(ibp_lower.shape[1], device=ibp_lower.device)
    sound = relu.slack is not None
    lower, upper = bounds(prefix, neurons, box, True, True, max_memory, float64_input=sound)
    if sound:
        slack = relu.slack.flatten(1)[:, neurons]
        lower, upper = lower - slack, upper + slack
    if intersect_ibp:
        lower = ibp_lower.index_copy(1, neurons, torch.maximum(lower, ibp_lower[:, neurons]))
        upper = ibp_upper.index_copy(1, neurons, torch.minimum(upper, ibp_upper[:, neurons]))
    relu.set_bounds(lower.view_as(relu.lower), upper.view_as(relu.upper))


def intermediate(seq, box, intersect_ibp, max_memory):
    """CROWN pre-activation bounds for every ReLU, first to last (each pass uses the earlier ones).

    Before the first ReLU, IBP is already exact when at most one mixing layer (linear, conv, pool)
    lies between the input and the ReLU: IBP of one affine map of a box is the exact range of each
    output, and element-wise affine maps send boxes to boxes.  Those bounds are kept as they are.
    """
    seen_relu, mixing = False, 0
    for i, op in enumerate(seq):
        if isinstance(op, ReLU):
            if seen_relu or mixing > 1:
                _relu_bounds(seq[:i], op, box, intersect_ibp, max_memory)
            seen_relu = True
        mixing += op.mixes
