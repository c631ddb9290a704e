"""One thin Python wrapper per robprune_fast operator.

Each wrapper checks its arguments, then calls ``torch.ops.robprune_fast.<name>`` (schemas in
pyext/module.cpp, kernels in csrc/). Where the extension has no kernel for the input's device
(a CPU-only build given CUDA tensors, or no compiled extension at all) it falls back to the
op's pure-PyTorch twin in ``reference.py`` with a one-time warning that says how to rebuild.
This module also registers each op's fake (meta) kernel and autograd formula, so the ops work
under autograd and trace under torch.compile.

The bound engine (bounds.py) calls the ``_``-prefixed twins of the wrappers it uses
(``_interval_linear``, ``_interval_conv2d``, ``_relu_box_``, ``_input_box``): the same ops
without the Python checks, which would only re-validate what the engine built itself (its
boxes, its weights cast to its dtype). The kernels' C++ checks still run.

Box convention: boxes are (centre, radius) with radius >= 0; see ``reference.py``.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.robprune_fast)
    _IMPORT_ERROR = None
except ImportError as error:  # not built: every op runs its reference twin
    _C = None
    _IMPORT_ERROR = error

_OPS = torch.ops.robprune_fast
_warned: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def _has_kernel_for(name: str, device_type: str) -> bool:
    # Registrations are fixed once _C is loaded, so the dispatcher is asked once per pair.
    if _C is None:
        return False
    key = "CUDA" if device_type == "cuda" else device_type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"robprune_fast::{name}", key)


def _has_kernel(name: str, device: torch.device) -> bool:
    return _has_kernel_for(name, device.type)


def _use_kernel(name: str, device: torch.device) -> bool:
    """Whether to run the compiled kernel; warns once per (op, device type) when not."""
    if _has_kernel(name, device):
        return True
    if (name, device.type) not in _warned:
        _warned.add((name, device.type))
        why = (f"the extension failed to import ({_IMPORT_ERROR})" if _C is None
               else f"this build has no {device.type} kernel for it")
        warnings.warn(f"robprune_fast.{name}: {why}; running the slower pure-PyTorch reference. "
                      "Rebuild with `pip install --no-build-isolation -e .` "
                      "(FORCE_CUDA=1 and CUDA_HOME set for the CUDA kernels).",
                      RuntimeWarning, stacklevel=3)
    return False


# Below the autograd key: without grad mode torch's Python autograd layer of a custom op only
# redispatches, at about 12 us a call on the CPU. Getattr: a private binding, stable for years,
# but a torch without it must still work.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _call(op, *args):
    """op(*args), skipping the autograd layer where there is nothing for it to record."""
    if _BELOW_AUTOGRAD is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


# --- argument checks (the C++ side repeats them for direct torch.ops calls) ---------------

def _check_tensor(t, name: str, ref: torch.Tensor | None = None, ref_name: str = "center"):
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


def _check_interval_args(center, radius, weight, bias, mask, weight_dim: int):
    _check_tensor(center, "center")
    _check_tensor(radius, "radius", center)
    if radius.shape != center.shape:
        raise ValueError(f"radius must have the shape of center {tuple(center.shape)}, "
                         f"got {tuple(radius.shape)}")
    _check_tensor(weight, "weight", center)
    if weight.dim() != weight_dim:
        raise ValueError(f"weight must be {weight_dim}-D, got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor(bias, "bias", center)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if mask is not None:
        _check_tensor(mask, "mask", center)
        if mask.shape != weight.shape:
            raise ValueError(f"mask must have the shape of weight {tuple(weight.shape)}, "
                             f"got {tuple(mask.shape)}")


def _check_radius_values(radius: torch.Tensor):
    # The kernels check this inside their first pass over the data; the reference path pays
    # for a separate reduction.
    if not bool((radius >= 0).all()):
        raise ValueError("radius must be >= 0 everywhere (no negative or NaN entries); build a "
                         "box from bounds with robprune_fast.ops.box_from_bounds(lower, upper)")


def _pair(value, name: str) -> list[int]:
    values = [value, value] if isinstance(value, int) else list(value)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


def box_from_bounds(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) -> (centre, radius), refusing lower > upper."""
    _check_tensor(lower, "lower")
    _check_tensor(upper, "upper", lower, "lower")
    if upper.shape != lower.shape:
        raise ValueError(f"upper must have the shape of lower {tuple(lower.shape)}, got {tuple(upper.shape)}")
    if not bool((lower <= upper).all()):
        raise ValueError("lower must be <= upper everywhere (found lower > upper or NaN)")
    return (upper + lower) / 2, (upper - lower) / 2


# --- the input box -----------------------------------------------------------------------------

def input_box(x, eps, scale=None, shift=None):
    """(centre, radius) of the L-inf ball of radius eps around x (N, C, *) clipped to [0, 1],
    mapped through the per-channel affine h = x * scale + shift (a model's input normalisation,
    scale and shift of shape (C,); identity when None), in one pass over x.

    x must lie in [0, 1]; eps: a number >= 0 or a tensor broadcast to x. Differentiable in all
    four (the gradient is the twin's, ``reference.input_box``).
    """
    _check_tensor(x, "x")
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
            _check_tensor(t, name, x, "x")
            if t.shape != (x.shape[1],):
                raise ValueError(f"{name} must have shape (C,) = ({x.shape[1]},), got {tuple(t.shape)}")
    return _input_box(x, eps, scale, shift)


def _input_box(x, eps, scale=None, shift=None):
    """input_box without the Python checks: the engine's entry. eps: a tensor of x's dtype and
    device, one element or broadcast to x."""
    eps = eps.reshape(()) if eps.numel() == 1 else eps.expand(x.shape)
    if _use_kernel("input_box", x.device):
        return _call(_OPS.input_box, x, eps, scale, shift)
    if not bool(((x >= 0) & (x <= 1)).all() and (eps >= 0).all()):
        raise ValueError("x must lie in [0, 1] and eps must be >= 0 everywhere (no NaN)")
    return reference.input_box(x, eps, scale, shift)


# --- the ReLU of a box, in place ----------------------------------------------------------------

def relu_box_(center, radius):
    """The box (center, radius) mapped through ReLU, written over center and radius (returned).

    The relu_in prologue of the interval ops for a box nobody else reads: one pass, no fresh
    copies, which on the CPU also spares the page faults of new buffers. center and radius must
    be dense and laid out alike. Not differentiable: use ``relu_in`` where gradients are wanted.
    """
    _check_tensor(center, "center")
    _check_tensor(radius, "radius", center)
    if radius.shape != center.shape:
        raise ValueError(f"radius must have the shape of center {tuple(center.shape)}, "
                         f"got {tuple(radius.shape)}")
    if radius.stride() != center.stride():  # density is checked by the kernel
        raise ValueError("center and radius must be laid out alike (same strides), got strides "
                         f"{center.stride()} and {radius.stride()}")
    if torch.is_grad_enabled() and (center.requires_grad or radius.requires_grad):
        raise ValueError("relu_box_ is not differentiable and writes over its inputs; use the "
                         "interval ops' relu_in=True (or reference.relu_box) under autograd")
    return _relu_box_(center, radius)


def _relu_box_(center, radius):
    """relu_box_ without the Python checks: the engine's entry (boxes it owns, no autograd)."""
    if _use_kernel("relu_box_", center.device):
        _call(_OPS.relu_box_, center, radius)
        return center, radius
    _check_radius_values(radius)
    return reference.relu_box_(center, radius)


# --- |W * M|, made once per weight update ----------------------------------------------------

# weight -> (key, mask weakref, pair), filled only inside weight_cache() scopes. Keyed on the
# tensors' version counters, which every in-place update made through autograd-visible ops
# bumps (optimiser steps, copy_, load_state_dict). Writes through `.data` bypass the counter,
# and a stale |W * M| would give bounds for the wrong weights: hence a scope the caller opens
# where it knows weights only change the visible way (evaluation, verification, PGD on bounds),
# rather than a cache that is always on.
_pair_cache = WeakIdKeyDictionary()
_cache_depth = 0


@contextlib.contextmanager
def weight_cache():
    """Within this scope the interval ops make W * M and |W * M| once per weight update and
    reuse them across calls. Inside it, change weights and masks only through torch ops (an
    optimiser step, copy_, load_state_dict), never through ``.data``."""
    global _cache_depth
    _cache_depth += 1
    try:
        yield
    finally:
        _cache_depth -= 1
        if _cache_depth == 0:
            _pair_cache.clear()


def masked_weight_pair(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A (2, *weight.shape) tensor holding weight * mask and |weight * mask|, in one pass."""
    _check_tensor(weight, "weight")
    if mask is not None:
        _check_tensor(mask, "mask", weight, "weight")
        if mask.shape != weight.shape:
            raise ValueError(f"mask must have the shape of weight {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if _use_kernel("masked_weight_pair", weight.device):
        return _OPS.masked_weight_pair(weight, mask)
    return reference.masked_weight_pair(weight, mask)


def _cached_weight_pair(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if _cache_depth == 0 or torch.compiler.is_compiling() or isinstance(weight, torch._subclasses.FakeTensor):
        return None  # the kernel makes the pair itself
    key = (weight._version, weight.data_ptr(), None if mask is None else (mask._version, mask.data_ptr()))
    hit = _pair_cache.get(weight)
    # A weak reference to the mask, not its id: a new mask may reuse a freed one's address.
    if hit is not None and hit[0] == key and (hit[1]() if hit[1] is not None else None) is mask:
        return hit[2]
    with torch.no_grad():
        pair = _OPS.masked_weight_pair(weight.detach(), None if mask is None else mask.detach())
    _pair_cache[weight] = (key, None if mask is None else weakref.ref(mask), pair)
    return pair


# --- interval linear / conv2d ----------------------------------------------------------------

def interval_linear(center, radius, weight, bias=None, mask=None, relu_in=False, out_bounds=False):
    """Output box of ``x -> F.linear(x, weight * mask, bias)`` for x in the box (center, radius).

    center, radius: (*, in_features); weight: (out_features, in_features); mask: like weight.
    relu_in: push the input box through ReLU first. out_bounds: return (lower, upper) instead of
    (centre, radius). Returns two tensors of shape (*, out_features).
    """
    _check_interval_args(center, radius, weight, bias, mask, 2)
    if center.dim() < 1 or center.shape[-1] != weight.shape[1]:
        raise ValueError(f"center's last dimension must equal weight.size(1) (in_features = "
                         f"{weight.shape[1]}), got shape {tuple(center.shape)}")
    return _interval_linear(center, radius, weight, bias, mask, relu_in, out_bounds)


def _interval_linear(center, radius, weight, bias=None, mask=None, relu_in=False, out_bounds=False,
                     check_radius=True):
    """interval_linear without the Python checks: the engine's entry. check_radius=False:
    the caller made the radius itself and vouches that it is >= 0 (the kernel skips that pass)."""
    if _use_kernel("interval_linear", center.device):
        return _call(_OPS.interval_linear, center, radius, weight, bias, mask,
                     _cached_weight_pair(weight, mask), bool(relu_in), bool(out_bounds),
                     bool(check_radius))
    if check_radius:
        _check_radius_values(radius)
    return reference.interval_linear(center, radius, weight, bias, mask, relu_in, out_bounds)


def interval_conv2d(center, radius, weight, bias=None, mask=None, stride=1, padding=0, dilation=1,
                    groups=1, relu_in=False, out_bounds=False):
    """Output box of ``x -> F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)``
    for x in the box (center, radius). center, radius: (N, C, H, W), any memory format.
    relu_in and out_bounds as in interval_linear.
    """
    _check_interval_args(center, radius, weight, bias, mask, 4)
    if center.dim() != 4:
        raise ValueError(f"center must be 4-D (N, C, H, W), got shape {tuple(center.shape)}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if center.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"center has {center.shape[1]} channels but weight expects in_channels = "
                         f"weight.size(1) * groups = {weight.shape[1] * groups}")
    return _interval_conv2d(center, radius, weight, bias, mask, stride, padding, dilation, groups,
                            relu_in, out_bounds)


def _interval_conv2d(center, radius, weight, bias, mask, stride, padding, dilation, groups,
                     relu_in=False, out_bounds=False, check_radius=True):
    """interval_conv2d without the Python checks: the engine's entry. stride, padding and
    dilation: pairs of ints. check_radius as in _interval_linear."""
    if _use_kernel("interval_conv2d", center.device):
        return _call(_OPS.interval_conv2d, center, radius, weight, bias, mask,
                     _cached_weight_pair(weight, mask), stride, padding, dilation, groups,
                     bool(relu_in), bool(out_bounds), bool(check_radius))
    if check_radius:
        _check_radius_values(radius)
    return reference.interval_conv2d(center, radius, weight, bias, mask, stride, padding, dilation,
                                     groups, relu_in, out_bounds)


# --- CROWN's backward step through a ReLU ----------------------------------------------------

def crown_relu_backward(A, lower, upper, upper_side=False):
    """CROWN's backward step through y = relu(z) given lower <= z <= upper, in one kernel:
    relaxation (chord above, adaptive line below), split of A into positive and negative parts,
    scaling, and accumulation of the intercepts into the bias.

    A: (B or 1, S, *neurons), the coefficients of S linear bounds in terms of y (first dimension
    1 when shared by the batch); lower, upper: (B, *neurons). upper_side: the walk bounds from
    above, else from below. Returns (A in terms of z: (B, S, *neurons), bias: (B, S)); a
    (B, S, C, H, W) A laid out channels-last keeps that layout.
    """
    _check_tensor(A, "A")
    _check_tensor(lower, "lower", A, "A")
    _check_tensor(upper, "upper", A, "A")
    if upper.shape != lower.shape:
        raise ValueError(f"upper must have the shape of lower {tuple(lower.shape)}, got {tuple(upper.shape)}")
    if lower.dim() < 1 or A.dim() != lower.dim() + 1 or A.shape[2:] != lower.shape[1:] \
            or A.shape[0] not in (1, lower.shape[0]):
        raise ValueError(f"A must have shape (B or 1, S, *neurons) with B, *neurons = {tuple(lower.shape)} "
                         f"(the shape of lower), got {tuple(A.shape)}")
    if _use_kernel("crown_relu_backward", A.device):
        return _OPS.crown_relu_backward(A, lower, upper, bool(upper_side))
    if not bool((lower <= upper).all()):
        raise ValueError("lower must be <= upper everywhere (found lower > upper or NaN)")
    return reference.crown_relu_backward(A, lower, upper, upper_side)


# --- CROWN's backward steps through linear and conv2d layers ----------------------------------

def _check_step_args(A, weight, bias, mask, weight_dim: int):
    _check_tensor(A, "A")
    _check_tensor(weight, "weight", A, "A")
    if weight.dim() != weight_dim:
        raise ValueError(f"weight must be {weight_dim}-D, got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor(bias, "bias", A, "A")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if mask is not None:
        _check_tensor(mask, "mask", A, "A")
        if mask.shape != weight.shape:
            raise ValueError(f"mask must have the shape of weight {tuple(weight.shape)}, "
                             f"got {tuple(mask.shape)}")


def crown_linear_backward(A, weight, bias=None, mask=None):
    """CROWN's backward step through ``h' = F.linear(h, weight * mask, bias)``.

    A: (*, out_features), the coefficients of linear bounds in terms of h'. Returns (A @ (weight
    * mask): (*, in_features), the bias term A @ bias: (*), zeros without a bias). Differentiable
    with respect to A, weight, bias and mask; inside ``weight_cache()`` weight * mask is made once
    per weight update.
    """
    _check_step_args(A, weight, bias, mask, 2)
    if A.dim() < 1 or A.shape[-1] != weight.shape[0]:
        raise ValueError(f"A's last dimension must equal weight.size(0) (out_features = "
                         f"{weight.shape[0]}), got shape {tuple(A.shape)}")
    if _use_kernel("crown_linear_backward", A.device):
        return _OPS.crown_linear_backward(A, weight, bias, mask, _cached_weight_pair(weight, mask))
    return reference.crown_linear_backward(A, weight, bias, mask)


def crown_conv2d_backward(A, weight, bias, mask, input_size, stride=1, padding=0, dilation=1,
                          groups=1):
    """CROWN's backward step through ``h' = F.conv2d(h, weight * mask, bias, stride, padding,
    dilation, groups)``, whose input h has spatial size ``input_size`` (H_in, W_in).

    A: (*, C_out, H_out, W_out). Returns (the transposed convolution of A: (*, C_in, H_in, W_in),
    the bias term sum_{c,y,x} A[..., c, y, x] bias[c]: (*), zeros without a bias). The output keeps
    A's layout: rows laid out channels-last (``bound_steps.neurons_last``) give channels-last
    rows, which oneDNN transposes several times faster on the CPU. Differentiable like
    crown_linear_backward.
    """
    _check_step_args(A, weight, bias, mask, 4)
    if A.dim() < 3 or A.shape[-3] != weight.shape[0]:
        raise ValueError(f"A must have shape (*, C_out, H_out, W_out) with C_out = weight.size(0) "
                         f"= {weight.shape[0]}, got {tuple(A.shape)}")
    input_size = _pair(input_size, "input_size")
    if min(input_size) < 1:
        raise ValueError(f"input_size must be two positive ints (H_in, W_in), got {input_size}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if _use_kernel("crown_conv2d_backward", A.device):
        return _OPS.crown_conv2d_backward(A, weight, bias, mask, _cached_weight_pair(weight, mask),
                                          input_size, stride, padding, dilation, groups)
    return reference.crown_conv2d_backward(A, weight, bias, mask, input_size, stride, padding,
                                           dilation, groups)


# --- fake kernels and autograd ---------------------------------------------------------------

def _register_interval_op(name: str, layer_output, n_geometry: int) -> None:
    """Fake kernel and autograd formula of interval_<name>.

    Both ops take (center, radius, weight, bias, mask, weight_pair, *geometry, relu_in,
    out_bounds, check_radius); their backward ops take (grad_a, grad_b, center, radius, weight,
    mask, weight_pair, *geometry, relu_in, out_bounds, output_mask), with n_geometry geometry
    arguments. layer_output(center, weight, geometry) gives an empty tensor shaped and laid out
    like the layer's output. A call may leave out check_radius (its default), so the arguments
    after the geometry are counted from the front, never from the end.
    """
    op = f"robprune_fast::interval_{name}"
    backward_op = getattr(_OPS, f"interval_{name}_backward")

    @torch.library.register_fake(op)
    def _fake(center, radius, weight, bias, mask, weight_pair, *rest):
        out = layer_output(center, weight, rest[:n_geometry])
        return out, torch.empty_like(out)

    @torch.library.register_fake(f"{op}_backward")
    def _fake_backward(grad_a, grad_b, center, radius, weight, mask, weight_pair, *rest):
        need = rest[-1]
        like = (center, center, weight, weight.new_empty(weight.shape[0]), weight)
        return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, need))

    def setup_context(ctx, inputs, output):
        center, radius, weight, bias, mask, weight_pair, *rest = inputs
        ctx.save_for_backward(center, radius, weight, mask, weight_pair)
        ctx.rest = rest[:n_geometry + 2]  # geometry, relu_in, out_bounds: what backward_op takes
        ctx.n_rest = len(rest)

    def backward(ctx, grad_a, grad_b):
        center, radius, weight, mask, weight_pair = ctx.saved_tensors
        n = ctx.needs_input_grad
        need = [n[0], n[1], n[2], n[3], mask is not None and n[4]]
        grads = backward_op(grad_a, grad_b, center, radius, weight, mask, weight_pair, *ctx.rest, need)
        # None for weight_pair, the geometry and the flags.
        return (*[g if wanted else None for g, wanted in zip(grads, need)], None) + (None,) * ctx.n_rest

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _linear_output(center, weight, geometry):
    return center.new_empty((*center.shape[:-1], weight.shape[0]))


def _conv2d_output(center, weight, geometry):
    stride, padding, dilation, groups = geometry
    # conv2d on fake tensors gives the output's shape and memory format (channels_last in,
    # channels_last out), exactly as the real kernel's ATen convolution does.
    return F.conv2d(center, weight, None, stride, padding, dilation, groups)


def _register_crown_relu_op() -> None:
    op = "robprune_fast::crown_relu_backward"

    @torch.library.register_fake(op)
    def _fake(A, lower, upper, upper_side):
        specs = A.shape[1]
        return lower.new_empty((lower.shape[0], specs, *lower.shape[1:])), lower.new_empty((lower.shape[0], specs))

    @torch.library.register_fake(f"{op}_grad")
    def _fake_grad(grad_A_out, grad_bias, A, lower, upper, upper_side):
        return torch.empty_like(A), torch.empty_like(lower), torch.empty_like(upper)

    def setup_context(ctx, inputs, output):
        A, lower, upper, upper_side = inputs
        ctx.save_for_backward(A, lower, upper)
        ctx.upper_side = upper_side

    def backward(ctx, grad_A_out, grad_bias):
        A, lower, upper = ctx.saved_tensors
        grad_A, grad_lower, grad_upper = _OPS.crown_relu_backward_grad(
            grad_A_out, grad_bias, A, lower, upper, ctx.upper_side)
        n = ctx.needs_input_grad
        return (grad_A if n[0] else None, grad_lower if n[1] else None,
                grad_upper if n[2] else None, None)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_relu_box_op() -> None:
    @torch.library.register_fake("robprune_fast::relu_box_")
    def _fake(center, radius):
        return None


def _register_input_box_op() -> None:
    op = "robprune_fast::input_box"

    @torch.library.register_fake(op)
    def _fake(x, eps, scale, shift):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs])
        ctx.present = [t is not None for t in inputs]

    def backward(ctx, grad_c, grad_r):
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

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_crown_affine_op(name: str, step_output) -> None:
    """Fake kernel and autograd formula of crown_<name>_backward.

    Both ops take (A, weight, bias, mask, weight_pair, *geometry); their _grad ops take
    (grad_A_out, grad_bias_term, A, weight, bias, mask, weight_pair, *geometry, output_mask).
    step_output(A, weight, geometry) gives (the shape of the new A, the number of trailing
    dimensions of A that the bias term drops).
    """
    op = f"robprune_fast::crown_{name}_backward"
    grad_op = getattr(_OPS, f"crown_{name}_backward_grad")

    @torch.library.register_fake(op)
    def _fake(A, weight, bias, mask, weight_pair, *geometry):
        shape, trailing = step_output(A, weight, geometry)
        return A.new_empty(shape), A.new_empty(A.shape[:-trailing])

    @torch.library.register_fake(f"{op}_grad")
    def _fake_grad(grad_A_out, grad_bias_term, A, weight, bias, mask, weight_pair, *rest):
        need = rest[-1]
        like = (A, weight, weight.new_empty(weight.shape[0]), weight)
        return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, need))

    def setup_context(ctx, inputs, output):
        A, weight, bias, mask, weight_pair, *geometry = inputs
        ctx.save_for_backward(A, weight, bias, mask, weight_pair)
        ctx.geometry = geometry

    def backward(ctx, grad_A_out, grad_bias_term):
        A, weight, bias, mask, weight_pair = ctx.saved_tensors
        n = ctx.needs_input_grad
        need = [n[0], n[1], bias is not None and n[2], mask is not None and n[3]]
        grads = grad_op(grad_A_out, grad_bias_term, A, weight, bias, mask, weight_pair,
                        *ctx.geometry, need)
        return (*[g if wanted else None for g, wanted in zip(grads, need)], None) + (None,) * len(ctx.geometry)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _crown_linear_output(A, weight, geometry):
    return (*A.shape[:-1], weight.shape[1]), 1


def _crown_conv2d_output(A, weight, geometry):
    input_size, _, _, _, groups = geometry
    return (*A.shape[:-3], weight.shape[1] * groups, *input_size), 3


if _C is not None:
    _register_interval_op("linear", _linear_output, n_geometry=0)
    _register_interval_op("conv2d", _conv2d_output, n_geometry=4)
    _register_crown_relu_op()
    _register_input_box_op()
    _register_relu_box_op()
    _register_crown_affine_op("linear", _crown_linear_output)
    _register_crown_affine_op("conv2d", _crown_conv2d_output)

    @torch.library.register_fake("robprune_fast::masked_weight_pair")
    def _fake_masked_weight_pair(weight, mask):
        # Each half is laid out like the weight (channels_last stays channels_last).
        half = torch.empty_like(weight, memory_format=_suggested_format(weight))
        return weight.new_empty_strided((2, *weight.shape), (weight.numel(), *half.stride()))


def _suggested_format(t: torch.Tensor) -> torch.memory_format:
    """Python twin of ATen's suggest_memory_format for dense 4-D tensors."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
