"""Certified objectives: ``ibp`` (Gowal et al. 2018) and ``crown-ibp`` (Zhang et al. 2020).

Both minimise a mix of the clean loss and an upper bound of the worst-case loss in the eps-ball,
taken from sound bounds (``bounds.training_bounds``).  Their schedules are in ``schedules``,
Shi et al.'s warm-up in ``warmup``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import bounds
from ..nn import CompressedLinear
from .. import loss_fusion as fusion
from .registry import Objective, register
from .schedules import certified_schedule, check_certified, check_fraction
from .warmup import mean_input_radius, warmup_regularizer


def num_outputs(model: torch.nn.Module) -> int:
    """The number of classes: out_features of the model's last linear layer (nn.Linear, or a
    compressed one)."""
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, CompressedLinear))]
    if not linears:
        raise ValueError("cannot infer the number of classes (the model has no Linear layer); "
                         "pass num_classes")
    return linears[-1].out_features


def _has_training_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


def _certified_objective(num_classes, max_memory, reg_tol, robust_loss, **schedule):
    """The loop shared by IBP and CROWN-IBP.  robust_loss(model, x, y, eps_t, K, beta, max_memory)
    returns (per-input robust loss, worst-case logits z, the bounds.TrainingBounds of its pass)."""

    def objective(model, x, y, progress):
        s = certified_schedule(progress, **schedule)
        if s.eps == 0 and s.reg_weight == 0:
            # Zero radius: every bound is exact, the robust loss is the clean loss.
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        K = num_classes or num_outputs(model)
        robust, z, b = robust_loss(model, x, y, s.eps, K, s.beta, max_memory)
        loss = (1 - s.kappa) * robust.mean()
        if s.kappa > 0:
            logits = model(x)
            _check_inside(logits, y, b)
            loss = loss + s.kappa * F.cross_entropy(logits, y)
        elif _has_training_batchnorm(model):
            # Bounds never update running statistics; only the clean pass does.
            with torch.no_grad():
                model(x)
        if s.reg_weight > 0:
            radius = mean_input_radius(model, x, s.eps)
            loss = loss + s.reg_weight * warmup_regularizer(b.relu_bounds, radius, reg_tol)
        return loss, z
    return objective


# How far the model's own margins may stray outside the training bounds (exact-arithmetic
# bounds, a float forward) before the two are taken to disagree, relative to their size.
_INSIDE_SLACK = 1e-2


def _check_inside(logits, y, b):
    """The model's own clean margins lie in the IBP bounds of the ball around x, or the engine
    reads the model wrongly (a second line of defence behind bounds.compile's checks). The
    check is asynchronous on the GPU (no host sync) and skipped under autocast, whose
    reduced-precision forward is no match for the bounds' float32."""
    if torch.is_autocast_enabled(logits.device.type):
        return
    with torch.no_grad():
        margins = logits.gather(1, y[:, None]) - logits  # (B, K), 0 at the true class
        others = torch.ones_like(margins, dtype=torch.bool).scatter_(1, y[:, None], False)
        margins = margins[others].view_as(b.ibp_lower).to(b.ibp_lower.dtype)
        slack = _INSIDE_SLACK * (1 + b.ibp_lower.abs() + b.ibp_upper.abs())
        inside = (margins >= b.ibp_lower - slack) & (margins <= b.ibp_upper + slack)
        torch._assert_async(inside.all() | ~torch.isfinite(margins).all(),
                            "the model's own logits fall outside its certified-training bounds: "
                            "some layer computes something the bound engine does not know")


@register("ibp")
def ibp_training(eps: float, eps_start: float = 0.0, eps_ramp: float = 0.5,
                 schedule: str = "linear", kappa_start: float = 1.0, kappa_end: float = 0.5,
                 reg: bool = False, reg_lambda: float = 0.5, reg_tol: float = 0.5,
                 num_classes: int | None = None,
                 max_memory: int = bounds.DEFAULT_MAX_MEMORY) -> Objective:
    """IBP training (Gowal et al. 2018): kappa * CE(clean) + (1 - kappa) * CE(z_IBP).

    z_IBP has 0 at the true class and -lower(z_y - z_j) (IBP, C folded into the last layer) at
    every other class j.  eps_t = eps * f(progress): 0 before ``eps_start``, ramped over the next
    ``eps_ramp`` of training ("linear", or "smooth": auto_LiRPA's polynomial-then-linear shape),
    then eps.  kappa moves linearly from kappa_start to kappa_end over the same window.
    ``reg``: Shi et al. 2021's warm-up regularisers (``warmup_regularizer``), weighted
    reg_lambda * (1 - eps_t / eps), so they fade out as the ramp ends.  Pair with
    ``ibp_initialization(model)`` before training for their full recipe.

    Returned logits are z (argmax z == y iff the point is IBP-certified at eps_t), so the loop's
    training accuracy is the certified training accuracy; at eps_t = 0 they are the clean logits.
    Works on pruned models (weight_mask layers): the bounds apply the masks.
    """
    check_certified(eps, eps_start, eps_ramp, schedule, kappa_start, kappa_end, reg_lambda,
                    reg_tol)

    def robust(model, x, y, eps_t, K, beta, max_memory):
        C = bounds.margin_spec(y, K)
        b = bounds.training_bounds(model, x, eps_t, C, max_memory=max_memory)
        loss, z = fusion.robust_ce(b.ibp_lower, y)
        return loss, z, b

    return _certified_objective(num_classes, max_memory, reg_tol, robust, eps=eps,
                                eps_start=eps_start, eps_ramp=eps_ramp, schedule=schedule,
                                kappa_start=kappa_start, kappa_end=kappa_end,
                                reg_lambda=reg_lambda if reg else 0.0)


@register("crown-ibp")
def crown_ibp_training(eps: float, eps_start: float = 0.0, eps_ramp: float = 0.5,
                       schedule: str = "linear", kappa_start: float = 1.0, kappa_end: float = 0.0,
                       beta_start: float = 1.0, beta_end: float = 0.0, loss_fusion: bool = False,
                       reg: bool = False, reg_lambda: float = 0.5, reg_tol: float = 0.5,
                       num_classes: int | None = None,
                       max_memory: int = bounds.DEFAULT_MAX_MEMORY) -> Objective:
    """CROWN-IBP training (Zhang et al. 2020): as ``ibp_training`` with the margin lower bounds
    mixed, beta * CROWN-IBP + (1 - beta) * IBP; beta follows eps: beta_start at eps_t = 0 to
    beta_end at eps_t = eps (the paper: 1 -> 0).  Once beta is 0 no CROWN sweep runs.

    ``loss_fusion``: instead of the K-1 margin rows, sweep one row per input that bounds the CE
    loss itself (``loss_fusion.fused_ce_bound``); the robust loss is then
    beta * fused + (1 - beta) * CE(z_IBP), a convex mix of two upper bounds of the worst-case
    loss, hence one too.  Logits for training accuracy are z from IBP in that mode.
    """
    check_certified(eps, eps_start, eps_ramp, schedule, kappa_start, kappa_end, reg_lambda,
                    reg_tol)
    check_fraction(beta_start, "beta_start")
    check_fraction(beta_end, "beta_end")

    def robust(model, x, y, eps_t, K, beta, max_memory):
        if beta > 0 and loss_fusion:
            fused, b = fusion.fused_ce_bound(model, x, y, eps_t, K, max_memory=max_memory)
            ibp_loss, z = fusion.robust_ce(b.ibp_lower, y)
            return beta * fused + (1 - beta) * ibp_loss, z, b
        C = bounds.margin_spec(y, K)
        b = bounds.training_bounds(model, x, eps_t, C, C if beta > 0 else None,
                                   max_memory=max_memory)
        lower = b.ibp_lower if beta == 0 else beta * b.crown_lower + (1 - beta) * b.ibp_lower
        loss, z = fusion.robust_ce(lower, y)
        return loss, z, b

    return _certified_objective(num_classes, max_memory, reg_tol, robust, eps=eps,
                                eps_start=eps_start, eps_ramp=eps_ramp, schedule=schedule,
                                kappa_start=kappa_start, kappa_end=kappa_end,
                                beta_start=beta_start, beta_end=beta_end,
                                reg_lambda=reg_lambda if reg else 0.0)
