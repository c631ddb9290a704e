"""robprune_fast: fast kernels and a Python layer for compact, robust neural networks.

The operators live in ``robprune_fast.ops`` (pure-PyTorch twins in ``robprune_fast.reference``).
"""
from __future__ import annotations

import torch  # noqa: F401  (first: robprune_fast._C links against torch's libraries)

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled extension holds: CPU-only or CUDA kernels, for which architectures,
    built against which torch; plus the torch and GPU this process runs with."""
    from . import ops

    info = {"extension_loaded": ops._C is not None, "torch_runtime": torch.__version__,
            "cuda_available": torch.cuda.is_available()}
    if ops._C is None:
        info.update(cuda=False, cuda_archs=[], torch_version=None, import_error=str(ops.IMPORT_ERROR))
        return info
    built = dict(ops._C.build_info())
    built["cuda_archs"] = _parse_arch_token(built["cuda_archs"])
    info.update(built)
    return info


def _parse_arch_token(token: str) -> list[str]:
    """setup.py's one-token arch list back to TORCH_CUDA_ARCH_LIST form: 'sm80_sm90aptx' ->
    ['8.0', '9.0a+PTX']."""
    import re

    archs = []
    for part in token.split("_"):
        match = re.fullmatch(r"sm(\d+)(\d)([a-z]?)(ptx)?", part)
        if match:
            major, minor, suffix, ptx = match.groups()
            archs.append(f"{major}.{minor}{suffix}" + ("+PTX" if ptx else ""))
    return archs
