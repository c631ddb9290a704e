"""Shi et al. 2021's warm-up for certified training: an initialisation and regularisers that keep
IBP's intervals from exploding and its ReLUs from dying while eps is still small."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..models import Normalize
from ..nn import CompressedConv2d, CompressedLinear


def mean_input_radius(model, x, eps):
    """Mean radius of the input box as the first affine layer sees it: after a leading Normalize
    (Shi et al. normalise the data outside the model, so their input box is in that space)."""
    radius = ((x + eps).clamp(0, 1) - (x - eps).clamp(0, 1)) / 2
    first = model[0] if isinstance(model, torch.nn.Sequential) and len(model) else None
    if isinstance(first, Normalize):
        radius = radius / first.std.to(radius)
    return radius.mean()


def _balance(a, b, tol):
    """min(a/b, b/a) for a, b >= 0 without dividing by zero; tol (no penalty) when both are 0,
    where Shi et al.'s code gets NaN and skips the term."""
    hi = torch.maximum(a, b)
    return torch.where(hi > 0, torch.minimum(a, b) / hi.clamp(min=1e-12), torch.full_like(hi, tol))


def warmup_regularizer(relu_bounds: Mapping, input_radius: torch.Tensor, tol: float = 0.5):
    """Shi et al. 2021's warm-up regularisers, L_tightness + L_relu, averaged over ReLU layers.

    For ReLU layer i with IBP pre-activation bounds [l, u] (all inputs and neurons pooled), centre
    c = (u + l)/2 and radius d = (u - l)/2, and d0 = the mean input radius:

      L_tightness_i = ReLU(tol - d0 / mean(d)) / tol
          penalises interval growth beyond 1/tol times the input radius;
      L_relu_i = (ReLU(tol - r_mean) + ReLU(tol - r_var)) / tol, where, with A = [l > 0]
          (active) and I = [u < 0] (inactive),
          r_mean = balance(mean(c A), -mean(c I)),
          r_var  = balance(sum((c - mean(c))^2 A), sum((c - mean(c))^2 I)),
          balance(a, b) = min(a/b, b/a),
          penalises imbalance between active and inactive ReLUs (IBP training favours dead ones).

    Formulas as in the authors' code (regularization.py, default tol 0.5).
    """
    if not relu_bounds:
        raise ValueError("the warm-up regulariser needs a model with ReLU layers")
    tightness = relu = 0
    for lower, upper in relu_bounds.values():
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        tightness = tightness + F.relu(tol - input_radius / radius.mean().clamp(min=1e-12)) / tol
        active, inactive = (lower > 0).to(centre), (upper < 0).to(centre)
        r_mean = _balance((centre * active).mean(), -(centre * inactive).mean(), tol)
        spread = (centre - centre.mean()) ** 2
        r_var = _balance((spread * active).sum(), (spread * inactive).sum(), tol)
        relu = relu + (F.relu(tol - r_mean) + F.relu(tol - r_var)) / tol
    return (tightness + relu) / len(relu_bounds)


@torch.no_grad()
def ibp_initialization(model: torch.nn.Module) -> None:
    """Shi et al. 2021's IBP initialisation, in place: every Linear/Conv2d weight but the last
    layer's is redrawn from N(0, sigma^2) with sigma = sqrt(2 pi) / fan_in.

    Why: with |W| summing fan_in half-normal entries (mean sigma sqrt(2/pi)) and about half of an
    unstable interval passing a ReLU, the IBP radius then neither grows nor shrinks in expectation
    from layer to layer, where standard initialisations make it explode with depth.
    Biases are kept.  Pruned layers (torch.nn.utils.prune's weight_orig/weight_mask) redraw
    weight_orig, with fan_in counting only the weights the mask keeps per output unit, since the
    argument is about the terms a unit actually sums.  Layers are taken in module order.
    """
    if any(isinstance(m, (CompressedLinear, CompressedConv2d)) for m in model.modules()):
        raise TypeError("ibp_initialization redraws dense or masked layers; the model has compressed "
                        "ones (nn.compress): initialise before compressing, or nn.decompress first")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not layers:
        raise ValueError("ibp_initialization: the model has no Linear or Conv2d layer")
    for layer in layers[:-1]:
        weight = getattr(layer, "weight_orig", layer.weight)
        mask = getattr(layer, "weight_mask", None)
        kept = weight[0].numel() if mask is None else mask.sum().item() / mask.shape[0]
        weight.normal_(0.0, math.sqrt(2 * math.pi) / max(kept, 1.0))
