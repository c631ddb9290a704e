"""The Python side of the ops' argument checks. The C++ ops repeat them
(csrc/include/robprune/checks.h and layer_args.h) for direct ``torch.ops`` calls; here they fail
before any dispatch, with the same messages, and guard the reference path, which checks nothing
itself."""
from __future__ import annotations

import torch


def check_tensor(t, name: str, ref: torch.Tensor | None = None, ref_name: str = "center"):
    """t is a float32/float64 tensor, or (with ref) one of ref's dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ref is None:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        return
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_same_shape(t, name: str, ref, ref_name: str):
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")


def check_layer(weight, bias, mask, weight_dim: int, ref, ref_name: str):
    """A linear (weight_dim 2) or conv2d (4) layer's weight, bias and mask, like ref."""
    check_tensor(weight, "weight", ref, ref_name)
    if weight.dim() != weight_dim:
        raise ValueError(f"weight must be {weight_dim}-D, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ref, ref_name)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if mask is not None:
        check_tensor(mask, "mask", ref, ref_name)
        check_same_shape(mask, "mask", weight, "weight")


def check_box(center, radius):
    check_tensor(center, "center")
    check_tensor(radius, "radius", center)
    check_same_shape(radius, "radius", center, "center")


def check_radius_values(radius: torch.Tensor):
    # The kernels check this inside their first pass over the data; the reference path pays
    # for a separate reduction.
    if not bool((radius >= 0).all()):
        raise ValueError("radius must be >= 0 everywhere (no negative or NaN entries); build a "
                         "box from bounds with robprune_fast.ops.box_from_bounds(lower, upper)")


def int_pair(value, name: str, minimum: int = 0) -> list[int]:
    """An int or a pair of ints (bools and floats refused) as a list of two, each >= minimum."""
    values = [value, value] if isinstance(value, int) else list(value) \
        if isinstance(value, (tuple, list)) else None
    if values is None or len(values) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}" if minimum else "non-negative"
        raise ValueError(f"{name} must be two {kind} ints, got {value!r}")
    return values


def check_groups(groups):
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")


def conv_geometry(stride, padding, dilation, groups):
    """The checked geometry of a conv2d layer: (stride, padding, dilation) as pairs, groups."""
    check_groups(groups)
    return (int_pair(stride, "stride", 1), int_pair(padding, "padding", 0),
            int_pair(dilation, "dilation", 1), groups)


def conv_input(x, name: str, weight, stride, padding, dilation, groups):
    """A conv2d layer's input x (called ``name``) against its weight (already checked); returns
    the checked geometry as conv_geometry does."""
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    stride, padding, dilation, groups = conv_geometry(stride, padding, dilation, groups)
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"{name} has {x.shape[1]} channels but weight expects in_channels = "
                         f"weight.size(1) * groups = {weight.shape[1] * groups}")
    return stride, padding, dilation, groups
