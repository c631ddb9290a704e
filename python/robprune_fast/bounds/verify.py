"""Verification: which points are certified robust, with unstable-ReLU counts."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import ops
from ..modes import eval_mode
from .api import bound_details, check_method, check_x, compute_dtype, margin_spec
from .compile import compile_model
from .floats import exact_float
from .layers import clean_walk


@dataclasses.dataclass
class Verification:
    """Per-point results of ``verified_accuracy``.

    correct: (N,) the model's own prediction equals the label.  verified: (N,) correct and every
    margin lower bound > tol.  margin_lower: (N, K-1) sound lower bounds of y - j (rounding
    included, see ``bounds.rounding``).  unstable: per ReLU layer, the number of unstable neurons
    (pre-activation interval containing 0 in its interior) summed over the N points; neurons:
    per ReLU layer, the neurons per point.
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
                      method: str = "crown-ibp", *, tol: float = 0.0,
                      batch_size: int = 256, **bound_kwargs) -> Verification:
    """Verify every point of (x, y) at radius eps with ``method``; returns a ``Verification``.

    A point is verified when the model's own forward classifies it correctly and every margin
    lower bound exceeds ``tol`` (>= 0; the bounds already include their rounding budget, so 0
    is sound). eps: a number, or a tensor broadcast to x (per sample: (N, 1, ...)).

    The model runs in eval mode (each module's flag restored afterwards), without gradients, in
    exact float32 (or float64 with dtype=torch.float64). As a second line of defence against a
    model the engine reads wrongly, its own logits are compared with the engine's reading of it
    on every batch, and a difference beyond rounding raises ``RuntimeError``. bound_kwargs go to
    ``bound_details`` (intersect_ibp, max_memory, dtype).
    """
    check_method(method)
    if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a tensor of shape (N, ...) with N >= 1 points, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (a negative tolerance would certify points whose "
                         f"margin may be negative), got {tol}")
    dtype = compute_dtype(x, bound_kwargs.get("dtype"))
    eps = torch.as_tensor(eps, device=x.device)
    correct, margins, unstable, neurons = [], [], {}, {}
    # Weights are fixed while verifying: the interval ops make W * M and |W * M| once for
    # all batches (the cache is dropped when this scope ends).
    with eval_mode(model), torch.no_grad(), exact_float(), ops.weight_cache():
        seq = compile_model(model, dtype)
        for b0 in range(0, x.shape[0], batch_size):
            xb, yb = x[b0:b0 + batch_size], y[b0:b0 + batch_size].to(x.device)
            eb = eps[b0:b0 + batch_size] if eps.dim() and eps.shape[0] == x.shape[0] else eps
            walk_logits = clean_walk(seq, check_x(xb, dtype))
            spec = margin_spec(yb, walk_logits.shape[1], dtype)
            bounds = bound_details(model, xb, eb, method, spec, upper=False, **bound_kwargs)
            logits = _own_logits(model, xb, walk_logits, bounds.output_slack)
            correct.append(logits.argmax(1) == yb)
            margins.append(bounds.lower)
            for name, (lo, up) in bounds.relu_bounds.items():
                unstable[name] = unstable.get(name, 0) + int(((lo < 0) & (up > 0)).sum())
                neurons[name] = lo[0].numel()
    correct, margins = torch.cat(correct), torch.cat(margins)
    verified = correct & (margins > tol).all(1)
    return Verification(correct, verified, margins, unstable, neurons)


def _own_logits(model, x, walk_logits, slack):
    """model(x) itself, checked against the engine's reading of the model (walk_logits): both
    are within rounding of the exact logits, so they differ by at most the output slack."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    logits = model(x.to(param.dtype if param is not None else x.dtype)).to(walk_logits.dtype)
    if logits.shape != walk_logits.shape:
        raise RuntimeError(f"model(x) has shape {tuple(logits.shape)} but the bound engine's "
                           f"reading of the model gives {tuple(walk_logits.shape)}")
    finite = torch.isfinite(logits) & torch.isfinite(walk_logits)
    apart = ~((logits - walk_logits).abs() <= slack) & finite
    if apart.any():
        worst = (logits - walk_logits).abs()[apart].max().item()
        raise RuntimeError(
            "model(x) disagrees with the bound engine's reading of the model (by up to "
            f"{worst:g}, beyond rounding): some layer computes something the engine does not "
            "know, so no point can be certified. Check for custom forwards, hooks or "
            "monkeypatched layers.")
    return logits
