"""Verification: which points are certified robust, with unstable-ReLU counts."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import ops
from ..modes import eval_mode
from .api import (bound_details, check_method, check_x, compute_dtype, margin_spec)
from .compile import compile_model
from .floats import exact_float
from .layers import clean_walk

DEFAULT_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


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
    check_method(method)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtype = compute_dtype(x, bound_kwargs.get("dtype"))
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    correct, margins, unstable, neurons = [], [], {}, {}
    # Weights are fixed while verifying: the interval ops make W * M and |W * M| once for
    # all batches (the cache is dropped when this scope ends).
    with eval_mode(model), torch.no_grad(), exact_float(), ops.weight_cache():
        seq = compile_model(model, dtype)
        for b0 in range(0, x.shape[0], batch_size):
            xb, yb = x[b0:b0 + batch_size], y[b0:b0 + batch_size].to(x.device)
            logits = clean_walk(seq, check_x(xb, dtype))
            correct.append(logits.argmax(1) == yb)
            spec = margin_spec(yb, logits.shape[1], dtype)
            bounds = bound_details(model, xb, eps, method, spec, upper=False, **bound_kwargs)
            margins.append(bounds.lower)
            for name, (lo, up) in bounds.relu_bounds.items():
                unstable[name] = unstable.get(name, 0) + int(((lo < 0) & (up > 0)).sum())
                neurons[name] = lo[0].numel()
    correct, margins = torch.cat(correct), torch.cat(margins)
    verified = correct & (margins > tol).all(1)
    return Verification(correct, verified, margins, unstable, neurons)
