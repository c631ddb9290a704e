"""Checkpoints as safetensors plus a JSON sidecar; nothing is ever unpickled.

The safetensors file is the whole truth: model tensors under ``model.<key>``, optimizer tensors
under ``optim.<param index>.<name>``, and the run's metadata (epoch, config, metrics, the
optimizer's non-tensor state) as JSON in the safetensors header.  It is written atomically, so a
kill leaves either the old or the new checkpoint.  The ``.json`` sidecar is a readable copy of the
metadata for people and reports; loading never depends on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ._atomic import atomic_write


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
        header["optim"] = json.dumps({"param_groups": state["param_groups"], "scalars": scalars})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    text = json.dumps(meta or {}, indent=2, sort_keys=True)
    atomic_write(sidecar(path), lambda tmp: Path(tmp).write_text(text))


def read_meta(path: str | os.PathLike) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def load(path: str | os.PathLike, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (strictly) and, if given, the optimizer state; return the metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: checkpoint does not match the model: {e}") from e
    if optimizer is not None:
        if "optim" not in header:
            raise ValueError(f"{path}: checkpoint holds no optimizer state")
        optim = json.loads(header["optim"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for key, value in optim["scalars"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optim["param_groups"]})
    return json.loads(header.get("meta", "{}"))
