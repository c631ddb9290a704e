"""Channel pruning made physical: a network whose pruned output units (filters, neurons) are
gone, not zero.

``prune(..., structure="channel")`` masks whole output units and zeroes what would keep them
alive (their bias, and the affine map of a batch norm right after them), so a pruned unit
outputs exactly 0. ``shrink`` then removes such units and the inputs of the next layer that
read them: a physically smaller dense network (plain modules) with the same outputs. It takes
sequential networks (nested nn.Sequential) of Normalize, Linear/Conv2d (plain or masked),
BatchNorm1d/2d, ReLU, pooling, Flatten and Identity; a residual network's units feed two paths
and are refused.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import Normalize
from ..nn import MaskedConv2d, MaskedLinear

_AFFINE = (nn.Linear, nn.Conv2d)
_PER_CHANNEL = (nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity, Normalize)


def flat_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of a sequential network, nested Sequentials unrolled; TypeError otherwise."""
    if isinstance(model, nn.Sequential):
        return [layer for child in model for layer in flat_layers(child)]
    if isinstance(model, _AFFINE + _PER_CHANNEL + (nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten)):
        return [model]
    raise TypeError(f"channel pruning needs a sequential network of Linear/Conv2d, BatchNorm, "
                    f"ReLU, pooling and Flatten layers; got a {type(model).__name__}")


def _effective(layer):
    w = layer.weight.detach()
    return w * layer.weight_mask if isinstance(layer, (MaskedLinear, MaskedConv2d)) else w


def _span(layers, index):
    """The layers after layers[index] up to the next affine layer or Flatten: those that act on
    its output units one by one."""
    for layer in layers[index + 1:]:
        if isinstance(layer, _AFFINE + (nn.Flatten,)):
            return
        yield layer


@torch.no_grad()
def silence_units(layers: list[nn.Module], index: int, keep: torch.Tensor) -> None:
    """Make the output units of layers[index] outside keep (a bool per unit) output exactly 0
    up to the next affine layer: their bias, and the affine maps of batch norms on the way,
    set to 0 (ReLU and pooling map 0 to 0)."""
    layer = layers[index]
    if layer.bias is not None:
        layer.bias[~keep] = 0
    for follower in _span(layers, index):
        if isinstance(follower, (nn.BatchNorm1d, nn.BatchNorm2d)) and follower.affine:
            follower.weight[~keep] = 0
            follower.bias[~keep] = 0


def _zero_shift(layer, like: torch.Tensor) -> torch.Tensor:
    """Per unit, whether the per-unit layer maps 0 to 0."""
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        ones = torch.ones_like(like)
        scale = (layer.weight.detach() if layer.affine else ones) / torch.sqrt(
            (layer.running_var if layer.running_var is not None else ones) + layer.eps)
        mean = layer.running_mean if layer.running_mean is not None else torch.zeros_like(like)
        return ((layer.bias.detach() if layer.affine else 0) - mean * scale) == 0
    if isinstance(layer, Normalize):
        return (layer.mean.flatten() == 0).expand_as(like)
    return torch.ones_like(like, dtype=torch.bool)


def _live_units(layers, index) -> torch.Tensor:
    """Output units of layers[index] that are not identically 0 by the next affine layer
    (bool per unit)."""
    layer = layers[index]
    rows = _effective(layer).reshape(layer.weight.shape[0], -1)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(rows.shape[0], dtype=rows.dtype,
                                                                            device=rows.device)
    live = (rows != 0).any(1) | (bias != 0)
    for follower in _span(layers, index):
        live |= ~_zero_shift(follower, bias)
    return live


@torch.no_grad()
def shrink(model: nn.Module, example: torch.Tensor) -> nn.Sequential:
    """The physically smaller network: every output unit that is identically 0 removed, with
    the inputs that read it. example: one input batch (for the shapes at Flatten). The last
    affine layer keeps all its outputs (the classes)."""
    layers = flat_layers(model)
    affine = [i for i, layer in enumerate(layers) if isinstance(layer, _AFFINE)]
    if not affine:
        raise ValueError("the network has no Linear or Conv2d layer to shrink")
    shapes, h = [], example
    for layer in layers:
        shapes.append(tuple(h.shape[1:]))
        h = layer(h)
    out, keep_in = [], None
    for i, layer in enumerate(layers):
        if isinstance(layer, _AFFINE):
            keep_out = (torch.ones(layer.weight.shape[0], dtype=torch.bool, device=layer.weight.device)
                        if i == affine[-1] else _live_units(layers, i))
            out.append(_sliced_affine(layer, keep_in, keep_out))
            keep_in = keep_out
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append(_sliced_norm(layer, keep_in))
        elif isinstance(layer, nn.Flatten):
            if keep_in is not None:
                plane = int(torch.tensor(shapes[i][1:]).prod()) if len(shapes[i]) > 1 else 1
                keep_in = keep_in.repeat_interleave(plane)
            out.append(nn.Flatten(layer.start_dim, layer.end_dim))
        else:
            out.append(layer)
    return nn.Sequential(*out).train(model.training)


def _sliced_affine(layer, keep_in, keep_out):
    w = _effective(layer)[keep_out]
    if keep_in is not None:
        w = w[:, keep_in]
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    else:
        if layer.groups != 1:
            raise TypeError("channel pruning does not shrink grouped convolutions")
        new = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, bias=bias, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if bias:
        new.bias.copy_(layer.bias.detach()[keep_out])
    return new


def _sliced_norm(norm, keep):
    if keep is None:
        return norm
    n = int(keep.sum())
    new = type(norm)(n, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                     device=keep.device)
    if norm.affine:
        new.weight.copy_(norm.weight.detach()[keep])
        new.bias.copy_(norm.bias.detach()[keep])
    if norm.track_running_stats:
        new.running_mean.copy_(norm.running_mean[keep])
        new.running_var.copy_(norm.running_var[keep])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new.to(norm.weight.dtype if norm.affine else norm.running_mean.dtype)
