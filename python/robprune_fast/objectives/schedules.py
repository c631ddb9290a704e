"""The schedules of certified training: how eps, kappa, beta and the warm-up regulariser's weight
move with the fraction of training done.

eps starts at 0 and ramps up over a window of training, as in Gowal et al. 2018 and Zhang et
al. 2020; kappa moves over the same window, beta and the regulariser's weight follow eps_t.
"""

from __future__ import annotations

import dataclasses

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


def check_fraction(value, name: str) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_certified(eps, eps_start, eps_ramp, schedule, kappa_start, kappa_end, reg_lambda,
                    reg_tol) -> None:
    """Refuse out-of-range hyper-parameters shared by the IBP and CROWN-IBP objectives: the
    schedule's and the warm-up regulariser's."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_fraction(eps_start, "eps_start")
    check_fraction(eps_ramp, "eps_ramp")
    if eps_start + eps_ramp > 1:
        raise ValueError(f"eps_start + eps_ramp must be <= 1 (the ramp must end within training), "
                         f"got {eps_start} + {eps_ramp}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_fraction(kappa_start, "kappa_start")
    check_fraction(kappa_end, "kappa_end")
    if not reg_lambda >= 0:
        raise ValueError(f"reg_lambda must be >= 0, got {reg_lambda}")
    if not reg_tol > 0:
        raise ValueError(f"reg_tol must be > 0, got {reg_tol}")
