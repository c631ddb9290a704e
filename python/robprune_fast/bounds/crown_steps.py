"""The backward linear-bound steps of CROWN, as small standalone functions.

The steps through linear and conv layers and through ReLUs are fused operators (``ops.crown_*``,
with their pure-PyTorch twins in ``reference``); the element-wise and pooling steps are plain
torch.  They know nothing of models: ``bounds.crown`` walks a network and calls them.

Linear bounds.  CROWN bounds a linear function of the network's output, ``A_out @ f(x)``, by walking
the layers backwards.  At every point of the walk the bound reads, per batch element b and
specification row s,

    sum over neurons n of A[b, s, n] * h[b, n]  +  bias[b, s]

where h is the input of the layer reached so far.  Every step below rewrites the A of a layer's
output into the A of its input and returns the increment of ``bias``.

Shapes.  ``A`` has shape (B, S, *neuron_shape): B batch elements, S specification rows, the neuron
shape of the layer (e.g. (C, H, W) for a conv feature map, (N,) for a linear layer).  B may be 1 while
the walk has not crossed a ReLU: every layer before the first ReLU is the same for the whole batch, so
A broadcasts over it.  Bias increments have shape (B, S) (or (1, S)).  Pre-activation bounds
``lower``/``upper`` have shape (B, *neuron_shape).

Lower and upper sides.  A lower bound of ``A @ h`` and an upper bound of ``A_u @ h`` are two
independent walks; they differ only at ReLUs, where a positive coefficient needs the lower
relaxation of ReLU on the lower side and the upper relaxation on the upper side.
"""
from __future__ import annotations

import torch

from .. import ops


def _sum_neurons(t: torch.Tensor) -> torch.Tensor:
    """Sum over the neuron dims of a (B, S, *neuron_shape) tensor -> (B, S)."""
    return t.flatten(2).sum(-1)


def backward_linear(A: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None):
    """Step back through ``y = F.linear(h, weight * mask, bias)``: the fused op
    ``ops.crown_linear_backward``.

    A: (B, S, out_features); weight, mask: (out_features, in_features); bias: (out_features,).
    Returns (A @ W of shape (B, S, in_features), A @ bias of shape (B, S) or None without bias).
    """
    new_A, term = ops.crown_linear_backward(A, weight, bias, mask)
    return new_A, None if bias is None else term


def backward_conv2d(A: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    mask: torch.Tensor | None, input_shape, stride=1, padding=0, dilation=1,
                    groups=1):
    """Step back through ``y = F.conv2d(h, weight * mask, bias, stride, padding, dilation, groups)``:
    the fused op ``ops.crown_conv2d_backward`` (a transposed convolution plus the bias term).

    A: (B, S, C_out, H_out, W_out) in either layout (see neurons_last), kept by the step;
    input_shape: (C_in, H_in, W_in) of h.
    Returns (A of shape (B, S, C_in, H_in, W_in), bias term of shape (B, S) or None).
    """
    new_A, term = ops.crown_conv2d_backward(A, weight, bias, mask, tuple(input_shape[-2:]), stride,
                                            padding, dilation, groups)
    return new_A, None if bias is None else term


def neurons_last(A: torch.Tensor) -> torch.Tensor:
    """A (B, S, C, H, W) laid out with the channels innermost (each (B*S) row channels_last),
    the layout in which the conv and ReLU steps run fastest on the CPU and which they keep.
    A no-op when A is already laid out so."""
    by_pixel = A.permute(0, 1, 3, 4, 2)
    return A if by_pixel.is_contiguous() else by_pixel.contiguous().permute(0, 1, 4, 2, 3)


def backward_scale(A: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None):
    """Step back through the element-wise affine map ``y = h * scale + shift``.

    scale, shift broadcast against the neuron shape (per-channel (C, 1, 1) for batch norm and
    input normalisation).  Returns (A * scale, sum_n A * shift of shape (B, S) or None).  The
    sum runs in float64: over the thousands of input pixels a float32 sum would round far more
    than the rest of the step (the sound bounds of ``bounds.rounding`` count on it).
    """
    if shift is None:
        return A * scale, None
    bias_term = _sum_neurons(A.double() * shift.double()).to(A.dtype)
    return A * scale, bias_term


def backward_avg_pool2d(A: torch.Tensor, input_shape, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override):
    """Step back through ``F.avg_pool2d`` (a linear map without bias): A -> A @ P.

    A: (B, S, C, H_out, W_out); input_shape: (C, H_in, W_in).  Uses the pooling's own adjoint
    (aten's avg_pool2d_backward), which only reads the shape of its ``self`` argument.
    """
    b, s = A.shape[:2]
    shape_ref = A.new_zeros(()).expand(b * s, *input_shape)
    out = torch.ops.aten.avg_pool2d_backward(A.reshape(b * s, *A.shape[2:]), shape_ref,
                                             kernel_size, stride, padding, ceil_mode,
                                             count_include_pad, divisor_override)
    return out.reshape(b, s, *input_shape), None


def backward_adaptive_avg_pool2d(A: torch.Tensor, input_shape):
    """Step back through ``F.adaptive_avg_pool2d`` to an input of shape (C, H_in, W_in).

    A: (B, S, C, H_out, W_out).  Uses aten's adjoint, which only reads the shape of ``self``.
    """
    b, s = A.shape[:2]
    shape_ref = A.new_zeros(()).expand(b * s, *input_shape)
    out = torch.ops.aten._adaptive_avg_pool2d_backward(A.reshape(b * s, *A.shape[2:]), shape_ref)
    return out.reshape(b, s, *input_shape), None


def backward_relu(A_lower: torch.Tensor | None, A_upper: torch.Tensor | None,
                  lower: torch.Tensor, upper: torch.Tensor):
    """Step back through ``y = relu(z)`` given pre-activation bounds lower <= z <= upper.

    A_lower: coefficients of the lower-bound walk, A_upper: of the upper-bound walk, each
    (B or 1, S, *neuron_shape) or None to skip that side.  lower, upper: (B, *neuron_shape).
    Each side is one fused kernel, ``ops.crown_relu_backward`` (relaxation, split into positive
    and negative parts, scaling and intercept accumulation in one pass over A).
    Returns (A_lower', bias_lower, A_upper', bias_upper), each (B, S, ...) / (B, S), None for a
    skipped side.
    """
    new_lower, bias_lower = (None, None) if A_lower is None else ops.crown_relu_backward(
        A_lower, lower, upper, upper_side=False)
    new_upper, bias_upper = (None, None) if A_upper is None else ops.crown_relu_backward(
        A_upper, lower, upper, upper_side=True)
    return new_lower, bias_lower, new_upper, bias_upper


def concretize(A: torch.Tensor, bias, center: torch.Tensor, radius: torch.Tensor, upper: bool,
               float64: bool = False):
    """Bound ``A @ x + bias`` over the input box |x - center| <= radius.

    A: (B or 1, S, *input_shape); center, radius: (B, *input_shape); bias: (B or 1, S) or 0.
    Returns the lower bound A c - |A| r + bias, or with ``upper`` the upper bound A c + |A| r + bias,
    of shape (B, S), in A's dtype.  Exact for a linear function over a box.  ``float64``: sum
    in float64, whose rounding over the thousands of input pixels is negligible (the sound
    bounds of ``bounds.rounding`` need it).
    """
    dtype = A.dtype
    if float64:
        A, center, radius = A.double(), center.double(), radius.double()
        bias = bias.double() if torch.is_tensor(bias) else bias
    flat = A.flatten(2)
    mid = flat @ center.flatten(1).unsqueeze(-1)
    spread = flat.abs() @ radius.flatten(1).unsqueeze(-1)
    out = (mid + spread if upper else mid - spread).squeeze(-1)
    return (out + bias).to(dtype)
