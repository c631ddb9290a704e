"""The registry of objectives: factories (hyper-parameters -> Objective) found by name.

It lives apart from the objectives themselves so that every objective module can import
``register`` without importing the package that gathers them (no import cycle).
"""

from __future__ import annotations

from typing import Callable

import torch

Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float],
                     tuple[torch.Tensor, torch.Tensor]]
_FACTORIES: dict[str, Callable[..., Objective]] = {}


def register(name: str):
    """Decorator adding an objective factory (hyper-parameters -> Objective) to the registry."""
    def add(factory):
        if name in _FACTORIES:
            raise ValueError(f"objective {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory
    return add


def known() -> list[str]:
    return sorted(_FACTORIES)


def build(name: str, **hyper) -> Objective:
    """The objective ``name`` with its hyper-parameters.  It carries ``spec`` = {"name": name,
    **hyper}, which says what it optimises: a run resumed with another spec is refused."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(known())}")
    objective = _FACTORIES[name](**hyper)
    objective.spec = {"name": name, **hyper}
    return objective
