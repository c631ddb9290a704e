"""When to prune: at once, or gradually over fine-tuning (Zhu & Gupta's cubic schedule, as in
SparseML's gradual magnitude pruning recipes)."""
from __future__ import annotations


def cubic(initial: float, final: float, start: int, end: int, step: int) -> float:
    """Sparsity at ``step`` of a cubic ramp from ``initial`` (until ``start``) to ``final``
    (from ``end``): final + (initial - final) (1 - (step - start) / (end - start))^3. It prunes
    fast while the network has redundant weights and slowly as it runs out of them."""
    if not 0 <= initial <= final < 1:
        raise ValueError(f"cubic schedule needs 0 <= initial <= final < 1, got {initial}, {final}")
    if end < start:
        raise ValueError(f"cubic schedule needs start <= end, got {start}, {end}")
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3
