"""Importance scores of a masked layer's weights: the larger, the more worth keeping.

Magnitude and random scores know nothing of the training objective (the pruning step stays
agnostic, Sehwag et al.'s second insight); HYDRA's scores start from scaled magnitudes and are
then trained on the robust objective itself (``hydra``)."""
from __future__ import annotations

import math

import torch
from torch import nn


def magnitude(layer: nn.Module) -> torch.Tensor:
    """|W| of the weights the layer still keeps (pruned ones score 0, so pruning again never
    revives them while a kept weight is left)."""
    return (layer.weight.detach() * layer.weight_mask).abs()


def random(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores; pruned weights score below every kept one."""
    u = torch.rand(layer.weight.shape, generator=generator).to(layer.weight)
    return (u + 1) * layer.weight_mask


def hydra_init(layer: nn.Module) -> torch.Tensor:
    """HYDRA's initial scores: the weights scaled per layer, sqrt(6 / fan_in) * W / max|W|."""
    w = layer.weight.detach() * layer.weight_mask
    fan_in = w[0].numel()
    peak = w.abs().max()
    return math.sqrt(6.0 / max(fan_in, 1)) * w / (peak if peak > 0 else 1)


def unit_scores(layer: nn.Module, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One score per output unit (filter, neuron) for channel pruning: the L1 norm of its kept
    weights ("magnitude") or a random draw ("random")."""
    if kind == "magnitude":
        return magnitude(layer).reshape(layer.weight.shape[0], -1).sum(1)
    if kind == "random":
        return torch.rand(layer.weight.shape[0], generator=generator).to(layer.weight)
    raise ValueError(f"channel pruning supports strategies 'magnitude' and 'random', got {kind!r}")
