"""The engine's entry points: ``compute_bounds``, ``bound_details`` and ``training_bounds``,
with the one validation they share, and ``margin_spec``."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import nn

from .. import ops
from . import crown, ibp, rounding
from .compile import compile_model
from .floats import exact_float
from .layers import Scale, clean_walk, needs_clean, relu_ops

METHODS = ("ibp", "crown-ibp", "crown")
DEFAULT_MAX_MEMORY = 1 << 30


@dataclasses.dataclass
class Bounds:
    """Output bounds, the pre-activation bounds of every ReLU layer that were used, and the
    rounding slack of the outputs (see ``bound_details``)."""
    lower: torch.Tensor
    upper: torch.Tensor | None
    relu_bounds: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    output_slack: torch.Tensor | None = None


@dataclasses.dataclass
class TrainingBounds:
    """What ``training_bounds`` returns.

    ibp_lower, ibp_upper: (B, S) IBP bounds of ``C @ logits``.  crown_lower, crown_upper: (B, S')
    CROWN-IBP bounds of ``crown_spec @ logits``, None when not asked for.  relu_bounds: as in
    ``Bounds`` (IBP's pre-activation bounds, which CROWN-IBP also uses).
    """
    ibp_lower: torch.Tensor
    ibp_upper: torch.Tensor
    crown_lower: torch.Tensor | None
    crown_upper: torch.Tensor | None
    relu_bounds: Mapping[str, tuple[torch.Tensor, torch.Tensor]]


# --- validation ---------------------------------------------------------------------------------

def check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def compute_dtype(x, dtype):
    """The engine's dtype: float64 for float64 inputs or when asked, else float32."""
    if dtype is None:
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_x(x, dtype):
    """x as dtype; its values are left to the input box's pass (see input_box)."""
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.dim() < 2:
        raise ValueError("x must be a floating-point tensor of shape (B, ...), got "
                         f"{type(x).__name__} {getattr(x, 'shape', '')}")
    return x.to(dtype)


def check_values(x):
    low, high = torch.aminmax(x) if x.numel() else (None, None)
    if x.numel() and not (low >= 0 and high <= 1):  # written so NaN fails too
        raise ValueError(f"x must lie in [0, 1], got values in [{low.item():g}, {high.item():g}]")


def _check_eps(eps, x, dtype):
    eps = torch.as_tensor(eps, device=x.device).to(dtype)
    if eps.numel() and not (eps.min() >= 0):
        raise ValueError(f"eps must be >= 0, got {eps.min().item():g}")
    try:  # a number (the usual case) needs no shape arithmetic
        ok = eps.dim() == 0 or torch.broadcast_shapes(eps.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"eps must be a number or broadcast to x's shape {tuple(x.shape)}, got "
                         f"shape {tuple(eps.shape)}")
    return eps


def _check_spec(C, x, dtype):
    if C is None:
        return None
    if not torch.is_tensor(C) or C.dim() not in (2, 3):
        raise ValueError("C must be a tensor of shape (B, S, K) or (S, K), got "
                         f"{getattr(C, 'shape', type(C).__name__)}")
    return C.to(device=x.device, dtype=dtype)


def _check_max_memory(max_memory):
    if not (isinstance(max_memory, int) and max_memory > 0):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")


def validated(x, eps, C, dtype, max_memory):
    """The arguments every entry point shares, checked once: (x, eps, C, dtype)."""
    _check_max_memory(max_memory)
    dtype = compute_dtype(x, dtype)
    x = check_x(x, dtype)
    return x, _check_eps(eps, x, dtype), _check_spec(C, x, dtype), dtype


# --- the IBP stage every method starts with -------------------------------------------------------

def input_box(x, eps, scale=None, shift=None):
    """ops.unchecked.input_box, whose kernel checks x's values in the pass it makes anyway; its
    error becomes check_values's, which names the values found."""
    try:
        return ops.unchecked.input_box(x, eps, scale, shift)
    except (RuntimeError, ValueError):
        check_values(x)
        raise


def _input_normalisation(seq, x):
    """(scale, shift) of shape (C,) when seq starts with a per-channel input normalisation
    (models.Normalize) that ops.input_box can fold in, else (None, None)."""
    first = seq[0] if seq else None
    if type(first) is not Scale or x.dim() < 2:
        return None, None
    channels = x.shape[1]
    scale, shift = first.scale.reshape(-1), first.shift.reshape(-1)
    if scale.numel() == 1:
        scale, shift = scale.expand(channels), shift.expand(channels)
    if scale.numel() != channels or first.scale.shape[1:] != (1,) * (x.dim() - 2):
        return None, None
    return scale.contiguous(), shift.contiguous()


def ibp_stage(model, x, eps, C, dtype, method, in_place=False, sound=False):
    """Compile the model and run IBP over the input box: every ReLU records its pre-activation
    bounds (none with in_place, see ibp.walk; only IBP may pass it: CROWN reads the records and
    its input box).  Returns (ops, input box, (lower, upper) of the output or of C @ output,
    C as (B, S, K), the rounding budget or None).  sound: carry a rounding.Budget, so that
    every bound holds in floating point.  Must run inside ``exact_float``."""
    seq = compile_model(model, dtype)
    if not seq:
        raise ValueError("model has no layers to bound (an empty nn.Sequential?)")
    if method != "ibp":
        for op in seq:
            if not op.supports_crown:
                raise NotImplementedError(f"method {method!r} does not support layer {op.name}"
                                          f"; use method='ibp'")
    if needs_clean(seq):
        clean_walk(seq, x)
    # Sound IBP widens its boxes by their rounding; CROWN tracks a budget for its sweeps.
    forward_dtype = _forward_dtype(model, dtype)
    widen = rounding.Widening(dtype, forward_dtype) if sound and method == "ibp" else None
    budget = rounding.Budget(x, eps, forward_dtype, crown=True) if sound and method != "ibp" else None
    # CROWN concretises over the input box in pixel space; IBP starts from it pushed through
    # the model's input normalisation, which ops.input_box folds into the same pass over x.
    box = None if method == "ibp" else input_box(x, eps)
    scale, shift = _input_normalisation(seq, x)
    if scale is not None:
        first = seq[0]
        first.in_shape = first.out_shape = tuple(x.shape[1:])
        if budget is not None:
            budget.T = first.rounding(budget.T, (x + eps).clamp(max=1), budget)
        c, r = input_box(x, eps, scale, shift)
        if widen is not None:  # the normalisation folded into the input box rounds too
            pixels = (x + eps).clamp(max=1) * first.scale.abs()
            r = widen.after(first, torch.add(r, pixels, alpha=6 * widen.gamma(first.terms + 2)))
        out, C = ibp.output_bounds(seq[1:], c, r, C, in_place, budget, widen)
    else:
        out, C = ibp.output_bounds(seq, *(box if box is not None else input_box(x, eps)), C,
                                   in_place, budget, widen)
    return seq, box, out, C, budget


def _forward_dtype(model, dtype):
    """The dtype of the model's own forward: that of its floating-point parameters."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), dtype)


class ReluBounds(Mapping):
    """ReLU name -> (lower, upper) of its pre-activation; a module run twice gets a ':2' suffix.
    Read-only, and lazy: a ReLU's bounds are formed when first looked up."""

    def __init__(self, seq):
        self._ops = {}
        for op in relu_ops(seq):
            name, k = op.name, 1
            while name in self._ops:
                k += 1
                name = f"{op.name}:{k}"
            self._ops[name] = op

    def __getitem__(self, name):
        return self._ops[name].bounds()

    def __iter__(self):
        return iter(self._ops)

    def __len__(self):
        return len(self._ops)


# --- entry points ----------------------------------------------------------------------------------

def compute_bounds(model: nn.Module, x: torch.Tensor, eps, method: str = "crown-ibp",
                   C: torch.Tensor | None = None, *, upper: bool = True,
                   intersect_ibp: bool = False, max_memory: int = DEFAULT_MAX_MEMORY,
                   dtype: torch.dtype | None = None, sound: bool = True,
                   differentiable: bool = False):
    """Sound (lower, upper) bounds of ``model(x')`` (or ``C @ model(x')``) for every x' with
    ``|x' - x|_inf <= eps`` and ``0 <= x' <= 1``.

    model: an nn.Sequential (or single layer) of the supported layers, see the package docstring.
    x: (B, ...) in [0, 1].  eps: >= 0, a number or a tensor broadcastable to x (pixel space).
    method: "ibp", "crown-ibp" or "crown".  C: (B, S, K) or (S, K) specification; the bounds then
    have shape (B, S), else the output's shape.  upper=False skips the upper bound (returned as
    None), which halves CROWN's work.  intersect_ibp: see the package docstring; it also
    intersects the final bounds with IBP's.  max_memory: cap in bytes on CROWN's working set.
    dtype: float32 (default, float64 for float64 inputs) or float64.
    sound: widen every bound by its rounding budget (``bounds.rounding``), so that it holds for
    the exact network and for the model's own floating-point forward; False gives the
    exact-arithmetic bounds (as auto_LiRPA computes them), which are no certificate.
    differentiable: record for autograd (gradients with respect to the model's parameters);
    otherwise nothing is recorded, whatever the grad mode, and max_memory caps everything. With
    autograd, the tensors CROWN saves for the backward pass count too, and a call that would
    need more than max_memory is refused before it starts. Training uses ``training_bounds``.
    """
    b = _bounds(model, x, eps, method, C, upper, intersect_ibp, max_memory, dtype,
                relu_bounds=False, sound=sound, differentiable=differentiable)
    return b.lower, b.upper


def bound_details(model: nn.Module, x: torch.Tensor, eps, method: str = "crown-ibp",
                  C: torch.Tensor | None = None, *, upper: bool = True,
                  intersect_ibp: bool = False, max_memory: int = DEFAULT_MAX_MEMORY,
                  dtype: torch.dtype | None = None, sound: bool = True,
                  differentiable: bool = False) -> Bounds:
    """Like ``compute_bounds``, also returning the ReLU pre-activation bounds that were used and
    the rounding budget of the outputs.

    ``relu_bounds`` maps each ReLU layer's name (its module path; a module used twice gets a
    ``:2`` suffix) to (lower, upper) of shape (B, *neuron_shape), widened by their rounding
    slack when sound.  ``output_slack``: how far
    rounding can move each output of the computation or of the model's own forward, so how far
    two floating-point forwards may differ: KAPPA * T at the model's output, (1, *output_shape),
    for the sound CROWN methods; otherwise the width of sound IBP's box of the outputs at
    eps = 0, (B, *output_shape).
    """
    return _bounds(model, x, eps, method, C, upper, intersect_ibp, max_memory, dtype,
                   relu_bounds=True, sound=sound, differentiable=differentiable)


def _bounds(model, x, eps, method, C, upper, intersect_ibp, max_memory, dtype, relu_bounds,
            sound, differentiable):
    """bound_details; without relu_bounds, Bounds.relu_bounds is empty, and IBP without
    autograd then maps its boxes through the ReLUs in place (see ibp.walk)."""
    check_method(method)
    x, eps, C, dtype = validated(x, eps, C, dtype, max_memory)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        in_place = method == "ibp" and not relu_bounds and not torch.is_grad_enabled()
        # The weights cannot change during one call: W * M and |W * M| are made once per layer.
        with exact_float(), ops.weight_cache():
            seq, box, (lower, upper_bound), C, budget = ibp_stage(model, x, eps, C, dtype, method,
                                                                  in_place, sound)
            if method != "ibp":
                if torch.is_grad_enabled():
                    _check_autograd_memory(seq, x, C, method, max_memory)
                lower, upper_bound = _crown_output(seq, box, C, lower, upper_bound, upper,
                                                   intersect_ibp, max_memory, method, budget)
        slack = None if budget is None else budget.slack()
        if slack is None and relu_bounds:
            slack = _widened_logit_width(model, x, eps, dtype)
    return Bounds(lower, upper_bound if upper else None,
                  ReluBounds(seq) if relu_bounds else {}, slack)


def _widened_logit_width(model, x, eps, dtype):
    """Sound IBP's output slack: the width of the widened box of the logits at eps = 0. It
    holds the exact logits and any floating-point forward of the network, so two forwards
    (the engine's and the model's own) differ by at most this much."""
    _, _, (lower, upper), _, _ = ibp_stage(model, x, torch.zeros_like(eps), None, dtype, "ibp",
                                           sound=True)
    return upper - lower


def _crown_output(seq, box, C, ibp_lower, ibp_upper, upper, intersect_ibp, max_memory, method,
                  budget):
    """CROWN-IBP's or CROWN's bounds of the output (or of C @ output), widened by the
    budget's slack, intersected with IBP's when asked."""
    if method == "crown":
        crown.intermediate(seq, box, intersect_ibp, max_memory)
    out_shape = seq[-1].out_shape
    spec = C if C is not None else torch.arange(math.prod(out_shape), device=box[0].device)
    lower, upper_bound = crown.bounds(seq, spec, box, True, upper, max_memory,
                                      float64_input=budget is not None)
    if budget is not None:
        slack = budget.slack(C) if C is not None else budget.slack().flatten(1)
        lower = lower - slack
        upper_bound = None if upper_bound is None else upper_bound + slack
    if C is None:
        lower = lower.view(-1, *out_shape)
        upper_bound = None if upper_bound is None else upper_bound.view(-1, *out_shape)
    if intersect_ibp:
        lower = torch.maximum(lower, ibp_lower)
        upper_bound = None if upper_bound is None else torch.minimum(upper_bound, ibp_upper)
    return lower, upper_bound


def _check_autograd_memory(seq, x, C, method, max_memory):
    """Refuse a differentiable CROWN sweep whose saved tensors would exceed max_memory.

    The estimate: every backward step keeps about two (rows x neurons) tensors of the layer it
    crosses for each specification row it sweeps, and CROWN also sweeps one row per neuron of
    every earlier ReLU to bound it."""
    sizes = [math.prod(op.out_shape) for op in seq]
    specs = C.shape[1] if C is not None else sizes[-1]
    rows = x.shape[0] * specs
    if method == "crown":
        rows += x.shape[0] * sum(math.prod(op.out_shape) for op in relu_ops(seq))
    need = 2 * rows * sum(sizes) * x.element_size()
    if need > max_memory:
        raise ValueError(f"differentiable {method} bounds of this batch would keep about "
                         f"{need / 2**30:.2f} GiB for the backward pass, above max_memory="
                         f"{max_memory / 2**30:.2f} GiB: use a smaller batch, raise max_memory, "
                         "or pass differentiable=False")


def training_bounds(model: nn.Module, x: torch.Tensor, eps, C: torch.Tensor, crown_spec=None, *,
                    crown_lower: bool = True, crown_upper: bool = False,
                    max_memory: int = DEFAULT_MAX_MEMORY,
                    dtype: torch.dtype | None = None) -> TrainingBounds:
    """One IBP pass and, optionally, one CROWN-IBP backward sweep sharing it (for training).

    IBP bounds ``C @ logits`` (C folded into the last Linear) and records every ReLU's
    pre-activation bounds.  ``crown_spec`` is None (no CROWN sweep), a tensor (B, S', K), or a
    callable ``(ibp_lower, ibp_upper) -> tensor (B, S', K)`` for specifications built from IBP's
    own output bounds (loss fusion); the sweep then bounds ``crown_spec @ logits`` from the lower
    and/or upper side.  Both results come from one IBP pass, so CROWN-IBP training with IBP's
    bounds mixed in (the beta schedule) pays for IBP once.  Differentiable; argument checks and
    floating-point rules as in ``compute_bounds``.
    """
    if C is None:
        raise ValueError("C must be a specification tensor (B, S, K) or (S, K), got None")
    if crown_spec is not None and not (crown_lower or crown_upper):
        raise ValueError("crown_spec needs crown_lower or crown_upper")
    x, eps, C, dtype = validated(x, eps, C, dtype, max_memory)
    crown_lo = crown_up = None
    with exact_float(), ops.weight_cache():
        method = "ibp" if crown_spec is None else "crown-ibp"
        seq, box, (ibp_lower, ibp_upper), C, _ = ibp_stage(model, x, eps, C, dtype, method)
        if crown_spec is not None:
            spec = crown_spec(ibp_lower, ibp_upper) if callable(crown_spec) else crown_spec
            spec = ibp.expand_spec(_check_spec(spec, x, dtype), x.shape[0], seq[-1].out_shape[0])
            crown_lo, crown_up = crown.bounds(seq, spec, box, crown_lower, crown_upper, max_memory)
        return TrainingBounds(ibp_lower, ibp_upper, crown_lo, crown_up, ReluBounds(seq))


def margin_spec(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """C of shape (B, K-1, K) whose rows are e_y - e_j for every j != y (ascending j)."""
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-d integer tensor of labels, got {y.dtype} "
                         f"{tuple(y.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"y must lie in [0, {num_classes}), got values in "
                         f"[{y.min().item()}, {y.max().item()}]")
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)          # (B, K, K), row j = e_y - e_j
    others = ~eye.bool()[y]                                # (B, K): j != y
    return rows[others].view(y.shape[0], num_classes - 1, num_classes)
