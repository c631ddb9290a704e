"""CROWN's backward linear-bound steps: through a ReLU given its pre-activation bounds
(``crown_relu_backward``), and through a linear or conv2d layer with its bias term
(``crown_linear_backward``, ``crown_conv2d_backward``). Wrappers, fake kernels and autograd
side by side."""
from __future__ import annotations

import torch

from .. import reference
from ._dispatch import OPS, _C, saving, use_kernel
from .checks import check_layer, check_same_shape, check_tensor, conv_geometry, int_pair
from .weight_pair import cached_weight_pair


# --- through a ReLU --------------------------------------------------------------------------------

def crown_relu_backward(A, lower, upper, upper_side=False):
    """CROWN's backward step through y = relu(z) given lower <= z <= upper, in one kernel:
    relaxation (chord above, adaptive line below), split of A into positive and negative parts,
    scaling, and accumulation of the intercepts into the bias.

    A: (B or 1, S, *neurons), the coefficients of S linear bounds in terms of y (first dimension
    1 when shared by the batch); lower, upper: (B, *neurons). upper_side: the walk bounds from
    above, else from below. Returns (A in terms of z: (B, S, *neurons), bias: (B, S)); a
    (B, S, C, H, W) A laid out channels-last keeps that layout.
    """
    check_tensor(A, "A")
    check_tensor(lower, "lower", A, "A")
    check_tensor(upper, "upper", A, "A")
    check_same_shape(upper, "upper", lower, "lower")
    if lower.dim() < 1 or A.dim() != lower.dim() + 1 or A.shape[2:] != lower.shape[1:] \
            or A.shape[0] not in (1, lower.shape[0]):
        raise ValueError(f"A must have shape (B or 1, S, *neurons) with B, *neurons = {tuple(lower.shape)} "
                         f"(the shape of lower), got {tuple(A.shape)}")
    if use_kernel("crown_relu_backward", A.device):
        return OPS.crown_relu_backward(A, lower, upper, bool(upper_side))
    if not bool((lower <= upper).all()):
        raise ValueError("lower must be <= upper everywhere (found lower > upper or NaN)")
    return reference.crown_relu_backward(A, lower, upper, upper_side)


if _C is not None:
    @torch.library.register_fake("robprune_fast::crown_relu_backward")
    def _fake_relu(A, lower, upper, upper_side):
        specs = A.shape[1]
        return (lower.new_empty((lower.shape[0], specs, *lower.shape[1:])),
                lower.new_empty((lower.shape[0], specs)))

    @torch.library.register_fake("robprune_fast::crown_relu_backward_grad")
    def _fake_relu_grad(grad_A_out, grad_bias, A, lower, upper, upper_side):
        return torch.empty_like(A), torch.empty_like(lower), torch.empty_like(upper)

    def _relu_setup(ctx, inputs, output):
        A, lower, upper, upper_side = inputs
        ctx.save_for_backward(A, lower, upper)
        ctx.upper_side = upper_side

    def _relu_backward(ctx, grad_A_out, grad_bias):
        A, lower, upper = ctx.saved_tensors
        grad_A, grad_lower, grad_upper = OPS.crown_relu_backward_grad(
            grad_A_out, grad_bias, A, lower, upper, ctx.upper_side)
        n = ctx.needs_input_grad
        return (grad_A if n[0] else None, grad_lower if n[1] else None,
                grad_upper if n[2] else None, None)

    torch.library.register_autograd("robprune_fast::crown_relu_backward", _relu_backward,
                                    setup_context=_relu_setup)


# --- through a linear or conv2d layer -----------------------------------------------------------

def _check_step(A, weight, bias, mask, weight_dim: int):
    check_tensor(A, "A")
    check_layer(weight, bias, mask, weight_dim, A, "A")


def crown_linear_backward(A, weight, bias=None, mask=None):
    """CROWN's backward step through ``h' = F.linear(h, weight * mask, bias)``.

    A: (*, out_features), the coefficients of linear bounds in terms of h'. Returns (A @ (weight
    * mask): (*, in_features), the bias term A @ bias: (*), zeros without a bias). Differentiable
    with respect to A, weight, bias and mask; inside ``weight_cache()`` weight * mask is made once
    per weight update.
    """
    _check_step(A, weight, bias, mask, 2)
    if A.dim() < 1 or A.shape[-1] != weight.shape[0]:
        raise ValueError(f"A's last dimension must equal weight.size(0) (out_features = "
                         f"{weight.shape[0]}), got shape {tuple(A.shape)}")
    if use_kernel("crown_linear_backward", A.device):
        return OPS.crown_linear_backward(A, weight, bias, mask, cached_weight_pair(weight, mask))
    return reference.crown_linear_backward(A, weight, bias, mask)


def crown_conv2d_backward(A, weight, bias, mask, input_size, stride=1, padding=0, dilation=1,
                          groups=1):
    """CROWN's backward step through ``h' = F.conv2d(h, weight * mask, bias, stride, padding,
    dilation, groups)``, whose input h has spatial size ``input_size`` (H_in, W_in).

    A: (*, C_out, H_out, W_out). Returns (the transposed convolution of A: (*, C_in, H_in, W_in),
    the bias term sum_{c,y,x} A[..., c, y, x] bias[c]: (*), zeros without a bias). The output keeps
    A's layout: rows laid out channels-last (``bounds.crown_steps.neurons_last``) give
    channels-last rows, which oneDNN transposes several times faster on the CPU. Differentiable
    like crown_linear_backward.
    """
    _check_step(A, weight, bias, mask, 4)
    if A.dim() < 3 or A.shape[-3] != weight.shape[0]:
        raise ValueError(f"A must have shape (*, C_out, H_out, W_out) with C_out = weight.size(0) "
                         f"= {weight.shape[0]}, got {tuple(A.shape)}")
    input_size = int_pair(input_size, "input_size", 1)
    stride, padding, dilation, groups = conv_geometry(stride, padding, dilation, groups)
    if use_kernel("crown_conv2d_backward", A.device):
        return OPS.crown_conv2d_backward(A, weight, bias, mask, cached_weight_pair(weight, mask),
                                         input_size, stride, padding, dilation, groups)
    return reference.crown_conv2d_backward(A, weight, bias, mask, input_size, stride, padding,
                                           dilation, groups)


def _register_affine(name: str, step_output) -> None:
    """Fake kernel and autograd formula of crown_<name>_backward.

    Both ops take (A, weight, bias, mask, weight_pair, *geometry); their _grad ops take
    (grad_A_out, grad_bias_term, A, weight, bias, mask, weight_pair, *geometry, output_mask).
    step_output(A, weight, geometry) gives (the shape of the new A, the number of trailing
    dimensions of A that the bias term drops).
    """
    op = f"robprune_fast::crown_{name}_backward"
    grad_op = getattr(OPS, f"crown_{name}_backward_grad")

    @torch.library.register_fake(op)
    def _fake(A, weight, bias, mask, weight_pair, *geometry):
        shape, trailing = step_output(A, weight, geometry)
        return A.new_empty(shape), A.new_empty(A.shape[:-trailing])

    @torch.library.register_fake(f"{op}_grad")
    def _fake_grad(grad_A_out, grad_bias_term, A, weight, bias, mask, weight_pair, *rest):
        *geometry, output_mask = rest
        like = (A, weight, weight.new_empty(weight.shape[0]), weight)
        return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, output_mask))

    def backward(ctx, grad_A_out, grad_bias_term):
        A, weight, bias, mask, weight_pair = ctx.saved_tensors
        n = ctx.needs_input_grad
        need = [n[0], n[1], bias is not None and n[2], mask is not None and n[3]]
        grads = grad_op(grad_A_out, grad_bias_term, A, weight, bias, mask, weight_pair,
                        *ctx.geometry, need)
        # None for weight_pair, then for the geometry.
        return (*[g if wanted else None for g, wanted in zip(grads, need)], None) + (None,) * len(ctx.geometry)

    # Saved: A, weight, bias, mask, weight_pair; then the geometry.
    torch.library.register_autograd(op, backward, setup_context=saving(0, 1, 2, 3, 4, geometry_from=5))


def _linear_step_output(A, weight, geometry):
    return (*A.shape[:-1], weight.shape[1]), 1


def _conv2d_step_output(A, weight, geometry):
    input_size, _, _, _, groups = geometry
    return (*A.shape[:-3], weight.shape[1] * groups, *input_size), 3


if _C is not None:
    _register_affine("linear", _linear_step_output)
    _register_affine("conv2d", _conv2d_step_output)
