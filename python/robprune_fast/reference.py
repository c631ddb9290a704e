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

import torch
import torch.nn.functional as F


def effective_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The weight the layer really applies: weight * mask, or weight when unmasked."""
    return weight if mask is None else weight * mask


def masked_weight_pair(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(weight * mask, |weight * mask|) stacked into one (2, *weight.shape) tensor."""
    w = effective_weight(weight, mask)
    return torch.stack([w, w.abs()])


def relu_box(center: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image of the box (center, radius) under ReLU, again as (center, radius)."""
    lower = torch.relu(center - radius)
    upper = torch.relu(center + radius)
    return (upper + lower) / 2, (upper - lower) / 2


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
