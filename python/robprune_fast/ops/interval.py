"""The interval (IBP) layer ops: the output box of a linear or conv2d layer over an input box,
with the layer's mask applied on the fly, an optional ReLU on the input box (``relu_in``) and
an optional conversion to (lower, upper) (``out_bounds``). Wrappers, unchecked entries, fake
kernels and autograd side by side; the two ops share one registration, templated on the
layer's output shape."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ._dispatch import OPS, _C, call, use_kernel
from .checks import check_box, check_layer, check_radius_values, conv_input
from .weight_pair import cached_weight_pair


def interval_linear(center, radius, weight, bias=None, mask=None, relu_in=False, out_bounds=False):
    """Output box of ``x -> F.linear(x, weight * mask, bias)`` for x in the box (center, radius).

    center, radius: (*, in_features); weight: (out_features, in_features); mask: like weight.
    relu_in: push the input box through ReLU first. out_bounds: return (lower, upper) instead of
    (centre, radius). Returns two tensors of shape (*, out_features).
    """
    check_box(center, radius)
    check_layer(weight, bias, mask, 2, center, "center")
    if center.dim() < 1 or center.shape[-1] != weight.shape[1]:
        raise ValueError(f"center's last dimension must equal weight.size(1) (in_features = "
                         f"{weight.shape[1]}), got shape {tuple(center.shape)}")
    return interval_linear_unchecked(center, radius, weight, bias, mask, relu_in, out_bounds)


def interval_linear_unchecked(center, radius, weight, bias=None, mask=None, relu_in=False,
                              out_bounds=False, check_radius=True):
    """interval_linear without the Python checks (see ``ops.unchecked``). check_radius=False:
    the caller made the radius itself and vouches that it is >= 0 (the kernel skips that pass)."""
    if use_kernel("interval_linear", center.device):
        return call(OPS.interval_linear, center, radius, weight, bias, mask,
                    cached_weight_pair(weight, mask), bool(relu_in), bool(out_bounds),
                    bool(check_radius))
    if check_radius:
        check_radius_values(radius)
    return reference.interval_linear(center, radius, weight, bias, mask, relu_in, out_bounds)


def interval_conv2d(center, radius, weight, bias=None, mask=None, stride=1, padding=0, dilation=1,
                    groups=1, relu_in=False, out_bounds=False):
    """Output box of ``x -> F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)``
    for x in the box (center, radius). center, radius: (N, C, H, W), any memory format.
    relu_in and out_bounds as in interval_linear.
    """
    check_box(center, radius)
    check_layer(weight, bias, mask, 4, center, "center")
    stride, padding, dilation, groups = conv_input(center, "center", weight, stride, padding, dilation,
                                                   groups)
    return interval_conv2d_unchecked(center, radius, weight, bias, mask, stride, padding,
                                     dilation, groups, relu_in, out_bounds)


def interval_conv2d_unchecked(center, radius, weight, bias, mask, stride, padding, dilation,
                              groups, relu_in=False, out_bounds=False, check_radius=True):
    """interval_conv2d without the Python checks (see ``ops.unchecked``). stride, padding and
    dilation: pairs of ints. check_radius as in interval_linear_unchecked."""
    if use_kernel("interval_conv2d", center.device):
        return call(OPS.interval_conv2d, center, radius, weight, bias, mask,
                    cached_weight_pair(weight, mask), stride, padding, dilation, groups,
                    bool(relu_in), bool(out_bounds), bool(check_radius))
    if check_radius:
        check_radius_values(radius)
    return reference.interval_conv2d(center, radius, weight, bias, mask, stride, padding, dilation,
                                     groups, relu_in, out_bounds)


# --- fake kernels and autograd --------------------------------------------------------------------
#
# Both ops take (center, radius, weight, bias, mask, weight_pair, *geometry, relu_in,
# out_bounds[, check_radius]); their backward ops take (grad_a, grad_b, center, radius, weight,
# mask, weight_pair, *geometry, relu_in, out_bounds, output_mask). A call may leave out
# check_radius (its default), so the flags are named by their place after the geometry.


def _register(name: str, layer_output, n_geometry: int) -> None:
    """Fake kernel and autograd formula of interval_<name>; layer_output(center, weight,
    geometry) gives an empty tensor shaped and laid out like the layer's output."""
    op = f"robprune_fast::interval_{name}"
    backward_op = getattr(OPS, f"interval_{name}_backward")

    def split(rest):
        """(geometry, relu_in, out_bounds) from the arguments after weight_pair."""
        geometry, (relu_in, out_bounds) = rest[:n_geometry], rest[n_geometry:n_geometry + 2]
        return tuple(geometry), relu_in, out_bounds

    @torch.library.register_fake(op)
    def _fake(center, radius, weight, bias, mask, weight_pair, *rest):
        out = layer_output(center, weight, split(rest)[0])
        return out, torch.empty_like(out)

    @torch.library.register_fake(f"{op}_backward")
    def _fake_backward(grad_a, grad_b, center, radius, weight, mask, weight_pair, *rest):
        output_mask = rest[n_geometry + 2]
        like = (center, center, weight, weight.new_empty(weight.shape[0]), weight)
        return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, output_mask))

    def setup_context(ctx, inputs, output):
        center, radius, weight, bias, mask, weight_pair, *rest = inputs
        ctx.save_for_backward(center, radius, weight, mask, weight_pair)
        ctx.geometry, ctx.relu_in, ctx.out_bounds = split(rest)
        ctx.n_flags = len(rest)  # the geometry and the flags get no gradient

    def backward(ctx, grad_a, grad_b):
        center, radius, weight, mask, weight_pair = ctx.saved_tensors
        n = ctx.needs_input_grad
        need = [n[0], n[1], n[2], n[3], mask is not None and n[4]]
        grads = backward_op(grad_a, grad_b, center, radius, weight, mask, weight_pair,
                            *ctx.geometry, ctx.relu_in, ctx.out_bounds, need)
        # None for weight_pair, then for the geometry and the flags.
        return (*[g if wanted else None for g, wanted in zip(grads, need)], None) + (None,) * ctx.n_flags

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _linear_output(center, weight, geometry):
    return center.new_empty((*center.shape[:-1], weight.shape[0]))


def _conv2d_output(center, weight, geometry):
    stride, padding, dilation, groups = geometry
    # conv2d on fake tensors gives the output's shape and memory format (channels_last in,
    # channels_last out), exactly as the real kernel's ATen convolution does.
    return F.conv2d(center, weight, None, stride, padding, dilation, groups)


if _C is not None:
    _register("linear", _linear_output, n_geometry=0)
    _register("conv2d", _conv2d_output, n_geometry=4)
