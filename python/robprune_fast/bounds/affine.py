"""The affine layers the bound engine knows: linear and conv2d, with the weight, bias and mask
their module's forward applies (``layers.Op`` says what every op does)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from . import crown_steps as steps
from .layers import Op


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


class Affine(Op):
    """A linear or conv2d layer: weight, bias and mask as the module's forward applies them.

    ``path`` (a masked module's: "auto", "dense" or "sparse"; None for any other layer) decides,
    with the mask's density (ops.masked.takes_sparse_path), whether the layer's interval step,
    clean forward and rounding budget run on the compressed weight (ops.sparse), which skips
    the pruned weights. CROWN's steps run dense either way.

    A compressed layer (nn.CompressedLinear / CompressedConv2d) gives ``kept`` (values, index),
    its kept weights being the parameter, and ``weight`` and ``mask`` as callables making their
    dense views: the compressed path uses the kept values as they are, and the dense views are
    made only where something asks for them (CROWN's steps, a spec folded into the last layer),
    since making them costs more than an IBP step of the layer."""
    fuses_relu = mixes = True
    kind = ""  # the op family's name for the crossover table: "linear" or "conv2d"

    def __init__(self, name, weight, bias, mask, dtype, path=None, kept=None, shape=None):
        super().__init__(name)
        self.bias = _cast(bias, dtype)
        # Tensors, or (a compressed layer) callables making the dense views on first use.
        self._weight = (lambda: weight().to(dtype)) if callable(weight) else weight.to(dtype)
        self._mask = (lambda: _cast(mask(), dtype)) if callable(mask) else _cast(mask, dtype)
        self.shape = tuple(weight.shape if shape is None else shape)  # the weight's
        self.path = path
        self.kept = None if kept is None else (kept[0].to(dtype), kept[1])
        self._abs_weight = None
        self._sparse = None

    @property
    def weight(self):
        if callable(self._weight):
            self._weight = self._weight()
        return self._weight

    @property
    def mask(self):
        if callable(self._mask):
            self._mask = self._mask()
        return self._mask

    def effective_weight(self):
        return reference.effective_weight(self.weight, self.mask)

    def abs_weight(self):
        if self._abs_weight is None:
            self._abs_weight = self.effective_weight().detach().abs()
        return self._abs_weight

    def sparse(self, x) -> bool:
        """Whether this call runs the layer on the compressed path (decided at its first box),
        with autograd (a certified training step) or without (verification): "auto" takes it
        below the layer's measured crossover density (ops.sparse.crossover, timed forward +
        backward), where a 90%-pruned cnn_large's IBP training step runs about 1.9x as fast as
        the dense one (benchmarks/pruned_ibp_step.py)."""
        if self._sparse is None:
            # A compressed layer always: its values are what trains (and its forward takes it).
            self._sparse = self.kept is not None or (
                self.path is not None
                and ops.masked.takes_sparse_path(self.path, self.kind, x, self._crossover_shape(x), self.weight,
                                                 self.mask, self._crossover_geometry()))
        return self._sparse

    def added_magnitude(self):
        if self.bias is None:
            return None
        return self.bias.detach().abs().view((-1,) + (1,) * (len(self.out_shape) - 1))

    def _abs_sparse(self):
        """(index, |kept values|) of the compressed weight."""
        if self.kept is not None:
            return self.kept[1], self.kept[0].detach().abs()
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
        return self.shape[1] + 1

    def _crossover_shape(self, x):
        return (math.prod(x.shape[:-1]), x.shape[-1])

    def _crossover_geometry(self):
        return ()

    def ibp(self, c, r, relu_in=False):
        if self.sparse(c):
            if self.kept is not None:
                values, index = self.kept
                return ops.sparse.sparse_interval_linear(c, r, ops.sparse.kept_values(values), self.bias, index,
                                                         relu_in, False)
            return ops.sparse.interval_linear(c, r, self.weight, self.bias, self.mask, relu_in)
        return ops.unchecked.interval_linear(c, r, self.weight, self.bias, self.mask, relu_in,
                                             check_radius=False)

    def clean(self, x):
        if self.sparse(x):
            if self.kept is not None:
                return ops.sparse.linear(x, None, self.bias, None, kept=self.kept)
            return ops.sparse.linear(x, self.weight, self.bias, self.mask)
        return F.linear(x, self.effective_weight(), self.bias)

    def backward(self, A):
        return steps.backward_linear(A, self.weight, self.bias, self.mask)

    def rounding(self, T, h, budget):
        out_features, in_features = self.shape
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
        return math.prod(self.shape[1:]) + 1

    def __init__(self, name, weight, bias, mask, dtype, module: nn.Conv2d, path=None, kept=None, shape=None):
        super().__init__(name, weight, bias, mask, dtype, path, kept, shape)
        self.geometry = dict(stride=module.stride, padding=conv_padding(module),
                             dilation=module.dilation, groups=module.groups)

    def _crossover_shape(self, x):
        return tuple(x.shape)

    def _crossover_geometry(self):
        g = self.geometry
        return tuple(map(list, (g["stride"], g["padding"], g["dilation"]))) + (g["groups"],)

    def _sparse_geometry(self):
        g = self.geometry
        return (list(self.shape[2:]), list(g["stride"]), list(g["padding"]),
                list(g["dilation"]), g["groups"])

    def ibp(self, c, r, relu_in=False):
        g = self.geometry
        if self.sparse(c):
            if self.kept is not None:
                values, index = self.kept
                return ops.sparse.sparse_interval_conv2d(c, r, ops.sparse.kept_values(values), self.bias, index,
                                                         *self._sparse_geometry(), relu_in, False)
            return ops.sparse.interval_conv2d(c, r, self.weight, self.bias, self.mask, g["stride"],
                                              g["padding"], g["dilation"], g["groups"], relu_in)
        return ops.unchecked.interval_conv2d(c, r, self.weight, self.bias, self.mask, g["stride"],
                                             g["padding"], g["dilation"], g["groups"], relu_in,
                                             check_radius=False)

    def clean(self, x):
        if self.sparse(x):
            if self.kept is not None:
                values, index = self.kept
                return ops.sparse.sparse_conv2d(x, ops.sparse.kept_values(values), self.bias, index,
                                                *self._sparse_geometry())
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
        taps = math.prod(self.shape[2:])
        fan_in, fan_out = self.shape[1] * taps, self.shape[0] // self.geometry["groups"] * taps
        if self.path is not None and self._sparse:
            index, values = self._abs_sparse()
            product = lambda v: ops.sparse.sparse_conv2d(v, values, None, index, *self._sparse_geometry())
        else:
            product = lambda v: F.conv2d(v, self.abs_weight(), None, **self.geometry)
        return self._rounding(T, h, budget, fan_in, fan_out, product)
