"""Which implementation an op call runs: the compiled kernel, or the pure-PyTorch twin.

The kernels live in ``robprune_fast._C`` (schemas in pyext/module.cpp). Where the extension has
no kernel for the input's device (a CPU-only build given CUDA tensors, or no compiled extension
at all) an op runs its twin in ``reference.py`` after a one-time warning that says how to
rebuild; inside ``reference_only()`` every op runs its twin silently (benchmarks time the twins
that way).
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.robprune_fast)
    IMPORT_ERROR = None
except ImportError as error:  # not built: every op runs its reference twin
    _C = None
    IMPORT_ERROR = error

OPS = torch.ops.robprune_fast
_warned: set[tuple[str, str]] = set()
_reference_depth = 0


@functools.lru_cache(maxsize=None)
def has_kernel_for(name: str, device_type: str) -> bool:
    """Whether the compiled extension registers op ``name`` for ``device_type``."""
    # Registrations are fixed once _C is loaded, so the dispatcher is asked once per pair.
    if _C is None:
        return False
    key = "CUDA" if device_type == "cuda" else device_type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"robprune_fast::{name}", key)


def use_kernel(name: str, device: torch.device) -> bool:
    """Whether to run the compiled kernel; warns once per (op, device type) when there is none."""
    if _reference_depth:
        return False
    if has_kernel_for(name, device.type):
        return True
    if (name, device.type) not in _warned:
        _warned.add((name, device.type))
        why = (f"the extension failed to import ({IMPORT_ERROR})" if _C is None
               else f"this build has no {device.type} kernel for it")
        warnings.warn(f"robprune_fast.{name}: {why}; running the slower pure-PyTorch reference. "
                      "Rebuild with `pip install --no-build-isolation -e .` "
                      "(FORCE_CUDA=1 and CUDA_HOME set for the CUDA kernels).",
                      RuntimeWarning, stacklevel=3)
    return False


@contextlib.contextmanager
def reference_only():
    """Every op runs its pure-PyTorch twin inside this scope (no warning): what a user would
    write without the extension, for benchmarks and comparisons."""
    global _reference_depth
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1


# Below the autograd key: without grad mode torch's Python autograd layer of a custom op only
# redispatches, at about 12 us a call on the CPU. Getattr: a private binding, stable for years,
# but a torch without it must still work.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def call(op, *args):
    """op(*args), skipping the autograd layer where there is nothing for it to record."""
    if _BELOW_AUTOGRAD is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def saving(*positions: int, geometry_from: int | None = None):
    """The setup_context of an op whose backward needs some of its inputs: saves those at
    ``positions`` for backward (``ctx.saved_tensors``, in that order) and keeps the arguments
    from ``geometry_from`` on (a layer's stride, padding, ...: no gradient) as ``ctx.geometry``."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in positions))
        ctx.geometry = [] if geometry_from is None else list(inputs[geometry_from:])
    return setup_context
