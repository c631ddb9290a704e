"""Training objectives behind one interface, found by name in a registry.

An objective is built once from its hyper-parameters, ``objective = build("pgd", eps=8/255)``,
then called per batch as ``loss, logits = objective(model, x, y, progress)``: ``progress`` in [0, 1]
is the fraction of training done (for epsilon ramps and the kappa/beta schedules), and
``logits`` are the model's outputs on the inputs the loss was taken on (for training accuracy).

Certified objectives: ``ibp`` (Gowal et al. 2018) and ``crown-ibp`` (Zhang et al. 2020), with the
warm-up options of Shi et al. 2021 (``ibp_initialization``, ``reg=True``); see ``ibp_training``.

One module per job; this file gathers the public names:

- ``registry``: ``register``, ``known``, ``build``, ``Objective``
- ``adversarial``: natural, pgd, fgsm_rs, trades and their eps warm-up ``ramp``
- ``certified``: ibp, crown-ibp
- ``schedules``: eps, kappa, beta and regulariser weight over training (``certified_schedule``)
- ``warmup``: Shi et al.'s ``ibp_initialization`` and ``warmup_regularizer``
"""

from __future__ import annotations

# Importing the objective modules registers their objectives (by decorator), so every name is
# known once this package is imported.
from .adversarial import fgsm_rs_training, natural, pgd_training, ramp, trades_training
from .certified import crown_ibp_training, ibp_training, num_outputs
from .registry import Objective, build, known, register
from .schedules import (SCHEDULES, SMOOTH_MID, SMOOTH_POWER, CertifiedSchedule, certified_schedule,
                        eps_fraction, ramp_position, smooth_ramp)
from .warmup import ibp_initialization, warmup_regularizer

__all__ = [
    "CertifiedSchedule", "Objective", "SCHEDULES", "SMOOTH_MID", "SMOOTH_POWER", "build",
    "certified_schedule", "crown_ibp_training", "eps_fraction", "fgsm_rs_training",
    "ibp_initialization", "ibp_training", "known", "natural", "num_outputs", "pgd_training",
    "ramp", "ramp_position", "register", "smooth_ramp", "trades_training", "warmup_regularizer",
]
