"""How many weights each layer keeps: the target as sparsity or compression, counted over all
conv and linear weights (excluded layers included), split exactly over the layers."""
from __future__ import annotations

import math


def resolve_sparsity(sparsity: float | None = None, compression: float | None = None) -> float:
    """The fraction of weights to remove, from exactly one of sparsity (in [0, 1)) or
    compression (dense weights / kept weights, >= 1)."""
    if (sparsity is None) == (compression is None):
        raise ValueError("give exactly one of sparsity (in [0, 1)) or compression (>= 1)")
    if sparsity is not None:
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
        return float(sparsity)
    if not (isinstance(compression, (int, float)) and math.isfinite(compression) and compression >= 1):
        raise ValueError(f"compression must be a finite number >= 1, got {compression!r}")
    return 1.0 - 1.0 / compression


def keep_total(sizes: dict[str, int], excluded: set[str], sparsity: float) -> int:
    """Weights the prunable layers keep together, so that all layers (excluded ones dense)
    keep round((1 - sparsity) * total)."""
    total = sum(sizes.values())
    dense = sum(sizes[name] for name in excluded)
    keep = round((1 - sparsity) * total) - dense
    if keep < 0:
        raise ValueError(f"sparsity {sparsity:g} cannot be reached with layers {sorted(excluded)} "
                         f"left dense: they alone hold {dense} of {total} weights "
                         f"({dense / total:.1%})")
    return keep


def split_evenly(sizes: dict[str, int], keep: int) -> dict[str, int]:
    """keep spread over the layers in proportion to their sizes (the same keep ratio in every
    layer, as HYDRA and layer-wise magnitude pruning use), summing to keep exactly (largest
    remainders round up)."""
    total = sum(sizes.values())
    if total == 0:
        return {name: 0 for name in sizes}
    exact = {name: keep * n / total for name, n in sizes.items()}
    counts = {name: math.floor(v) for name, v in exact.items()}
    short = keep - sum(counts.values())
    by_remainder = sorted(sizes, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[:short]:
        counts[name] += 1
    return counts
