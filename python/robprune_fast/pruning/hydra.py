"""HYDRA (Sehwag et al., NeurIPS 2020): let the robust objective choose the connections.

Each masked layer gets importance scores, initialised from its weights scaled per layer
(``scores.hydra_init``); the mask is the top-k of |scores| with the layer's kept count, and its
gradient passes straight through to the scores (``nn.top_k_straight_through``; the masked ops
give the mask's gradient, the effective weight's gradient times the weight). The weights and
biases are frozen while the scores train with SGD on the training objective; the scores' mask
then becomes the layer's mask, and the masked weights are fine-tuned as usual.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..nn import masked_modules
from . import scores


def attach(layers: dict[str, nn.Module], counts: dict[str, int]) -> None:
    """Give each masked layer HYDRA scores deciding a mask of counts[name] weights."""
    for name, keep in counts.items():
        layers[name].attach_scores(scores.hydra_init(layers[name]), keep)


@contextlib.contextmanager
def only_scores_train(model: nn.Module):
    """Inside: every parameter but the scores frozen (requires_grad False); restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    score_params = {id(layer.scores) for layer in masked_modules(model).values()
                    if layer.scores is not None}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in score_params)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def finish(model: nn.Module) -> None:
    """Every layer's scores become its mask (exactly its kept count) and are dropped."""
    for layer in masked_modules(model).values():
        layer.detach_scores()
