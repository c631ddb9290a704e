"""Masks from scores, with exactly the number of ones asked for: top-k (per layer or over all
layers at once), N:M groups, whole output channels. Ties are broken by position (a stable
sort), so the same scores always give the same mask."""
from __future__ import annotations

import torch


def top_k(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Binary mask (scores' shape and dtype) keeping the keep largest scores."""
    flat = scores.detach().flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    return torch.zeros_like(flat).index_fill_(0, order, 1.0).view_as(scores)


def top_k_global(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Masks keeping the keep largest scores over all the layers together."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().to(torch.float64).cpu() for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    keep_flat = torch.zeros_like(flat).index_fill_(0, order, 1.0)
    out, start = {}, 0
    for name in names:
        s = scores[name]
        out[name] = keep_flat[start:start + s.numel()].view_as(s).to(s)
        start += s.numel()
    return out


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Binary mask keeping the n largest of every m consecutive weights along each output
    unit's inputs (N:M sparsity, e.g. 2:4, which recent GPUs run in hardware)."""
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    rows = scores.detach().reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"N:M sparsity needs each output unit's {rows.shape[1]} inputs to be a "
                         f"multiple of m = {m}")
    groups = rows.reshape(rows.shape[0], -1, m)
    # A stable sort within each group: ties keep the earlier weight.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups).scatter_(-1, order, 1.0)
    return mask.reshape(scores.shape)


def channels(unit_scores: torch.Tensor, keep: int, weight_shape) -> torch.Tensor:
    """Binary mask of weight_shape keeping whole output units: the keep rows (filters) with
    the largest scores (unit_scores: one per output unit)."""
    rows = top_k(unit_scores, keep)
    return rows.view(-1, *([1] * (len(weight_shape) - 1))).expand(weight_shape).contiguous()
