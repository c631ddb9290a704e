"""The floating-point context of every bound computation."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def exact_float():
    """Autocast off and TF32/reduced-precision off for matmul and conv, restored on exit.

    Uses the fp32_precision API only: mixing it with the legacy allow_tf32 flags is an error in
    torch, and restoring the saved values leaves the caller's flags as they were.
    """
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul,
             torch.backends.mkldnn.conv)
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value
