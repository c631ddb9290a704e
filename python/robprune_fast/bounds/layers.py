"""The layers the bound engine knows, as ops built per call from a model's modules.

Every op knows its interval step (``ibp``), its clean forward (``clean``, used to resolve
training-mode batch norm and to cross-check the model's own forward) and, for CROWN, its
backward step (``backward``). Ops hold one call's shapes and bounds. ``compile.py`` turns
modules into ops; ``ibp.py`` and ``crown.py`` walk them. The affine layers (linear, conv2d)
are in ``affine.py``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import crown_steps as steps


class Op:
    fuses_relu = False          # takes a pending ReLU as the operators' relu_in prologue
    commutes_with_relu = False  # a pending ReLU may pass through unchanged (reshapes)
    mixes = False               # not element-wise: IBP through two of these is no longer exact
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

    def rounding(self, T, h, budget):
        """The rounding budget at the output from T at the input, h >= |input| (see rounding)."""
        raise NotImplementedError

    # For IBP's widening (rounding.Widening): the terms each output of the op sums (0: the op
    # computes nothing that rounds), and the magnitude it adds besides them (a bias), or None.
    terms = 0

    def added_magnitude(self):
        return None


class Scale(Op):
    """Element-wise affine map h * scale + shift (input normalisation, batch norm)."""

    def __init__(self, name, scale=None, shift=None, shift_magnitude=None):
        super().__init__(name)
        self.scale, self.shift = scale, shift
        # What the module's own forward adds besides x * scale, in magnitude: |shift| for
        # (x - mean) / std; batch norm's (x - mean) * s + b rounds on |mean s| + |b|.
        self.shift_magnitude = shift_magnitude

    def ibp(self, c, r, relu_in=False):
        return torch.addcmul(self.shift, c, self.scale), r * self.scale.abs()

    def clean(self, x):
        return x * self.scale + self.shift

    def backward(self, A):
        return steps.backward_scale(A, self.scale, self.shift)

    terms = 4  # x * scale + shift against the module's (x - mean) / std * w + b

    def added_magnitude(self):
        return (self.shift.abs() if self.shift_magnitude is None else self.shift_magnitude).detach()

    def rounding(self, T, h, budget):
        # A few element-wise operations per neuron (CROWN's sum of the shift over all neurons
        # runs in float64, see crown_steps.backward_scale).
        shift = self.shift.abs() if self.shift_magnitude is None else self.shift_magnitude
        g = budget.gamma(8)
        return (T + g * h) * self.scale.detach().abs() + g * shift.detach()


class BatchNorm(Scale):
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
        self.shift_magnitude = ((mean * scale).abs() + bias.abs()).view(view)

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


class Flatten(Op):
    commutes_with_relu = True

    def ibp(self, c, r, relu_in=False):
        return c.flatten(1), r.flatten(1)

    def clean(self, x):
        return x.flatten(1)

    def backward(self, A):
        return A.reshape(*A.shape[:2], *self.in_shape), None

    def rounding(self, T, h, budget):
        return T.flatten(1)


class AvgPool(Op):
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
        pair = nn.modules.utils._pair
        stride = m.kernel_size if m.stride is None else m.stride
        return steps.backward_avg_pool2d(A, self.in_shape, pair(m.kernel_size), pair(stride),
                                         pair(m.padding), m.ceil_mode, m.count_include_pad,
                                         m.divisor_override)

    @property
    def terms(self):
        """A window sums at most kernel_size terms (adaptive pooling: ceil(in / out) + 1 per
        dimension), then divides."""
        m = self.module
        if isinstance(m, nn.AdaptiveAvgPool2d):
            out = nn.modules.utils._pair(m.output_size)
            return math.prod(-(-n // (o or n)) + 1 for n, o in zip(self.in_shape[-2:], out)) + 1
        return math.prod(nn.modules.utils._pair(m.kernel_size)) + 1

    def rounding(self, T, h, budget):
        # The weights are >= 0, so pooling T is the magnitude map.
        return self.module(T + budget.gamma(self.terms + 1) * h)


class MaxPool(Op):
    """Max pooling is monotone: the box maps to [pool(lower), pool(upper)], exactly."""
    supports_crown = False

    def __init__(self, name, module: nn.MaxPool2d):
        super().__init__(name)
        if module.return_indices:
            raise TypeError(f"unsupported layer {name} (MaxPool2d with return_indices=True)")
        self.module = module

    def ibp(self, c, r, relu_in=False):
        lower, upper = self.module(c - r), self.module(c + r)
        return (upper + lower) / 2, (upper - lower) / 2

    def clean(self, x):
        return self.module(x)

    terms = 2  # the box's ends c - r and c + r, and back to (centre, radius)

    def rounding(self, T, h, budget):
        # max moves an error by at most the largest error in the window.
        return self.module(T + budget.gamma(4) * h)


class ReLU(Op):
    """Records its input box; ``lower``/``upper`` are IBP's unless CROWN has replaced them.

    They are formed from the box on first use only: IBP alone never reads them, and forming
    them costs two passes over the layer's largest tensors. With a rounding budget, ``slack``
    (KAPPA * T at the ReLU's input, see rounding) widens them on both sides, so that they hold
    for the exact pre-activations whatever the rounding of the computation that made them.
    """

    def __init__(self, name):
        super().__init__(name)
        self._box = None
        self._bounds = (None, None)
        self.slack = None

    def record(self, c, r):
        self._box, self._bounds = (c, r), None

    def set_bounds(self, lower, upper):
        """Bounds computed elsewhere (CROWN's), already widened by the caller."""
        self._box, self._bounds = None, (lower, upper)

    def _widened(self, lower, upper):
        if self.slack is None:
            return lower, upper
        return lower - self.slack, upper + self.slack

    def bounds(self):
        if self._bounds is None:
            c, r = self._box
            self._bounds = self._widened(c - r, c + r)
        return self._bounds

    @property
    def lower(self):
        return self.bounds()[0]

    @property
    def upper(self):
        return self.bounds()[1]

    def clean(self, x):
        return torch.relu(x)


class Residual(Op):
    """models.PreActBlock: o = relu(bn1(x)); out = conv2(relu(bn2(conv1(o)))) + (x or shortcut(o)).

    IBP bounds the two branches separately and adds the boxes (sound: the interval of a sum lies
    in the sum of the intervals). Its branches are op lists that the walks enter.
    """
    supports_crown = False

    def __init__(self, name, pre, main, shortcut):
        super().__init__(name)
        self.pre, self.main, self.shortcut = pre, main, shortcut

    def children(self):
        return self.pre + self.main + (self.shortcut or [])

    def clean(self, x):
        o = clean_walk(self.pre, x)
        skip = x if self.shortcut is None else clean_walk(self.shortcut, o)
        return clean_walk(self.main, o) + skip


def clean_walk(seq, x):
    """The ops' clean forward, in order."""
    for op in seq:
        x = op.clean(x)
    return x


def relu_ops(seq):
    """Every ReLU op of seq, residual blocks' included, in walk order."""
    for op in seq:
        if isinstance(op, ReLU):
            yield op
        elif isinstance(op, Residual):
            yield from relu_ops(op.children())


def needs_clean(seq):
    """Whether some op needs the clean forward first (batch norm on batch statistics)."""
    return any((isinstance(op, BatchNorm) and op.batch_stats)
               or (isinstance(op, Residual) and needs_clean(op.children())) for op in seq)
