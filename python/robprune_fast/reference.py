"""Pure-PyTorch twins of every robprune_fast operator.

This module is the oracle the tests compare the C++/CUDA kernels against, and the fallback
`ops` uses where the extension has no kernel for a device. It imports torch only and never
calls the code it checks: every formula here is written with plain torch ops, so autograd
gives the reference gradients.

Box convention (shared with `ops`): an input box is given as (centre, radius) with
radius >= 0. With ``relu_in`` the box is first pushed through ReLU, which maps the interval
[c - r, c + r] to [relu(c - r), relu(c + r)]. The affine map x -> W x + b (W = weight * mask)
sends the box (c, r) to (W c + b, |W| r). With ``out_bounds`` the result is returned as
(lower, upper) instead of (centre, radius).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def effective_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The weight the layer really applies: weight * mask, or weight when unmasked."""
    return weight if mask is None else weight * mask


def masked_weight_pair(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(weight * mask, |weight * mask|) stacked into one (2, *weight.shape) tensor."""
    w = effective_weight(weight, mask)
    return torch.stack([w, w.abs()])


def input_box(x, eps, scale=None, shift=None):
    """(centre, radius) of the L-inf ball of radius eps around x (N, C, *) clipped to [0, 1],
    mapped through the per-channel affine h = x * scale + shift (a model's input
    normalisation; identity when scale / shift are None). eps: a number or broadcast to x."""
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    view = (1, -1) + (1,) * (x.dim() - 2)
    if scale is not None:
        center, radius = center * scale.view(view), radius * scale.abs().view(view)
    if shift is not None:
        center = center + shift.view(view)
    return center, radius


def relu_box(center: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image of the box (center, radius) under ReLU, again as (center, radius)."""
    lower = torch.relu(center - radius)
    upper = torch.relu(center + radius)
    # Halves first: upper + lower may overflow to inf near the top of the float range, and an
    # infinite centre with a finite radius is a box above every value it should hold.
    return upper / 2 + lower / 2, (upper - lower) / 2


def relu_box_(center: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relu_box written over center and radius; returns them."""
    c, r = relu_box(center, radius)
    return center.copy_(c), radius.copy_(r)


def _finish(center: torch.Tensor, radius: torch.Tensor, out_bounds: bool):
    if out_bounds:
        return center - radius, center + radius
    return center, radius


def interval_linear(center, radius, weight, bias=None, mask=None, relu_in=False, out_bounds=False):
    """Box of ``F.linear(x, weight * mask, bias)`` over all x in the box (center, radius)."""
    if relu_in:
        center, radius = relu_box(center, radius)
    w = effective_weight(weight, mask)
    return _finish(F.linear(center, w, bias), F.linear(radius, w.abs()), out_bounds)


def interval_conv2d(center, radius, weight, bias=None, mask=None, stride=1, padding=0,
                    dilation=1, groups=1, relu_in=False, out_bounds=False):
    """Box of ``F.conv2d(x, weight * mask, bias, ...)`` over all x in the box (center, radius)."""
    if relu_in:
        center, radius = relu_box(center, radius)
    w = effective_weight(weight, mask)
    out_c = F.conv2d(center, w, bias, stride, padding, dilation, groups)
    out_r = F.conv2d(radius, w.abs(), None, stride, padding, dilation, groups)
    return _finish(out_c, out_r, out_bounds)


def relu_relaxation(lower: torch.Tensor, upper: torch.Tensor):
    """CROWN's linear relaxation of ReLU on [lower, upper], element-wise.

    Returns (upper_slope, upper_intercept, lower_slope) such that for every z in [lower, upper]

        lower_slope * z  <=  relu(z)  <=  upper_slope * z + upper_intercept.

    Active neurons (lower >= 0): both slopes 1.  Inactive (upper <= 0): both 0.  Unstable: the upper
    line is the chord u (z - l) / (u - l); the lower slope is CROWN's adaptive choice, 1 when
    u >= -l and 0 otherwise (the one of the two lines with the smaller area between it and ReLU).

    Overflow never tightens the relaxation: where lower, upper or upper - lower is not finite
    (the width overflowed, or a bound is infinite), the chord's slope would round to 0 and drop
    the neuron, so all three are NaN there, and so is every bound through them (which never
    certifies).
    """
    finite = torch.isfinite(upper - lower)  # exactly where lower, upper and the width all are
    # Placeholder bounds where the width is not finite, so no inf or NaN reaches autograd.
    lower, upper = torch.where(finite, lower, -1.0), torch.where(finite, upper, 1.0)
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    # Guard the division outside the unstable set, so no inf/NaN reaches autograd.
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = upper / width
    upper_slope = torch.where(unstable, chord, active.to(upper.dtype))
    upper_intercept = torch.where(unstable, -chord * lower, torch.zeros_like(upper))
    lower_slope = torch.where(unstable, (upper >= -lower).to(upper.dtype), active.to(upper.dtype))
    nan = torch.full_like(upper, float("nan"))
    return tuple(torch.where(finite, t, nan) for t in (upper_slope, upper_intercept, lower_slope))


def crown_relu_backward(A, lower, upper, upper_side=False):
    """CROWN's backward step through y = relu(z), lower <= z <= upper, for one side of the walk.

    A: (B or 1, S, *neurons), coefficients of S linear bounds in terms of y; lower, upper:
    (B, *neurons). A positive coefficient takes ReLU's line on the walk's own side (the lower
    line when bounding from below), a negative one the other side's line, whose intercept joins
    the bias. Returns (A in terms of z: (B, S, *neurons), bias: (B, S)).
    """
    upper_slope, upper_intercept, lower_slope = (t.unsqueeze(1) for t in relu_relaxation(lower, upper))
    # The positive and negative parts, with the subgradient 0 at a == 0 on both sides, as the
    # kernel has it; clamp's own choice there differs between torch releases (2.11 passes the
    # gradient at the boundary, 2.14 does not).
    zero = A.new_zeros(())
    pos, neg = torch.where(A > 0, A, zero), torch.where(A < 0, A, zero)
    if upper_side:
        out, chord_part = pos * upper_slope + neg * lower_slope, pos
    else:
        out, chord_part = pos * lower_slope + neg * upper_slope, neg
    out = out.expand(lower.shape[0], *out.shape[1:])
    bias = (chord_part * upper_intercept).flatten(2).sum(-1)
    return out, bias


def crown_linear_backward(A, weight, bias=None, mask=None):
    """CROWN's backward step through ``h' = F.linear(h, weight * mask, bias)``.

    A: (*, out_features), coefficients of linear bounds in terms of h'. Returns (A @ (weight *
    mask) of shape (*, in_features), the bias term A @ bias of shape (*), zeros without a bias).
    """
    w = effective_weight(weight, mask)
    term = A.new_zeros(A.shape[:-1]) if bias is None else A @ bias
    return A @ w, term


def crown_conv2d_backward(A, weight, bias, mask, input_size, stride=1, padding=0, dilation=1,
                          groups=1):
    """CROWN's backward step through ``h' = F.conv2d(h, weight * mask, bias, stride, padding,
    dilation, groups)`` for an input h of spatial size ``input_size`` (H_in, W_in).

    A: (*, C_out, H_out, W_out). The transpose of a convolution is the transposed convolution with
    the same weight; when (H_in + 2 padding - kernel extent) is not a multiple of the stride, the
    forward pass drops the last rows/columns of the padded input, and output_padding (always <
    stride) restores the input size. Returns (A in terms of h: (*, C_in, H_in, W_in), the bias
    term sum_{c,y,x} A[..., c, y, x] * bias[c] of shape (*), zeros without a bias).
    """
    w = effective_weight(weight, mask)
    pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    out_size = A.shape[-2:]
    extra = tuple(size - ((n - 1) * st - 2 * p + d * (k - 1) + 1) for size, n, st, p, d, k
                  in zip(input_size, out_size, stride, padding, dilation, weight.shape[-2:]))
    lead = A.shape[:-3]
    out = F.conv_transpose2d(A.reshape(-1, *A.shape[-3:]), w, None, stride, padding, extra,
                             groups, dilation)
    term = A.new_zeros(lead) if bias is None else A.sum((-2, -1)) @ bias
    return out.reshape(*lead, *out.shape[1:]), term


def masked_linear(x, weight, bias=None, mask=None):
    """``F.linear(x, weight * mask, bias)``: a pruned linear layer."""
    return F.linear(x, effective_weight(weight, mask), bias)


def masked_conv2d(x, weight, bias=None, mask=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(x, weight * mask, bias, ...)``: a pruned conv2d layer."""
    return F.conv2d(x, effective_weight(weight, mask), bias, stride, padding, dilation, groups)


# --- the compressed path ---------------------------------------------------------------------------
#
# A pruned layer's weight as its kept values and their indices (``ops.sparse.pack_mask``): the 2-D
# view W2 = weight.view(out, -1) in CSR (row_ptr [out + 1], col [nnz], values [nnz] in row-major
# order) and CSC (col_ptr [cols + 1], row [nnz], csc_to_csr [nnz]: CSC entry e is values[csc_to_csr[e]]).
# The twins rebuild W2 densely (differentiable in values) and run the dense layer.


def csr_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """The row of every CSR entry (int64), from row_ptr."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts)


def csr_dense(values, row_ptr, col, cols: int) -> torch.Tensor:
    """W2 (rows, cols) from its CSR (rows: row_ptr's length less one)."""
    w = values.new_zeros(row_ptr.numel() - 1, cols)
    return w.index_put((csr_rows(row_ptr), col.long()), values)


def csc_dense(values, col_ptr, row, csc_to_csr, rows: int) -> torch.Tensor:
    """W2 (rows, cols) from its CSC (cols: col_ptr's length less one)."""
    w = values.new_zeros(rows, col_ptr.numel() - 1)
    return w.index_put((row.long(), csr_rows(col_ptr)), values[csc_to_csr.long()])


def sparse_gather(weight, row_ptr, col):
    """The kept values of weight, W2[row of e, col[e]] for W2 = weight.reshape(out, -1), in the
    CSR's order (differentiable in weight)."""
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))[csr_rows(row_ptr), col.long()]


def sparse_scatter_(out, values, row_ptr, col):
    """Writes all of out (contiguous): values at the CSR's entries of out.view(out, -1), zeros
    elsewhere."""
    w2 = out.view(out.shape[0], math.prod(out.shape[1:]))
    w2.zero_()
    w2.index_put_((csr_rows(row_ptr), col.long()), values)


def _conv_weight(w2, channels_per_group: int, kernel_size) -> torch.Tensor:
    return w2.view(w2.shape[0], channels_per_group, *kernel_size)


def sparse_linear(x, values, bias, row_ptr, col, out_features: int):
    """``F.linear(x, W2, bias)`` for x (N, in_features), W2 (out_features, in_features)."""
    return F.linear(x, csr_dense(values, row_ptr, col, x.shape[1]), bias)


def sparse_linear_t(g, values, col_ptr, row, csc_to_csr, in_features: int):
    """``g @ W2`` for g (N, out_features), W2 (out_features, in_features): a linear layer's input
    gradient, CROWN's step."""
    return g @ csc_dense(values, col_ptr, row, csc_to_csr, g.shape[1])


def sparse_linear_values_grad(g, x, col_ptr, row, csc_to_csr):
    """Per kept weight k: sum over the batch of g[n, row_k] * x[n, col_k], given the CSC; the
    result in the values' (CSR) order."""
    per_entry = (g[:, row.long()] * x[:, csr_rows(col_ptr)]).sum(0)
    return torch.empty_like(per_entry).index_put_((csc_to_csr.long(),), per_entry)


def sparse_conv2d(x, values, bias, row_ptr, col, kernel_size, stride, padding, dilation, groups):
    """``F.conv2d(x, W, bias, ...)`` with W2 = W.view(out, -1) given by its CSR."""
    cg = x.shape[1] // groups
    w = csr_dense(values, row_ptr, col, cg * kernel_size[0] * kernel_size[1])
    return F.conv2d(x, _conv_weight(w, cg, kernel_size), bias, stride, padding, dilation, groups)


def sparse_conv2d_t(g, values, col_ptr, row, csc_to_csr, input_size, kernel_size, stride, padding,
                    dilation, groups):
    """The transposed convolution of g (N, C_out, H_out, W_out) back to an input of spatial size
    input_size: sparse_conv2d's input gradient, CROWN's step through it."""
    w2 = csc_dense(values, col_ptr, row, csc_to_csr, g.shape[1])
    cg = w2.shape[1] // (kernel_size[0] * kernel_size[1])
    w = _conv_weight(w2, cg, kernel_size)
    shape = (g.shape[0], cg * groups, *input_size)
    return torch.nn.grad.conv2d_input(shape, w, g, stride, padding, dilation, groups)


def sparse_conv2d_values_grad(g, x, row_ptr, col, kernel_size, stride, padding, dilation, groups):
    """Per kept weight: the gradient of sparse_conv2d's output (g) with respect to it."""
    cg = x.shape[1] // groups
    shape = (g.shape[1], cg, *kernel_size)
    w2 = torch.nn.grad.conv2d_weight(x, shape, g, stride, padding, dilation, groups).reshape(shape[0], -1)
    return w2[csr_rows(row_ptr), col.long()]


def sparse_interval_linear(center, radius, values, bias, row_ptr, col, out_features: int,
                           relu_in=False, out_bounds=False):
    """interval_linear with W2 (out_features, in_features) given by its CSR."""
    w = csr_dense(values, row_ptr, col, center.shape[1])
    return interval_linear(center, radius, w, bias, None, relu_in, out_bounds)


def sparse_interval_conv2d(center, radius, values, bias, row_ptr, col, kernel_size, stride, padding,
                           dilation, groups, relu_in=False, out_bounds=False):
    """interval_conv2d with W2 given by its CSR."""
    cg = center.shape[1] // groups
    w = csr_dense(values, row_ptr, col, cg * kernel_size[0] * kernel_size[1])
    return interval_conv2d(center, radius, _conv_weight(w, cg, kernel_size), bias, None, stride,
                           padding, dilation, groups, relu_in, out_bounds)
