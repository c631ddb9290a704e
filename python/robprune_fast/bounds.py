"""Sound output bounds of a network over an L-inf ball: IBP, CROWN-IBP and CROWN.

``compute_bounds(model, x, eps, method, C)`` bounds the logits (or ``C @ logits``) for every input in
the L-inf ball of radius ``eps`` around ``x`` intersected with the pixel box [0, 1].  eps is in pixel
space: normalisation is a layer of the model and is bounded like any other layer.

Methods
  ``ibp``        interval bound propagation (Gowal et al. 2018).  Linear and conv layers go through
                 the fused interval operators of ``robprune_fast.ops``; a ReLU is fused into the next
                 linear/conv layer (``relu_in``).
  ``crown-ibp``  IBP for the pre-activation bounds of every ReLU, then one CROWN backward pass from
                 the specification (Zhang et al. 2020).
  ``crown``      CROWN backward passes for every ReLU's pre-activation bounds too (Zhang et al.
                 2018).  ``intersect_ibp=True`` intersects them with IBP's and only bounds the neurons
                 IBP leaves unstable (the others' relaxation is exact either way), which is tighter
                 and much cheaper; the default is plain CROWN.

Layers (walked in order through nested ``nn.Sequential``): Linear and Conv2d (a ``weight_mask``
attribute, torch.nn.utils.prune's convention, is passed to the operators as ``mask``, with
``weight_orig`` as the weight when present), ReLU, BatchNorm1d/2d, Flatten, ``models.Normalize``,
AvgPool2d, AdaptiveAvgPool2d, MaxPool2d (IBP only), Identity, and ``models.PreActBlock`` residual
blocks (IBP only).  Any other layer raises ``TypeError`` naming it.  Batch norm in eval mode is the
affine map of its running statistics; in training mode (as IBP training needs) it is the affine map of
the batch statistics of the clean input ``x``'s activations at that layer (the whole box is normalised
exactly like the clean batch); running statistics are never updated here.

Specification.  With ``C`` of shape (B, S, K) (or (S, K), shared by the batch), the bounds are on the
S rows of ``C @ logits``.  When the last layer is Linear, C is folded into it: IBP then bounds
``(C W) h + C b`` directly, which is tighter than multiplying the logit box by C.

Floating point.  Bounds are computed in float32 (float64 when ``x`` is float64 or ``dtype`` says so)
with autocast off and TF32 off, whatever the caller uses.  Rounding can still move a bound by a few
ulps of the values summed, so a point counts as verified only when every margin lower bound exceeds
``DEFAULT_TOL[dtype]`` (1e-4 in float32, 1e-9 in float64; ``tol`` overrides).

Checks.  x, eps and C are checked once on entry.  The boxes the engine builds from them have
radius >= 0 by construction, so the interval operators skip re-checking it (``check_radius=False``)
except where a ReLU maps a box in place (``ops.relu_box_`` checks in the same pass).  Weights with
NaN or inf give NaN bounds, and a NaN margin bound never certifies a point.

Memory.  CROWN's bound matrices have one row per (input, specification row) and one column per neuron
of the layer reached.  ``max_memory`` (bytes) caps the working set of one backward sweep: inputs and
specification rows are processed in chunks sized to fit.  With autograd recording (training),
tensors saved for the backward pass are not part of the cap.

This module uses the bound steps of ``bound_steps`` and the interval operators of ``ops``; it knows
nothing of training or pruning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import bound_steps as steps
from . import ops
from .models import Normalize, PreActBlock

METHODS = ("ibp", "crown-ibp", "crown")
DEFAULT_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
DEFAULT_MAX_MEMORY = 1 << 30
# ibp_spec shares folded weights between inputs when there are at most 1/this as many distinct
# specifications as inputs (the shared GEMM computes every distinct C's radii for every input).
_DISTINCT_SPEC_FRACTION = 4
# Live (rows x neurons) tensors at the peak of a backward step (both sides, positive and negative
# parts, their scaled copies); used to turn the memory cap into a number of rows.
_LIVE_COPIES = 8


# --------------------------------------------------------------------------------------------------
# Floating-point context


@contextlib.contextmanager
def exact_float():
    """Autocast off and TF32/reduced-precision off for matmul and conv, restored on exit.

    Uses the fp32_precision API only: mixing it with the legacy allow_tf32 flags is an error in
    torch, and restoring the saved values leaves the caller's flags as they were.
    """
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul,
             torch.backends.mkldnn.conv)
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value


# --------------------------------------------------------------------------------------------------
# Boxes


def _relu_box(c, r):
    lower, upper = torch.relu(c - r), torch.relu(c + r)
    return (upper + lower) / 2, (upper - lower) / 2


def _box_from_bounds(lower, upper):
    return (upper + lower) / 2, (upper - lower) / 2


# --------------------------------------------------------------------------------------------------
# The layer walk: every supported module becomes an op that knows its interval step (``ibp``), its
# clean forward (``clean``, only used to resolve training-mode batch norm) and, for affine ops, its
# CROWN step (``backward``).  Ops are built per call and hold that call's shapes and bounds.


class _Op:
    fuses_relu = False      # takes a pending ReLU as the operators' relu_in prologue
    commutes_with_relu = False  # a pending ReLU may pass through unchanged (reshapes)
    mixes = False           # not element-wise: IBP through two of these is no longer exact
    supports_crown = True

    def __init__(self, name: str):
        self.name = name
        # Per-sample input and output shapes, set by the IBP walk.
        self.in_shape: tuple[int, ...] | None = None
        self.out_shape: tuple[int, ...] | None = None

    def ibp(self, c, r, relu_in=False):
        raise NotImplementedError

    def clean(self, x):
        raise NotImplementedError

    def backward(self, A):
        raise NotImplementedError


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


class _Linear(_Op):
    fuses_relu = mixes = True

    def __init__(self, name, module: nn.Linear, dtype):
        super().__init__(name)
        # torch.nn.utils.prune keeps the trainable weight in weight_orig; weight = orig * mask.
        self.weight = getattr(module, "weight_orig", module.weight).to(dtype)
        self.bias = _cast(module.bias, dtype)
        self.mask = _cast(getattr(module, "weight_mask", None), dtype)

    def effective_weight(self):
        return self.weight if self.mask is None else self.weight * self.mask

    def ibp(self, c, r, relu_in=False):
        return ops._interval_linear(c, r, self.weight, self.bias, self.mask, relu_in,
                                    check_radius=False)

    def ibp_spec(self, c, r, C, relu_in):
        """(lower, upper) of C @ (W h + b) with C folded into W; C: (B, S, K).

        The centre is linear, so it is C @ (W c + b) (one GEMM, then a tiny batched product).
        The radius needs the folded weight: |C_b W| r_b, tighter than |C_b| |W| r_b. Inputs
        with the same C share their folded weight, and margin specifications have at most K
        distinct C (one per true class): with few distinct C, the radii of all of them come
        from one GEMM against every input's r and each input picks its own; otherwise each
        input's folded weight is made (a skinny (B S, K) x (K, in) product) and applied in a
        batched product.
        """
        if relu_in:
            c, r = _relu_box(c, r)
        weight = self.effective_weight()
        centre = (C @ F.linear(c, weight, self.bias).unsqueeze(-1)).squeeze(-1)
        batch, specs = C.shape[:2]
        # Grouping costs a few small ops: not worth it where no batch this small could share.
        distinct, which = _distinct_specs(C) if batch >= _DISTINCT_SPEC_FRACTION else (None, None)
        if distinct is not None and distinct.shape[0] * _DISTINCT_SPEC_FRACTION <= batch:
            folded = (distinct @ weight).abs().reshape(-1, weight.shape[1])  # (U S, in)
            every = (r @ folded.t()).view(batch, -1, specs)                   # (B, U, S)
            radius = every.gather(1, which.view(batch, 1, 1).expand(batch, 1, specs)).squeeze(1)
        else:
            radius = ((C @ weight).abs() @ r.unsqueeze(-1)).squeeze(-1)
        return centre - radius, centre + radius

    def clean(self, x):
        return F.linear(x, self.effective_weight(), self.bias)

    def backward(self, A):
        return steps.backward_linear(A, self.weight, self.bias, self.mask)


def _distinct_specs(C):
    """(the distinct specifications (U, S, K), each input's index into them (B,)), or
    (None, None) when grouping fails. Inputs are grouped by a projection of their C (a 1-D
    unique, far cheaper than torch.unique over dim 0), and the grouping is then checked
    exactly, so a collision of projections can never pair an input with another's C."""
    batch = C.shape[0]
    flat = C.reshape(batch, -1)
    weights = torch.linspace(1.0, 2.0, flat.shape[1], dtype=C.dtype, device=C.device)
    keys, which = torch.unique(flat @ weights, return_inverse=True)
    member = torch.empty(keys.shape[0], dtype=torch.long, device=C.device)
    member.scatter_(0, which, torch.arange(batch, device=C.device))
    distinct = C[member]
    if not torch.equal(distinct[which], C):
        return None, None
    return distinct, which


def _conv_padding(module: nn.Conv2d):
    """The module's padding as an int pair; 'same' only where it is symmetric."""
    if module.padding_mode != "zeros":
        raise TypeError(f"unsupported layer {module!r}: padding_mode {module.padding_mode!r} "
                        "(only 'zeros' is a linear map of the input)")
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise TypeError(f"unsupported layer {module!r}: asymmetric 'same' padding")
        return tuple(t // 2 for t in total)
    return module.padding


class _Conv(_Op):
    fuses_relu = mixes = True

    def __init__(self, name, module: nn.Conv2d, dtype):
        super().__init__(name)
        self.weight = getattr(module, "weight_orig", module.weight).to(dtype)
        self.bias = _cast(module.bias, dtype)
        self.mask = _cast(getattr(module, "weight_mask", None), dtype)
        self.geometry = dict(stride=module.stride, padding=_conv_padding(module),
                             dilation=module.dilation, groups=module.groups)

    def ibp(self, c, r, relu_in=False):
        g = self.geometry
        return ops._interval_conv2d(c, r, self.weight, self.bias, self.mask, g["stride"],
                                    g["padding"], g["dilation"], g["groups"], relu_in,
                                    check_radius=False)

    def clean(self, x):
        w = self.weight if self.mask is None else self.weight * self.mask
        return F.conv2d(x, w, self.bias, **self.geometry)

    def backward(self, A):
        if A.device.type == "cpu":
            # oneDNN's transposed convolutions run up to 3x faster on channels-last rows than
            # on NCHW ones (BENCHMARKS.md); the steps keep the layout, so A is reordered once,
            # at the last conv, and stays channels-last down to the input.
            A = steps.neurons_last(A)
        return steps.backward_conv2d(A, self.weight, self.bias, self.mask, self.in_shape,
                                     **self.geometry)


class _Scale(_Op):
    """Element-wise affine map h * scale + shift (input normalisation, batch norm)."""

    def __init__(self, name, scale=None, shift=None):
        super().__init__(name)
        self.scale, self.shift = scale, shift

    def ibp(self, c, r, relu_in=False):
        return torch.addcmul(self.shift, c, self.scale), r * self.scale.abs()

    def clean(self, x):
        return x * self.scale + self.shift

    def backward(self, A):
        return steps.backward_scale(A, self.scale, self.shift)


class _BatchNorm(_Scale):
    def __init__(self, name, module: nn.modules.batchnorm._BatchNorm, dtype):
        super().__init__(name)
        self.module, self.dtype = module, dtype
        # The same rule as F.batch_norm: batch statistics in training mode or without running ones.
        self.batch_stats = module.training or module.running_mean is None

    def _set_affine(self, mean, var, ndim):
        m = self.module
        weight = torch.ones_like(var) if m.weight is None else m.weight.to(self.dtype)
        bias = torch.zeros_like(var) if m.bias is None else m.bias.to(self.dtype)
        scale = weight / torch.sqrt(var + m.eps)
        view = (-1,) + (1,) * (ndim - 2)  # channel dim 1 of the batched input
        self.scale, self.shift = scale.view(view), (bias - mean * scale).view(view)

    def _use_running_stats(self, ndim):
        m = self.module
        self._set_affine(m.running_mean.to(self.dtype), m.running_var.to(self.dtype), ndim)

    def clean(self, x):
        if self.batch_stats:
            dims = [0] + list(range(2, x.ndim))
            self._set_affine(x.mean(dims), x.var(dims, unbiased=False), x.ndim)
        else:
            self._use_running_stats(x.ndim)
        return super().clean(x)

    def ibp(self, c, r, relu_in=False):
        if not self.batch_stats:
            self._use_running_stats(c.ndim)
        elif self.scale is None:
            raise RuntimeError(f"{self.name}: batch statistics were not resolved")
        return super().ibp(c, r)


class _Flatten(_Op):
    commutes_with_relu = True

    def ibp(self, c, r, relu_in=False):
        return c.flatten(1), r.flatten(1)

    def clean(self, x):
        return x.flatten(1)

    def backward(self, A):
        return A.reshape(*A.shape[:2], *self.in_shape), None


class _AvgPool(_Op):
    """Average pooling: linear with non-negative weights, so IBP is (pool(c), pool(r)), exact."""
    mixes = True

    def __init__(self, name, module):
        super().__init__(name)
        self.module = module

    def ibp(self, c, r, relu_in=False):
        return self.module(c), self.module(r)

    def clean(self, x):
        return self.module(x)

    def backward(self, A):
        m = self.module
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return steps.backward_adaptive_avg_pool2d(A, self.in_shape)
        stride = m.kernel_size if m.stride is None else m.stride
        return steps.backward_avg_pool2d(A, self.in_shape, _pair(m.kernel_size), _pair(stride),
                                         _pair(m.padding), m.ceil_mode, m.count_include_pad,
                                         m.divisor_override)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _MaxPool(_Op):
    """Max pooling is monotone: the box maps to [pool(lower), pool(upper)], exactly."""
    supports_crown = False

    def __init__(self, name, module: nn.MaxPool2d):
        super().__init__(name)
        if module.return_indices:
            raise TypeError(f"unsupported layer {name} (MaxPool2d with return_indices=True)")
        self.module = module

    def ibp(self, c, r, relu_in=False):
        return _box_from_bounds(self.module(c - r), self.module(c + r))

    def clean(self, x):
        return self.module(x)


class _ReLU(_Op):
    """Records its input box; ``lower``/``upper`` are IBP's unless CROWN has replaced them.

    They are formed from the box on first use only: IBP alone never reads them, and forming
    them costs two passes over the layer's largest tensors.
    """

    def __init__(self, name):
        super().__init__(name)
        self._box = None
        self._bounds = (None, None)

    def record(self, c, r):
        self._box, self._bounds = (c, r), None

    def set_bounds(self, lower, upper):
        self._box, self._bounds = None, (lower, upper)

    def bounds(self):
        if self._bounds is None:
            c, r = self._box
            self._bounds = (c - r, c + r)
        return self._bounds

    @property
    def lower(self):
        return self.bounds()[0]

    @property
    def upper(self):
        return self.bounds()[1]

    def clean(self, x):
        return torch.relu(x)


class _Residual(_Op):
    """models.PreActBlock: o = relu(bn1(x)); out = conv2(relu(bn2(conv1(o)))) + (x or shortcut(o)).

    IBP bounds the two branches separately and adds the boxes (sound: the interval of a sum lies
    in the sum of the intervals).
    """
    supports_crown = False

    def __init__(self, name, block: PreActBlock, dtype):
        super().__init__(name)
        self.pre = [_BatchNorm(f"{name}.bn1", block.bn1, dtype), _ReLU(f"{name}.relu(bn1)")]
        self.main = [_Conv(f"{name}.conv1", block.conv1, dtype),
                     _BatchNorm(f"{name}.bn2", block.bn2, dtype), _ReLU(f"{name}.relu(bn2)"),
                     _Conv(f"{name}.conv2", block.conv2, dtype)]
        self.shortcut = (None if block.shortcut is None
                         else [_Conv(f"{name}.shortcut", block.shortcut, dtype)])

    def children(self):
        return self.pre + self.main + (self.shortcut or [])

    def ibp(self, c, r, relu_in=False):
        oc, orad = _ibp_walk(self.pre, c, r)
        mc, mr = _ibp_walk(self.main, oc, orad)
        sc, sr = (c, r) if self.shortcut is None else _ibp_walk(self.shortcut, oc, orad)
        return mc + sc, mr + sr

    def clean(self, x):
        o = _clean_walk(self.pre, x)
        skip = x if self.shortcut is None else _clean_walk(self.shortcut, o)
        return _clean_walk(self.main, o) + skip


def _compile(module: nn.Module, name: str, dtype) -> list[_Op]:
    """The flat list of ops that ``module`` runs, nested Sequentials unrolled."""
    if isinstance(module, nn.Sequential):
        # _modules, not named_children(): a module instance used twice runs twice.
        return [op for child_name, child in module._modules.items()
                for op in _compile(child, f"{name}.{child_name}" if name else child_name, dtype)]
    label = name or type(module).__name__
    if isinstance(module, nn.Linear):
        return [_Linear(label, module, dtype)]
    if isinstance(module, nn.Conv2d):
        return [_Conv(label, module, dtype)]
    if isinstance(module, nn.ReLU):
        return [_ReLU(label)]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return [_BatchNorm(label, module, dtype)]
    if isinstance(module, Normalize):
        std = module.std.to(dtype)
        return [_Scale(label, 1 / std, -module.mean.to(dtype) / std)]
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise TypeError(f"unsupported layer {label} (Flatten must keep the batch dim and "
                            f"flatten the rest, got start_dim={module.start_dim}, "
                            f"end_dim={module.end_dim})")
        return [_Flatten(label)]
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return [_AvgPool(label, module)]
    if isinstance(module, nn.MaxPool2d):
        return [_MaxPool(label, module)]
    if isinstance(module, nn.Identity):
        return []
    if isinstance(module, PreActBlock):
        return [_Residual(label, module, dtype)]
    raise TypeError(f"unsupported layer {label} ({type(module).__name__}); supported: Linear, "
                    "Conv2d, ReLU, BatchNorm1d/2d, Flatten, Normalize, AvgPool2d, "
                    "AdaptiveAvgPool2d, MaxPool2d, Identity, PreActBlock, nn.Sequential")


def _relu_ops(seq):
    for op in seq:
        if isinstance(op, _ReLU):
            yield op
        elif isinstance(op, _Residual):
            yield from _relu_ops(op.children())


def _needs_clean(seq):
    return any((isinstance(op, _BatchNorm) and op.batch_stats)
               or (isinstance(op, _Residual) and _needs_clean(op.children())) for op in seq)


def _clean_walk(seq, x):
    for op in seq:
        x = op.clean(x)
    return x


# --------------------------------------------------------------------------------------------------
# IBP


def _ibp_walk(seq, c, r, keep_pending=False, in_place=False):
    """Push the box (c, r) through seq.  A ReLU is held back ("pending") until the next op, so that
    a linear/conv layer can apply it in its relu_in prologue.  Returns (c, r) or, with
    ``keep_pending``, (c, r, pending) leaving a final pending ReLU to the caller.

    ``in_place``: nobody reads a ReLU's pre-activation box (no ReLU bounds wanted, no autograd)
    and the walk owns every box it makes, so a ReLU maps the box where it lies (ops._relu_box_)
    and records nothing: no prologue copies, and on the CPU none of their page faults.
    """
    pending = False
    for op in seq:
        op.in_shape = tuple(c.shape[1:])
        if isinstance(op, _ReLU) and in_place:
            c, r = ops._relu_box_(c, r) if c.stride() == r.stride() else _relu_box(c, r)
        elif isinstance(op, _ReLU):
            if pending:  # ReLU after ReLU: record the true (non-negative) input box
                c, r = _relu_box(c, r)
            op.record(c, r)
            pending = True
        elif pending and op.fuses_relu:
            c, r = op.ibp(c, r, relu_in=True)
            pending = False
        else:
            if pending and not op.commutes_with_relu:
                c, r = _relu_box(c, r)
                pending = False
            c, r = op.ibp(c, r)
        op.out_shape = tuple(c.shape[1:])
    if keep_pending:
        return c, r, pending
    return _relu_box(c, r) if pending else (c, r)


def _ibp_output(seq, c, r, C, in_place=False):
    """IBP ((lower, upper), C) of the output, or of C @ output with C folded into a final Linear;
    C comes back checked and expanded to (B, S, K). in_place: as in _ibp_walk."""
    if C is not None and seq and isinstance(seq[-1], _Linear):
        c, r, pending = _ibp_walk(seq[:-1], c, r, keep_pending=True, in_place=in_place)
        last = seq[-1]
        last.in_shape = tuple(c.shape[1:])
        C = _expand_spec(C, c.shape[0], last.weight.shape[0])
        last.out_shape = (last.weight.shape[0],)
        return last.ibp_spec(c, r, C, relu_in=pending), C
    c, r = _ibp_walk(seq, c, r, in_place=in_place)
    if C is not None:
        if c.dim() != 2:
            raise ValueError(f"C needs a model with flat outputs (B, K), got outputs of shape "
                             f"{tuple(c.shape)}")
        C = _expand_spec(C, c.shape[0], c.shape[1])
        c, r = (C @ c.unsqueeze(-1)).squeeze(-1), (C.abs() @ r.unsqueeze(-1)).squeeze(-1)
    return (c - r, c + r), C


def _expand_spec(C, batch, num_outputs):
    """C as (B, S, K), checked against the batch size B and the number of outputs K."""
    if C.dim() == 2:
        C = C.unsqueeze(0).expand(batch, -1, -1)
    if C.dim() != 3 or C.shape[0] != batch or C.shape[2] != num_outputs or C.shape[1] < 1:
        raise ValueError(f"C must have shape (B, S, K) or (S, K) with B={batch} inputs and "
                         f"K={num_outputs} outputs, got {tuple(C.shape)}")
    return C


# --------------------------------------------------------------------------------------------------
# CROWN


def _add(acc, term):
    return acc if term is None else acc + term


def _sweep(seq, A_lower, A_upper, batch):
    """Walk the bound matrices back from the output of seq to its input.

    ``batch`` selects the inputs the rows belong to (for the ReLUs' pre-activation bounds).
    Returns (A_lower, bias_lower, A_upper, bias_upper) at the input; a side given as None stays None.
    """
    bias_lower = bias_upper = 0
    for op in reversed(seq):
        if isinstance(op, _ReLU):
            A_lower, dl, A_upper, du = steps.backward_relu(A_lower, A_upper, op.lower[batch],
                                                           op.upper[batch])
        else:
            A_lower, dl = op.backward(A_lower) if A_lower is not None else (None, None)
            A_upper, du = op.backward(A_upper) if A_upper is not None else (None, None)
        bias_lower, bias_upper = _add(bias_lower, dl), _add(bias_upper, du)
    return A_lower, bias_lower, A_upper, bias_upper


def _chunk_sizes(batch, specs, row_numel, elem_size, max_memory):
    """(inputs per chunk, specification rows per chunk) for a working set under max_memory."""
    rows = max(1, max_memory // (_LIVE_COPIES * row_numel * elem_size))
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


def _crown(seq, spec, box, lower, upper, max_memory):
    """CROWN bounds of spec @ (output of seq) over the input box (c0, r0).

    spec is either a tensor (B, S, *out_shape) of specification rows or a 1-d tensor of flat output
    neuron indices (identity rows, shared by the batch).  Returns (lower, upper), each (B, S) or
    None for a side not asked for.
    """
    c0, r0 = box
    num_inputs = c0.shape[0]
    neuron_rows = spec.dim() == 1
    num_specs = spec.shape[0] if neuron_rows else spec.shape[1]
    widest = max(math.prod(s) for op in seq for s in (op.in_shape, op.out_shape))
    per_batch, per_spec = _chunk_sizes(num_inputs, num_specs, widest, c0.element_size(),
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
            Al, bl, Au, bu = _sweep(seq, A if lower else None, A if upper else None, batch)
            if lower:
                lo_parts.append(steps.concretize(Al, bl, c0[batch], r0[batch], upper=False))
            if upper:
                up_parts.append(steps.concretize(Au, bu, c0[batch], r0[batch], upper=True))
        lows.append(torch.cat(lo_parts, 1) if lower else None)
        ups.append(torch.cat(up_parts, 1) if upper else None)
    return (torch.cat(lows) if lower else None), (torch.cat(ups) if upper else None)


def _crown_relu_bounds(prefix, relu, box, intersect_ibp, max_memory):
    """Replace the IBP pre-activation bounds of ``relu`` (fed by ``prefix``) with CROWN's."""
    ibp_lower, ibp_upper = relu.lower.flatten(1), relu.upper.flatten(1)
    if intersect_ibp:
        # Neurons IBP proves stable keep IBP's bounds: their relaxation is exact either way.
        neurons = ((ibp_lower < 0) & (ibp_upper > 0)).any(0).nonzero().squeeze(1)
        if neurons.numel() == 0:
            return
    else:
        neurons = torch.arange(ibp_lower.shape[1], device=ibp_lower.device)
    lower, upper = _crown(prefix, neurons, box, True, True, max_memory)
    if intersect_ibp:
        lower = ibp_lower.index_copy(1, neurons, torch.maximum(lower, ibp_lower[:, neurons]))
        upper = ibp_upper.index_copy(1, neurons, torch.minimum(upper, ibp_upper[:, neurons]))
    relu.set_bounds(lower.view_as(relu.lower), upper.view_as(relu.upper))


def _crown_intermediate(seq, box, intersect_ibp, max_memory):
    """CROWN pre-activation bounds for every ReLU, first to last (each pass uses the earlier ones).

    Before the first ReLU, IBP is already exact when at most one mixing layer (linear, conv, pool)
    lies between the input and the ReLU: IBP of one affine map of a box is the exact range of each
    output, and element-wise affine maps send boxes to boxes.  Those bounds are kept as they are.
    """
    seen_relu, mixing = False, 0
    for i, op in enumerate(seq):
        if isinstance(op, _ReLU):
            if seen_relu or mixing > 1:
                _crown_relu_bounds(seq[:i], op, box, intersect_ibp, max_memory)
            seen_relu = True
        mixing += op.mixes


# --------------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass
class Bounds:
    """Output bounds and the pre-activation bounds of every ReLU layer that were used."""
    lower: torch.Tensor
    upper: torch.Tensor | None
    relu_bounds: Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_input(x, eps, dtype, values=True):
    """x as dtype, eps as a non-negative tensor broadcastable to x. values: check that x lies
    in [0, 1] here; callers that pass x through _input_box leave it to that (one pass less)."""
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.dim() < 2:
        raise ValueError("x must be a floating-point tensor of shape (B, ...), got "
                         f"{type(x).__name__} {getattr(x, 'shape', '')}")
    if values:
        _check_values(x)
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
    return x.to(dtype), eps


def _check_values(x):
    low, high = torch.aminmax(x) if x.numel() else (None, None)
    if x.numel() and not (low >= 0 and high <= 1):  # written so NaN fails too
        raise ValueError(f"x must lie in [0, 1], got values in [{low.item():g}, {high.item():g}]")


def _input_box(x, eps, scale=None, shift=None):
    """ops._input_box, whose kernel checks x's values in the pass it makes anyway; its error
    becomes _check_values's, which names the values found."""
    try:
        return ops._input_box(x, eps, scale, shift)
    except (RuntimeError, ValueError):
        _check_values(x)
        raise


def _compute_dtype(x, dtype):
    if dtype is None:
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _check_spec(C, x, dtype):
    if C is None:
        return None
    if not torch.is_tensor(C) or C.dim() not in (2, 3):
        raise ValueError("C must be a tensor of shape (B, S, K) or (S, K), got "
                         f"{getattr(C, 'shape', type(C).__name__)}")
    return C.to(device=x.device, dtype=dtype)


def _ibp_stage(model, x, eps, C, dtype, method, in_place=False):
    """Compile the model and run IBP over the input box: every ReLU records its pre-activation
    bounds (none with in_place, see _ibp_walk; only IBP may pass it: CROWN reads the records and
    its input box).  Returns (ops, input box, (lower, upper) of the
    output or of C @ output, C as (B, S, K)).  Must run inside ``exact_float``."""
    seq = _compile(model, "", dtype)
    if method != "ibp":
        for op in seq:
            if not op.supports_crown:
                raise NotImplementedError(f"method {method!r} does not support layer {op.name}"
                                          f"; use method='ibp'")
    if _needs_clean(seq):
        _clean_walk(seq, x)
    # CROWN concretises over the input box in pixel space; IBP starts from it pushed through
    # the model's input normalisation, which ops.input_box folds into the same pass over x.
    box = None if method == "ibp" else _input_box(x, eps)
    scale, shift = _input_normalisation(seq, x)
    if scale is not None:
        seq[0].in_shape = seq[0].out_shape = tuple(x.shape[1:])
        out, C = _ibp_output(seq[1:], *_input_box(x, eps, scale, shift), C, in_place)
    else:
        out, C = _ibp_output(seq, *(box if box is not None else _input_box(x, eps)), C,
                             in_place)
    return seq, box, out, C


def _input_normalisation(seq, x):
    """(scale, shift) of shape (C,) when seq starts with a per-channel input normalisation
    (models.Normalize) that ops.input_box can fold in, else (None, None)."""
    first = seq[0] if seq else None
    if type(first) is not _Scale or x.dim() < 2:
        return None, None
    channels = x.shape[1]
    scale, shift = first.scale.reshape(-1), first.shift.reshape(-1)
    if scale.numel() == 1:
        scale, shift = scale.expand(channels), shift.expand(channels)
    if scale.numel() != channels or first.scale.shape[1:] != (1,) * (x.dim() - 2):
        return None, None
    return scale.contiguous(), shift.contiguous()


class _ReluBounds(Mapping):
    """ReLU name -> (lower, upper) of its pre-activation; a module run twice gets a ':2' suffix.
    Read-only, and lazy: a ReLU's bounds are formed when first looked up."""

    def __init__(self, seq):
        self._ops = {}
        for op in _relu_ops(seq):
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


def bound_details(model: nn.Module, x: torch.Tensor, eps, method: str = "crown-ibp",
                  C: torch.Tensor | None = None, *, upper: bool = True,
                  intersect_ibp: bool = False, max_memory: int = DEFAULT_MAX_MEMORY,
                  dtype: torch.dtype | None = None) -> Bounds:
    """Like ``compute_bounds``, also returning the ReLU pre-activation bounds that were used.

    ``relu_bounds`` maps each ReLU layer's name (its module path; a module used twice gets a
    ``:2`` suffix) to (lower, upper) of shape (B, *neuron_shape).
    """
    return _bounds(model, x, eps, method, C, upper, intersect_ibp, max_memory, dtype,
                   relu_bounds=True)


def _bounds(model, x, eps, method, C, upper, intersect_ibp, max_memory, dtype, relu_bounds):
    """bound_details; without relu_bounds, Bounds.relu_bounds is empty, and IBP without
    autograd then maps its boxes through the ReLUs in place (see _ibp_walk)."""
    _check_method(method)
    if not (isinstance(max_memory, int) and max_memory > 0):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    dtype = _compute_dtype(x, dtype)
    x, eps = _check_input(x, eps, dtype, values=False)  # _ibp_stage's _input_box checks them
    C = _check_spec(C, x, dtype)
    in_place = method == "ibp" and not relu_bounds and not torch.is_grad_enabled()
    with exact_float(), ops.weight_cache():
        seq, box, (lower, upper_bound), C = _ibp_stage(model, x, eps, C, dtype, method, in_place)
        if method != "ibp":
            if method == "crown":
                _crown_intermediate(seq, box, intersect_ibp, max_memory)
            out_shape = seq[-1].out_shape
            spec = C if C is not None else torch.arange(math.prod(out_shape), device=x.device)
            ibp_lower, ibp_upper = lower, upper_bound
            lower, upper_bound = _crown(seq, spec, box, True, upper, max_memory)
            if C is None:
                lower = lower.view(-1, *out_shape)
                upper_bound = None if upper_bound is None else upper_bound.view(-1, *out_shape)
            if intersect_ibp:
                lower = torch.maximum(lower, ibp_lower)
                upper_bound = None if upper_bound is None else torch.minimum(upper_bound, ibp_upper)
    return Bounds(lower, upper_bound if upper else None, _ReluBounds(seq) if relu_bounds else {})


def compute_bounds(model: nn.Module, x: torch.Tensor, eps, method: str = "crown-ibp",
                   C: torch.Tensor | None = None, *, upper: bool = True,
                   intersect_ibp: bool = False, max_memory: int = DEFAULT_MAX_MEMORY,
                   dtype: torch.dtype | None = None):
    """Sound (lower, upper) bounds of ``model(x')`` (or ``C @ model(x')``) for every x' with
    ``|x' - x|_inf <= eps`` and ``0 <= x' <= 1``.

    model: an nn.Sequential (or single layer) of the supported layers, see the module docstring.
    x: (B, ...) in [0, 1].  eps: >= 0, a number or a tensor broadcastable to x (pixel space).
    method: "ibp", "crown-ibp" or "crown".  C: (B, S, K) or (S, K) specification; the bounds then
    have shape (B, S), else the output's shape.  upper=False skips the upper bound (returned as
    None), which halves CROWN's work.  intersect_ibp: see the module docstring; it also intersects
    the final bounds with IBP's.  max_memory: cap in bytes on CROWN's working set.  dtype: float32
    (default, float64 for float64 inputs) or float64.  Differentiable with respect to the model's
    parameters (for IBP / CROWN-IBP training).
    """
    b = _bounds(model, x, eps, method, C, upper, intersect_ibp, max_memory, dtype,
                relu_bounds=False)
    return b.lower, b.upper


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
    if not (isinstance(max_memory, int) and max_memory > 0):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    if crown_spec is not None and not (crown_lower or crown_upper):
        raise ValueError("crown_spec needs crown_lower or crown_upper")
    dtype = _compute_dtype(x, dtype)
    x, eps = _check_input(x, eps, dtype, values=False)  # _ibp_stage's _input_box checks them
    C = _check_spec(C, x, dtype)
    crown_lo = crown_up = None
    with exact_float(), ops.weight_cache():
        method = "ibp" if crown_spec is None else "crown-ibp"
        seq, box, (ibp_lower, ibp_upper), C = _ibp_stage(model, x, eps, C, dtype, method)
        if crown_spec is not None:
            spec = crown_spec(ibp_lower, ibp_upper) if callable(crown_spec) else crown_spec
            spec = _expand_spec(_check_spec(spec, x, dtype), x.shape[0], seq[-1].out_shape[0])
            crown_lo, crown_up = _crown(seq, spec, box, crown_lower, crown_upper, max_memory)
        return TrainingBounds(ibp_lower, ibp_upper, crown_lo, crown_up, _ReluBounds(seq))


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


@dataclasses.dataclass
class Verification:
    """Per-point results of ``verified_accuracy``.

    correct: (N,) clean prediction equals the label.  verified: (N,) correct and every margin lower
    bound > tol.  margin_lower: (N, K-1) lower bounds of y - j.  unstable: per ReLU layer, the number
    of unstable neurons (pre-activation interval containing 0 in its interior) summed over the N
    points; neurons: per ReLU layer, the neurons per point.
    """
    correct: torch.Tensor
    verified: torch.Tensor
    margin_lower: torch.Tensor
    unstable: dict[str, int]
    neurons: dict[str, int]

    @property
    def clean_accuracy(self) -> float:
        return self.correct.float().mean().item()

    @property
    def verified_accuracy(self) -> float:
        return self.verified.float().mean().item()


def verified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps,
                      method: str = "crown-ibp", *, tol: float | None = None,
                      batch_size: int = 256, **bound_kwargs) -> Verification:
    """Verify every point of (x, y) at radius eps with ``method``; returns a ``Verification``.

    The model runs in eval mode (restored afterwards), without gradients, in exact float32 (or
    float64 with dtype=torch.float64).  tol defaults to DEFAULT_TOL of that dtype.  bound_kwargs go
    to ``bound_details`` (intersect_ibp, max_memory, dtype).
    """
    _check_method(method)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtype = _compute_dtype(x, bound_kwargs.get("dtype"))
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    was_training = model.training
    model.eval()
    correct, margins, unstable, neurons = [], [], {}, {}
    try:
        # Weights are fixed while verifying: the interval ops make W * M and |W * M| once for
        # all batches (the cache is dropped when this scope ends).
        with torch.no_grad(), exact_float(), ops.weight_cache():
            seq = _compile(model, "", dtype)
            for b0 in range(0, x.shape[0], batch_size):
                xb, yb = x[b0:b0 + batch_size], y[b0:b0 + batch_size].to(x.device)
                logits = _clean_walk(seq, _check_input(xb, 0, dtype)[0])
                correct.append(logits.argmax(1) == yb)
                spec = margin_spec(yb, logits.shape[1], dtype)
                bounds = bound_details(model, xb, eps, method, spec, upper=False,
                                       **bound_kwargs)
                margins.append(bounds.lower)
                for name, (lo, up) in bounds.relu_bounds.items():
                    unstable[name] = unstable.get(name, 0) + int(((lo < 0) & (up > 0)).sum())
                    neurons[name] = lo[0].numel()
    finally:
        model.train(was_training)
    correct, margins = torch.cat(correct), torch.cat(margins)
    verified = correct & (margins > tol).all(1)
    return Verification(correct, verified, margins, unstable, neurons)
