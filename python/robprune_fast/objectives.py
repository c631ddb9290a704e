"""Training objectives behind one interface, found by name in a registry.

An objective is built once from its hyper-parameters, ``objective = build("pgd", eps=8/255)``,
then called per batch as ``loss, logits = objective(model, x, y, progress)``: ``progress`` in [0, 1]
is the fraction of training done (for epsilon ramps and, later, IBP's kappa schedule), and
``logits`` are the model's outputs on the inputs the loss was taken on (for training accuracy).
IBP and CROWN-IBP (bounds.py) plug in with ``@register("ibp")`` on a factory of the same shape.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from . import attacks

Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float],
                     tuple[torch.Tensor, torch.Tensor]]
_FACTORIES: dict[str, Callable[..., Objective]] = {}


def register(name: str):
    """Decorator adding an objective factory (hyper-parameters -> Objective) to the registry."""
    def add(factory):
        if name in _FACTORIES:
            raise ValueError(f"objective {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory
    return add


def known() -> list[str]:
    return sorted(_FACTORIES)


def build(name: str, **hyper) -> Objective:
    if name not in _FACTORIES:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(known())}")
    return _FACTORIES[name](**hyper)


def ramp(progress: float, warmup: float) -> float:
    """Linear ramp from 0 to 1 over the first ``warmup`` fraction of training, then 1."""
    return 1.0 if warmup <= 0 else min(1.0, progress / warmup)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Craft attacks in eval mode: adversarial batches must not move BatchNorm's running stats,
    and the attack should see the same network that is later evaluated."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
