"""Pruning a converted model (``nn.convert``): which weights each masked layer keeps.

``prune(model, sparsity, strategy=..., scope=..., structure=...)`` sets every masked layer's
mask, with exactly the kept count asked for, and returns a ``PruneReport``:

  strategy   "magnitude" (least |W| first), "random", or "hydra" (importance scores that the
             training objective optimises: ``prune`` attaches them, ``hydra`` trains and
             finishes them; see there)
  scope      "layer": the same keep ratio in every pruned layer (HYDRA's way), or "global":
             one threshold over all of them (magnitude and random only)
  structure  "unstructured"; "channel": whole output units (filters, neurons), which
             ``structured.shrink`` then removes for a physically smaller network; or "n:m"
             (e.g. 2:4, n of every m consecutive inputs of a unit, as recent GPUs run)
  exclude    layer names (module paths) kept dense, or "first" / "last"

The target is a sparsity in [0, 1) or a compression ratio (dense / kept, >= 1), counted over
all conv and linear weights, excluded layers included: the pruned layers make up for the dense
ones. Magnitude and random pruning know nothing of the training objective (Sehwag et al.'s
second insight); HYDRA uses it by design. Pruning again (a gradual schedule, ``schedules``)
never revives a pruned weight: pruned weights score below every kept one.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..nn import masked_modules
from . import hydra, masks, schedules, scores, structured
from .targets import keep_total, resolve_sparsity, split_evenly

STRATEGIES = ("magnitude", "random", "hydra")
SCOPES = ("layer", "global")
STRUCTURES = ("unstructured", "channel", "n:m")

__all__ = ["prune", "PruneReport", "count", "STRATEGIES", "SCOPES", "STRUCTURES", "hydra",
           "schedules", "structured", "resolve_sparsity"]


@dataclasses.dataclass
class PruneReport:
    """What a model keeps: per layer (kept, total) weights, and over all conv/linear weights."""
    layers: dict[str, tuple[int, int]]

    @property
    def kept(self) -> int:
        return sum(k for k, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.layers.values())

    @property
    def sparsity(self) -> float:
        return 1 - self.kept / self.total if self.total else 0.0

    @property
    def compression(self) -> float:
        return self.total / self.kept if self.kept else float("inf")

    def to_json(self) -> dict:
        return {"kept": self.kept, "total": self.total, "sparsity": self.sparsity,
                "compression": self.compression,
                "layers": {name: {"kept": k, "total": n} for name, (k, n) in self.layers.items()}}


def count(model: nn.Module) -> PruneReport:
    """The kept and total weights of every masked layer (the mask HYDRA's scores decide while
    they train)."""
    return PruneReport({name: (int(layer.effective_mask().detach().count_nonzero()), layer.weight.numel())
                        for name, layer in masked_modules(model).items()})


def _excluded(names: list[str], exclude) -> set[str]:
    out = set()
    for item in exclude:
        if item in ("first", "last"):
            out.add(names[0] if item == "first" else names[-1])
        elif item in names:
            out.add(item)
        else:
            raise ValueError(f"exclude names a layer that is not a masked layer of the model: "
                             f"{item!r}; masked layers: {names}")
    return out


def prune(model: nn.Module, sparsity: float | None = None, *, compression: float | None = None,
          strategy: str = "magnitude", scope: str = "layer", structure: str = "unstructured",
          exclude=(), n_m: tuple[int, int] = (2, 4), seed: int = 0) -> PruneReport:
    """Prune model's masked layers in place (see the module docstring); returns what they keep.
    For structure "channel", sparsity is the fraction of output units each pruned layer loses
    (the report gives the weight sparsity that results); "n:m" fixes it at 1 - n/m."""
    layers = masked_modules(model)
    if not layers:
        raise TypeError("prune needs a model with masked layers: convert it first "
                        "(robprune_fast.nn.convert(model))")
    for value, options, name in ((strategy, STRATEGIES, "strategy"), (scope, SCOPES, "scope"),
                                 (structure, STRUCTURES, "structure")):
        if value not in options:
            raise ValueError(f"{name} must be one of {options}, got {value!r}")
    names = list(layers)
    excluded = _excluded(names, exclude)
    pruned = [name for name in names if name not in excluded]
    generator = torch.Generator().manual_seed(seed)
    if structure == "unstructured":
        target = resolve_sparsity(sparsity, compression)
        _unstructured(layers, pruned, excluded, target, strategy, scope, generator)
    elif structure == "channel":
        _channels(model, layers, pruned, resolve_sparsity(sparsity, compression), strategy, generator)
    else:
        if sparsity is not None or compression is not None:
            raise ValueError("n:m pruning fixes the sparsity at 1 - n/m: give n_m, not sparsity")
        if strategy == "hydra":
            raise ValueError("n:m pruning supports strategies 'magnitude' and 'random'")
        for name in pruned:
            s = _scores(layers[name], strategy, generator)
            layers[name].set_mask(masks.n_of_m(s, *n_m))
    for name in excluded:
        layers[name].set_mask(torch.ones_like(layers[name].weight_mask))
    return count(model)


def _scores(layer, strategy, generator):
    return scores.magnitude(layer) if strategy == "magnitude" else scores.random(layer, generator)


def _unstructured(layers, pruned, excluded, target, strategy, scope, generator):
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    keep = keep_total(sizes, excluded, target)
    if scope == "global":
        if strategy == "hydra":
            raise ValueError("HYDRA prunes layer by layer (scope='layer')")
        chosen = masks.top_k_global({n: _scores(layers[n], strategy, generator) for n in pruned}, keep)
        for name in pruned:
            layers[name].set_mask(chosen[name])
        return
    counts = split_evenly({name: sizes[name] for name in pruned}, keep)
    if strategy == "hydra":
        hydra.attach({name: layers[name] for name in pruned}, counts)
        return
    for name in pruned:
        layers[name].set_mask(masks.top_k(_scores(layers[name], strategy, generator), counts[name]))


def _channels(model, layers, pruned, target, strategy, generator):
    if strategy == "hydra":
        raise ValueError("channel pruning supports strategies 'magnitude' and 'random'")
    flat = structured.flat_layers(model)
    last = max(i for i, layer in enumerate(flat) if isinstance(layer, (nn.Linear, nn.Conv2d)))
    for name in pruned:
        layer = layers[name]
        if flat.index(layer) == last:
            continue  # the classes stay
        units = layer.weight.shape[0]
        keep = max(1, units - round(target * units))
        chosen = masks.channels(scores.unit_scores(layer, strategy, generator), keep, layer.weight.shape)
        layer.set_mask(chosen)
        structured.silence_units(flat, flat.index(layer), chosen.reshape(units, -1)[:, 0].bool())
