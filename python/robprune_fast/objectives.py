"""Training objectives behind one interface, found by name in a registry.

An objective is built once from its hyper-parameters, ``objective = build("pgd", eps=8/255)``,
then called per batch as ``loss, logits = objective(model, x, y, progress)``: ``progress`` in [0, 1]
is the fraction of training done (for epsilon ramps and the kappa/beta schedules), and
``logits`` are the model's outputs on the inputs the loss was taken on (for training accuracy).

Certified objectives: ``ibp`` (Gowal et al. 2018) and ``crown-ibp`` (Zhang et al. 2020), with the
warm-up options of Shi et al. 2021 (``ibp_initialization``, ``reg=True``); see ``ibp_training``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F

from . import attacks, bounds
from . import loss_fusion as fusion
from .models import Normalize
# Attacks are crafted in eval mode: adversarial batches must not move BatchNorm's running
# statistics, and the attack should see the network that is later evaluated.
from .modes import eval_mode

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
    """The objective ``name`` with its hyper-parameters.  It carries ``spec`` = {"name": name,
    **hyper}, which says what it optimises: a run resumed with another spec is refused."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(known())}")
    objective = _FACTORIES[name](**hyper)
    objective.spec = {"name": name, **hyper}
    return objective


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


# --------------------------------------------------------------------------------------------------
# Certified training: IBP and CROWN-IBP

SCHEDULES = ("linear", "smooth")
# auto_LiRPA's SmoothedScheduler (used by Shi et al. 2021): polynomial of this power up to this
# fraction of the ramp, then linear with a matching slope.
SMOOTH_POWER, SMOOTH_MID = 4.0, 0.25


def ramp_position(progress: float, start: float, length: float) -> float:
    """Where ``progress`` sits in the ramp window [start, start + length], as a fraction of it."""
    if progress < start:
        return 0.0
    return 1.0 if length <= 0 else min(1.0, (progress - start) / length)


def smooth_ramp(t: float, power: float = SMOOTH_POWER, mid: float = SMOOTH_MID) -> float:
    """auto_LiRPA's smoothed ramp on t in [0, 1]: alpha t^power for t < mid, then the line that
    continues it with the same slope and ends at 1 (alpha makes value and slope match at mid)."""
    alpha = 1.0 / (mid ** (power - 1) * ((1 - mid) * power + mid))
    if t < mid:
        return alpha * t ** power
    at_mid = alpha * mid ** power
    return at_mid + (1 - at_mid) * (t - mid) / (1 - mid)


def eps_fraction(progress: float, start: float, length: float, schedule: str) -> float:
    """eps_t / eps at ``progress``: 0 before the ramp, 1 after, ``schedule``-shaped in between."""
    t = ramp_position(progress, start, length)
    return t if schedule == "linear" or t >= 1 else smooth_ramp(t)


def _check_fraction(value, name: str) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _check_certified(eps, eps_start, eps_ramp, schedule, kappa_start, kappa_end, reg_lambda,
                     reg_tol) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _check_fraction(eps_start, "eps_start")
    _check_fraction(eps_ramp, "eps_ramp")
    if eps_start + eps_ramp > 1:
        raise ValueError(f"eps_start + eps_ramp must be <= 1 (the ramp must end within training), "
                         f"got {eps_start} + {eps_ramp}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_fraction(kappa_start, "kappa_start")
    _check_fraction(kappa_end, "kappa_end")
    if not reg_lambda >= 0:
        raise ValueError(f"reg_lambda must be >= 0, got {reg_lambda}")
    if not reg_tol > 0:
        raise ValueError(f"reg_tol must be > 0, got {reg_tol}")


def num_outputs(model: torch.nn.Module) -> int:
    """The number of classes: out_features of the model's last Linear layer."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("cannot infer the number of classes (the model has no Linear layer); "
                         "pass num_classes")
    return linears[-1].out_features


def _has_training_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


def _input_radius(model, x, eps):
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
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not layers:
        raise ValueError("ibp_initialization: the model has no Linear or Conv2d layer")
    for layer in layers[:-1]:
        weight = getattr(layer, "weight_orig", layer.weight)
        mask = getattr(layer, "weight_mask", None)
        kept = weight[0].numel() if mask is None else mask.sum().item() / mask.shape[0]
        weight.normal_(0.0, math.sqrt(2 * math.pi) / max(kept, 1.0))


@dataclasses.dataclass(frozen=True)
class CertifiedSchedule:
    """The values of the certified-training schedules at one point of training."""
    eps: float         # eps_t
    kappa: float       # weight of the clean loss
    beta: float        # weight of CROWN-IBP's bounds against IBP's (CROWN-IBP only)
    reg_weight: float  # weight of the warm-up regulariser (0 when off)


def certified_schedule(progress: float, eps: float, eps_start: float = 0.0, eps_ramp: float = 0.5,
                       schedule: str = "linear", kappa_start: float = 1.0,
                       kappa_end: float = 0.5, beta_start: float = 0.0, beta_end: float = 0.0,
                       reg_lambda: float = 0.0) -> CertifiedSchedule:
    """eps_t = eps * f(progress), f: 0 before eps_start, ramped over the next eps_ramp of
    training (``eps_fraction``), then 1.  kappa moves linearly over the same window (as in Gowal
    et al. and Zhang et al.); beta and the regulariser weight follow eps_t, as in the papers:
    beta = beta_start + (beta_end - beta_start) eps_t/eps, reg = reg_lambda (1 - eps_t/eps)."""
    t = ramp_position(progress, eps_start, eps_ramp)
    frac = eps_fraction(progress, eps_start, eps_ramp, schedule)
    return CertifiedSchedule(eps=eps * frac,
                             kappa=kappa_start + (kappa_end - kappa_start) * t,
                             beta=beta_start + (beta_end - beta_start) * frac,
                             reg_weight=reg_lambda * (1 - frac))


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
            radius = _input_radius(model, x, s.eps)
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
    _check_certified(eps, eps_start, eps_ramp, schedule, kappa_start, kappa_end, reg_lambda,
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
    _check_certified(eps, eps_start, eps_ramp, schedule, kappa_start, kappa_end, reg_lambda,
                     reg_tol)
    _check_fraction(beta_start, "beta_start")
    _check_fraction(beta_end, "beta_end")

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
