"""Empirical objectives: natural training, and adversarial training on attacked inputs (PGD,
FGSM from a random start, TRADES), with an optional linear epsilon warm-up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import attacks
# Attacks are crafted in eval mode: adversarial batches must not move BatchNorm's running
# statistics, and the attack should see the network that is later evaluated.
from ..modes import eval_mode
from .registry import Objective, register


def ramp(progress: float, warmup: float) -> float:
    """Linear ramp from 0 to 1 over the first ``warmup`` fraction of training, then 1."""
    return 1.0 if warmup <= 0 else min(1.0, progress / warmup)


def _check_attack(eps: float, steps: int, step_size: float | None, warmup: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if not 0 <= warmup <= 1:
        raise ValueError(f"eps_warmup must be a fraction of training in [0, 1], got {warmup}")


@register("natural")
def natural() -> Objective:
    def objective(model, x, y, progress):
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return objective


@register("pgd")
def pgd_training(eps: float, steps: int = 10, step_size: float | None = None,
                 norm: str = "linf", eps_warmup: float = 0.0) -> Objective:
    """Madry et al.: cross-entropy on PGD examples.  Default step 2.5 * eps / steps (theirs)."""
    _check_attack(eps, steps, step_size, eps_warmup)
    step_size = 2.5 * eps / steps if step_size is None else step_size

    def objective(model, x, y, progress):
        scale = ramp(progress, eps_warmup)
        if eps * scale > 0:
            with eval_mode(model):
                x = attacks.pgd(model, x, y, eps * scale, steps, step_size * scale, norm=norm)
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return objective


@register("fgsm_rs")
def fgsm_rs_training(eps: float, step_size: float | None = None, eps_warmup: float = 0.0) -> Objective:
    """Wong et al.'s "fast" adversarial training: FGSM from a random start, step 1.25 * eps."""
    _check_attack(eps, 1, step_size, eps_warmup)
    step_size = 1.25 * eps if step_size is None else step_size

    def objective(model, x, y, progress):
        scale = ramp(progress, eps_warmup)
        if eps * scale > 0:
            with eval_mode(model):
                x = attacks.fgsm(model, x, y, eps * scale, step_size * scale, random_init=True)
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return objective


@register("trades")
def trades_training(eps: float, beta: float = 6.0, steps: int = 10, step_size: float | None = None,
                    norm: str = "linf", eps_warmup: float = 0.0) -> Objective:
    """Zhang et al.: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL term."""
    _check_attack(eps, steps, step_size, eps_warmup)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    step_size = 2.5 * eps / steps if step_size is None else step_size

    def objective(model, x, y, progress):
        scale = ramp(progress, eps_warmup)
        x_adv = x
        if eps * scale > 0:
            with eval_mode(model):
                p_clean = F.softmax(model(x).float(), dim=1).detach()
                kl = lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean,
                                             reduction="none").sum(1)
                # TRADES starts next to x (0.001 * N(0, 1)), not uniformly in the ball.
                start = x + 0.001 * torch.randn_like(x)
                x_adv = attacks.perturb(model, x, kl, eps * scale, steps, step_size * scale, norm, start)
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), F.softmax(logits.float(), dim=1),
                          reduction="batchmean")
        return F.cross_entropy(logits, y) + beta * robust, logits
    return objective
