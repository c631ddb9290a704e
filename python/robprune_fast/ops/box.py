"""Boxes themselves: from bounds, the clipped eps-ball of an input (``input_box``), and the
ReLU of a box in place (``relu_box_``). Each op: wrapper, unchecked entry, fake kernel and
autograd side by side."""
from __future__ import annotations

import torch

from .. import reference
from ._dispatch import OPS, _C, call, use_kernel
from .checks import check_box, check_radius_values, check_same_shape, check_tensor


def box_from_bounds(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) -> (centre, radius), refusing lower > upper."""
    check_tensor(lower, "lower")
    check_tensor(upper, "upper", lower, "lower")
    check_same_shape(upper, "upper", lower, "lower")
    if not bool((lower <= upper).all()):
        raise ValueError("lower must be <= upper everywhere (found lower > upper or NaN)")
    return (upper + lower) / 2, (upper - lower) / 2


# --- input_box -----------------------------------------------------------------------------------

def input_box(x, eps, scale=None, shift=None):
    """(centre, radius) of the L-inf ball of radius eps around x (N, C, *) clipped to [0, 1],
    mapped through the per-channel affine h = x * scale + shift (a model's input normalisation,
    scale and shift of shape (C,); identity when None), in one pass over x.

    x must lie in [0, 1]; eps: a number >= 0 or a tensor broadcast to x. Differentiable in all
    four (the gradient is the twin's, ``reference.input_box``).
    """
    check_tensor(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *), got {tuple(x.shape)}")
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps.numel() != 1:
        try:
            torch.broadcast_to(eps, x.shape)
        except RuntimeError:
            raise ValueError(f"eps must be a number or broadcast to x's shape {tuple(x.shape)}, "
                             f"got shape {tuple(eps.shape)}") from None
    for t, name in ((scale, "scale"), (shift, "shift")):
        if t is not None:
            check_tensor(t, name, x, "x")
            if t.shape != (x.shape[1],):
                raise ValueError(f"{name} must have shape (C,) = ({x.shape[1]},), got {tuple(t.shape)}")
    return input_box_unchecked(x, eps, scale, shift)


def input_box_unchecked(x, eps, scale=None, shift=None):
    """input_box without the Python checks (see ``ops.unchecked``). eps: a tensor of x's dtype
    and device, one element or broadcast to x."""
    eps = eps.reshape(()) if eps.numel() == 1 else eps.expand(x.shape)
    if use_kernel("input_box", x.device):
        return call(OPS.input_box, x, eps, scale, shift)
    if not bool(((x >= 0) & (x <= 1)).all() and (eps >= 0).all()):
        raise ValueError("x must lie in [0, 1] and eps must be >= 0 everywhere (no NaN)")
    return reference.input_box(x, eps, scale, shift)


if _C is not None:
    @torch.library.register_fake("robprune_fast::input_box")
    def _fake_input_box(x, eps, scale, shift):
        dense = torch.contiguous_format
        return torch.empty_like(x, memory_format=dense), torch.empty_like(x, memory_format=dense)

    def _input_box_setup(ctx, inputs, output):
        ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs])
        ctx.present = [t is not None for t in inputs]

    def _input_box_backward(ctx, grad_c, grad_r):
        # The box is a few clamps and affine maps: its gradient is the twin's, taken by autograd
        # (inputs that need no gradient stay out of the graph).
        saved = [t if present else None for t, present in zip(ctx.saved_tensors, ctx.present)]
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(saved, needs)]
            c, r = reference.input_box(*leaves)
            wanted = [t for t, n in zip(leaves, needs) if t is not None and n]
            grads = iter(torch.autograd.grad((c, r), wanted, (grad_c, grad_r), allow_unused=True))
        return tuple(next(grads) if t is not None and n else None for t, n in zip(leaves, needs))

    torch.library.register_autograd("robprune_fast::input_box", _input_box_backward,
                                    setup_context=_input_box_setup)


# --- relu_box_ -----------------------------------------------------------------------------------

def relu_box_(center, radius):
    """The box (center, radius) mapped through ReLU, written over center and radius (returned).

    The relu_in prologue of the interval ops for a box nobody else reads: one pass, no fresh
    copies, which on the CPU also spares the page faults of new buffers. center and radius must
    be dense and laid out alike. Not differentiable: use ``relu_in`` where gradients are wanted.
    A negative or NaN radius is refused before anything is written.
    """
    check_box(center, radius)
    if radius.stride() != center.stride():  # density is checked by the kernel
        raise ValueError("center and radius must be laid out alike (same strides), got strides "
                         f"{center.stride()} and {radius.stride()}")
    if torch.is_grad_enabled() and (center.requires_grad or radius.requires_grad):
        raise ValueError("relu_box_ is not differentiable and writes over its inputs; use the "
                         "interval ops' relu_in=True (or reference.relu_box) under autograd")
    return relu_box_unchecked(center, radius)


def relu_box_unchecked(center, radius, check_radius=True):
    """relu_box_ without the Python checks (see ``ops.unchecked``): boxes the caller owns, no
    autograd. check_radius=False: the caller vouches that radius >= 0."""
    if use_kernel("relu_box_", center.device):
        call(OPS.relu_box_, center, radius, bool(check_radius))
        return center, radius
    if check_radius:
        check_radius_values(radius)
    return reference.relu_box_(center, radius)


if _C is not None:
    @torch.library.register_fake("robprune_fast::relu_box_")
    def _fake_relu_box_(center, radius, check_radius=True):
        return None
