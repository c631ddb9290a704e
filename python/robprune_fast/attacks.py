"""Empirical attacks in pixel space: PGD (L-inf and L2), FGSM, and AutoAttack (optional package).

Every attack returns adversarial inputs that stay inside the eps-ball around ``x`` and inside
[0, 1].  Attacks never change the model's train/eval mode and never touch parameter gradients:
the caller decides the mode (objectives attack in eval mode, see objectives/adversarial.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NORMS = ("linf", "l2")


def _check(x: torch.Tensor, y: torch.Tensor | None, eps: float, norm: str,
           steps: int = 1, step_size: float = 1.0, restarts: int = 1) -> None:
    """Argument checks; every message names the argument at fault."""
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1], got values in [{x.min().item():g}, {x.max().item():g}]")
    if y is not None and (y.ndim != 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if not eps >= 0:  # also catches NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x``, then clip to [0, 1].

    Clipping to the pixel box after the ball never leaves the ball: with x in [0, 1], clipping
    only shrinks each coordinate of the perturbation towards zero.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """A point drawn uniformly from the eps-ball around ``x`` (then clipped to [0, 1])."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        # Uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d).
        g = torch.randn_like(x)
        d = x[0].numel()
        r = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = g / _per_sample_norm(g).clamp_min(1e-12) * r.view(-1, *([1] * (x.ndim - 1)))
    return project(x, x + delta, eps, norm)


def perturb(model, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], eps: float,
            steps: int, step_size: float, norm: str = "linf",
            x_start: torch.Tensor | None = None) -> torch.Tensor:
    """Projected steepest ascent of ``loss_fn(model(x_adv))`` (per-sample losses) from ``x_start``.

    The core of PGD, FGSM and TRADES' inner maximisation; no argument checks (callers do them).
    """
    x_adv = project(x, x if x_start is None else x_start, eps, norm).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv)).float().sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        if norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / _per_sample_norm(grad).clamp_min(1e-12)
        x_adv = project(x, x_adv.detach() + step_size * direction, eps, norm).detach()
    return x_adv


def _cross_entropy(y: torch.Tensor):
    return lambda logits: F.cross_entropy(logits.float(), y, reduction="none")


def pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float,
        restarts: int = 1, norm: str = "linf", random_init: bool = True) -> torch.Tensor:
    """PGD on the cross-entropy (Madry et al.), from a random start in the ball.

    With several restarts each sample keeps its best result: a misclassifying one first, then the
    one with the highest loss.
    """
    _check(x, y, eps, norm, steps, step_size, restarts)
    loss_fn = _cross_entropy(y)
    best = best_loss = best_wrong = None
    for _ in range(restarts):
        start = random_start(x, eps, norm) if random_init else x
        x_adv = perturb(model, x, loss_fn, eps, steps, step_size, norm, start)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            logits = model(x_adv)
            loss = loss_fn(logits)
            wrong = logits.argmax(1) != y
        if best is None:
            best, best_loss, best_wrong = x_adv, loss, wrong
            continue
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best = torch.where(better.view(-1, *([1] * (x.ndim - 1))), x_adv, best)
        best_loss = torch.where(better, loss, best_loss)
        best_wrong = best_wrong | wrong
    return best


def fgsm(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float | None = None,
         random_init: bool = False, norm: str = "linf") -> torch.Tensor:
    """One signed-gradient step (Goodfellow et al.); with ``random_init`` the FGSM-RS of Wong et al."""
    step_size = eps if step_size is None else step_size
    if eps == 0:
        _check(x, y, eps, norm)
        return x.detach().clone()
    return pgd(model, x, y, eps, 1, step_size, 1, norm, random_init)


def autoattack(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               attacks: list[str] | None = None, batch_size: int = 250, seed: int = 0) -> torch.Tensor:
    """AutoAttack (Croce & Hein) through the optional ``pyautoattack`` package.

    By default the standard version (APGD-CE, APGD-T, FAB-T, Square); ``attacks`` runs only the
    named ones (e.g. ``["apgd-ce"]``, AutoAttack's "custom" version).  The model should be in eval mode.
    """
    _check(x, y, eps, norm)
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ImportError("AutoAttack needs the optional package 'pyautoattack': "
                          "pip install pyautoattack") from None
    adversary = AutoAttack(model, attacks=attacks, device=x.device, eps=eps,
                           norm={"linf": "Linf", "l2": "L2"}[norm], seed=seed,
                           version="standard" if attacks is None else "custom")
    adversary.verbose = False
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    # AutoAttack's own projection is exact up to rounding; make the guarantee ours.
    return project(x, x_adv.to(x.dtype), eps, norm)

