"""Checkpoints as safetensors plus a JSON sidecar; nothing is ever unpickled.

The safetensors file is the whole truth: model tensors under ``model.<key>``, optimizer tensors
under ``optim.<param index>.<name>``, and the run's metadata (epoch, config, metrics, the
optimizer's class and non-tensor state) as JSON in the safetensors header.  It is written
atomically, so a kill leaves either the old or the new checkpoint.  The ``.json`` sidecar is a
readable copy of the metadata for people and reports; loading never depends on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ._atomic import atomic_write


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit: the message names the file."""


def sidecar(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         meta: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Copies: safetensors refuses tensors that share storage (tied weights, views).
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous()
               for k, v in model.state_dict().items()}
    header = {"meta": json.dumps(meta or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars = {}
        for pid, entry in state["state"].items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{pid}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars[f"{pid}.{name}"] = value
        # The class: another optimizer would take the state and fail only at its first step.
        header["optim"] = json.dumps({"class": type(optimizer).__name__,
                                      "param_groups": state["param_groups"], "scalars": scalars})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    text = json.dumps(meta or {}, indent=2, sort_keys=True)
    atomic_write(sidecar(path), lambda tmp: Path(tmp).write_text(text))


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    return _json(path, _header(path), "meta")


def load(path: str | os.PathLike, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (strictly) and, if given, the optimizer state; return the metadata."""
    path = Path(path)
    header = _header(path)
    meta = _json(path, header, "meta")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: checkpoint does not match the model: {e}") from e
    if optimizer is not None:
        _load_optimizer(path, header, tensors, optimizer)
    return meta


def _header(path: Path) -> dict[str, str]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e


def _json(path: Path, header: dict[str, str], key: str) -> dict:
    try:
        return json.loads(header.get(key, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (its {key!r} header: {e})") from e


def _load_optimizer(path: Path, header: dict[str, str], tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> None:
    if "optim" not in header:
        raise CheckpointError(f"{path}: checkpoint holds no optimizer state")
    optim = _json(path, header, "optim")
    saved, wanted = optim.get("class"), type(optimizer).__name__
    # None: a checkpoint written before the class was stored.
    if saved is not None and saved != wanted:
        raise CheckpointError(f"{path}: the checkpoint holds {saved} state, the optimizer is {wanted}")
    try:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for key, value in optim["scalars"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optim["param_groups"]})
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit the optimizer "
                              f"({type(e).__name__}: {e})") from e
