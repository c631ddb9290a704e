"""The layers the bound engine knows, as ops built per call from a model's modules.

Every op knows its interval step (``ibp``), its clean forward (``clean``, used to resolve
training-mode batch norm and to cross-check the model's own forward) and, for CROWN, its
backward step (``backward``). Ops hold one call's shapes and bounds. ``compile.py`` turns
modules into ops; ``ibp.py`` and ``crown.py`` walk them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
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


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


class Affine(Op):
    """A linear or conv2d layer: weight, bias and mask as the module's forward applies them.

    ``path`` (a masked module's: "auto", "dense" or "sparse"; None for any other layer) decides,
    with the mask's density (ops.masked.takes_sparse_path), whether the layer's interval step,
    clean forward and rounding budget run on the compressed weight (ops.sparse), which skips
    the pruned weights. CROWN's steps run dense either way."""
    fuses_relu = mixes = True
    kind = ""  # the op family's name for the crossover table: "linear" or "conv2d"

    def __init__(self, name, weight, bias, mask, dtype, path=None):
        super().__init__(name)
        self.weight, self.bias, self.mask = weight.to(dtype), _cast(bias, dtype), _cast(mask, dtype)
        self.path = path
        self._abs_weight = None
        self._sparse = None

    def effective_weight(self):
        return reference.effective_weight(self.weight, self.mask)

    def abs_weight(self):
        if self._abs_weight is None:
            self._abs_weight = self.effective_weight().detach().abs()
        return self._abs_weight

    def sparse(self, x) -> bool:
        """Whether this call runs the layer on the compressed path (decided at its first box).
        With autograd, "auto" stays dense: the compressed interval steps' backward loses to
        the dense one (benchmarks/pruned_ibp_step.py: a 90%-pruned cnn_large's IBP training
        step ran 0.63x as fast), so the compressed path serves bounds without gradients
        (verification, evaluation) unless a layer's path forces it."""
        if self._sparse is None:
            self._sparse = (self.path is not None
                            and not (self.path == "auto" and torch.is_grad_enabled())
                            and ops.masked.takes_sparse_path(
                                self.path, self.kind, x, self._crossover_shape(x), self.weight,
                                self.mask, self._crossover_geometry()))
        return self._sparse

    def added_magnitude(self):
        if self.bias is None:
            return None
        return self.bias.detach().abs().view((-1,) + (1,) * (len(self.out_shape) - 1))

    def _abs_sparse(self):
        """(index, |kept values|) of the compressed weight."""
        index = ops.sparse.mask_index(self.mask)
        return index, ops.sparse.gather_values(self.weight.detach(), index).abs()

    def _rounding(self, T, h, budget, fan_in, fan_out, product):
        """|W| (T + gamma h) + gamma_b |b|: the forward's and IBP's dot products sum fan_in
        terms (and the bias); CROWN's transposed products sum fan_out, and its bias terms sum
        over every output neuron."""
        g = budget.gamma((max(fan_in, fan_out) if budget.crown else fan_in) + 2)
        out = product(T + g * h)
        if self.bias is None:
            return out
        terms = math.prod(self.out_shape) if budget.crown else 1
        view = (-1,) + (1,) * (len(self.out_shape) - 1)
        return out + budget.gamma(terms + 2) * self.bias.detach().abs().view(view)


class Linear(Affine):
    kind = "linear"

    @property
    def terms(self):
        return self.weight.shape[1] + 1

    def _crossover_shape(self, x):
        return (math.prod(x.shape[:-1]), x.shape[-1])

    def _crossover_geometry(self):
        return ()

    def ibp(self, c, r, relu_in=False):
        if self.sparse(c):
            return ops.sparse.interval_linear(c, r, self.weight, self.bias, self.mask, relu_in)
        return ops.unchecked.interval_linear(c, r, self.weight, self.bias, self.mask, relu_in,
                                             check_radius=False)

    def clean(self, x):
        if self.sparse(x):
            return ops.sparse.linear(x, self.weight, self.bias, self.mask)
        return F.linear(x, self.effective_weight(), self.bias)

    def backward(self, A):
        return steps.backward_linear(A, self.weight, self.bias, self.mask)

    def rounding(self, T, h, budget):
        out_features, in_features = self.weight.shape
        if self.path is not None and self._sparse:
            index, values = self._abs_sparse()
            product = lambda v: ops.sparse.sparse_linear(v, values, None, index)
        else:
            product = lambda v: F.linear(v, self.abs_weight())
        return self._rounding(T, h, budget, in_features, out_features, product)


def conv_padding(module: nn.Conv2d):
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


class Conv(Affine):
    kind = "conv2d"

    @property
    def terms(self):
        return math.prod(self.weight.shape[1:]) + 1

    def __init__(self, name, weight, bias, mask, dtype, module: nn.Conv2d, path=None):
        super().__init__(name, weight, bias, mask, dtype, path)
        self.geometry = dict(stride=module.stride, padding=conv_padding(module),
                             dilation=module.dilation, groups=module.groups)

    def _crossover_shape(self, x):
        return tuple(x.shape)

    def _crossover_geometry(self):
        g = self.geometry
        return tuple(map(list, (g["stride"], g["padding"], g["dilation"]))) + (g["groups"],)

    def _sparse_geometry(self):
        g = self.geometry
        return (list(self.weight.shape[2:]), list(g["stride"]), list(g["padding"]),
                list(g["dilation"]), g["groups"])

    def ibp(self, c, r, relu_in=False):
        g = self.geometry
        if self.sparse(c):
            return ops.sparse.interval_conv2d(c, r, self.weight, self.bias, self.mask, g["stride"],
                                              g["padding"], g["dilation"], g["groups"], relu_in)
        return ops.unchecked.interval_conv2d(c, r, self.weight, self.bias, self.mask, g["stride"],
                                             g["padding"], g["dilation"], g["groups"], relu_in,
                                             check_radius=False)

    def clean(self, x):
        if self.sparse(x):
            g = self.geometry
            return ops.sparse.conv2d(x, self.weight, self.bias, self.mask, list(g["stride"]),
                                     list(g["padding"]), list(g["dilation"]), g["groups"])
        return F.conv2d(x, self.effective_weight(), self.bias, **self.geometry)

    def backward(self, A):
        if A.device.type == "cpu":
            # oneDNN's transposed convolutions run up to 3x faster on channels-last rows than
            # on NCHW ones (BENCHMARKS.md); the steps keep the layout, so A is reordered once,
            # at the last conv, and stays channels-last down to the input.
            A = steps.neurons_last(A)
        return steps.backward_conv2d(A, self.weight, self.bias, self.mask, self.in_shape,
                                     **self.geometry)

    def rounding(self, T, h, budget):
        # Each output sums C_in/groups * taps products; each input of the transposed step
        # (CROWN) gathers at most C_out/groups * taps.
        taps = math.prod(self.weight.shape[2:])
        fan_in, fan_out = self.weight.shape[1] * taps, self.weight.shape[0] // self.geometry["groups"] * taps
        if self.path is not None and self._sparse:
            index, values = self._abs_sparse()
            product = lambda v: ops.sparse.sparse_conv2d(v, values, None, index, *self._sparse_geometry())
        else:
            product = lambda v: F.conv2d(v, self.abs_weight(), None, **self.geometry)
        return self._rounding(T, h, budget, fan_in, fan_out, product)


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
