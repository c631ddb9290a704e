"""Switching a model to eval mode for a while, and back exactly as it was.

``model.train(flag)`` sets every submodule's flag: restoring that way would unfreeze a BatchNorm
the user had put in eval mode inside a training model (a common fine-tuning recipe).  So the
flags are saved and restored module by module.  Imports torch only: every layer may use it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Every module in eval mode inside the block; each module's own flag restored after."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in saved:
            module.training = training
