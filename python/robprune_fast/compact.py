"""The compact file format of a pruned model: only the unpruned weights and their positions.

A safetensors file (nothing is unpickled) whose header says what each tensor is. For every masked
layer (``nn.MaskedLinear`` / ``nn.MaskedConv2d``, and the compressed ``nn.CompressedLinear`` /
``nn.CompressedConv2d``) it stores the kept weights in row-major order,
``<name>.weight.values``, and their positions in whichever of two encodings is smaller:

  bitmap  one bit per weight, ``<name>.weight.bitmap`` (uint8, little-endian bit order);
          wins at moderate sparsity (8 bits per weight: 1/32 of float32's size, whatever is kept)
  delta   the gap before each kept weight (positions p_0 < p_1 < ...: g_i = p_i - p_{i-1} - 1,
          p_{-1} = -1) as one byte, ``<name>.weight.gaps8``, with 255 meaning "look in
          ``<name>.weight.gaps32``" (uint32, one per escape, in order); wins at high sparsity
          (about one byte per kept weight)

Every other tensor of the state dict (biases, batch-norm statistics, unmasked layers) is stored
as it is. At 90% sparsity the file is about 1/8 of the dense checkpoint, at 99% about 1/80.

The header (safetensors metadata) holds the format version, each masked layer's shape, dtype,
number of kept weights and encoding, and a sha256 over every tensor's bytes, so a corrupt or
truncated file is refused with an error naming it, never loaded with changed weights. Loading
into a converted model sets weights and masks; into a compressed one, its kept weights; into a
plain model (or a stripped one) bakes the zeros in. Either way the outputs are exactly those of
the saved model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._atomic import atomic_write
from .nn import CompressedConv2d, CompressedLinear, MaskedConv2d, MaskedLinear, kept_state

FORMAT = "robprune_fast.compact/1"
_PRUNED = (MaskedLinear, MaskedConv2d, CompressedLinear, CompressedConv2d)
_ESCAPE = 255


class CompactFileError(ValueError):
    """A compact file that cannot be loaded: the message names the file and what is wrong."""


# --- positions ---------------------------------------------------------------------------------------

def _encode_positions(mask: torch.Tensor) -> tuple[str, dict[str, torch.Tensor]]:
    """The smaller encoding of mask's nonzero positions: ("bitmap" | "delta", tensors)."""
    flat = mask.detach().reshape(-1).cpu().numpy() != 0
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    escaped = gaps >= _ESCAPE
    delta_bytes = positions.size + 4 * int(escaped.sum())
    if delta_bytes < (flat.size + 7) // 8:
        gaps8 = np.where(escaped, _ESCAPE, gaps).astype(np.uint8)
        gaps32 = gaps[escaped].astype(np.uint32)
        return "delta", {"gaps8": torch.from_numpy(gaps8), "gaps32": _as_int32(gaps32)}
    return "bitmap", {"bitmap": torch.from_numpy(np.packbits(flat, bitorder="little"))}


def _as_int32(values: np.ndarray) -> torch.Tensor:
    # safetensors has no uint32 dtype in every torch; the bits are kept in an int32 tensor.
    return torch.from_numpy(values.astype(np.uint32).view(np.int32))


def _decode_positions(encoding: str, parts: dict[str, torch.Tensor], numel: int,
                      kept: int) -> np.ndarray:
    if encoding == "bitmap":
        bits = np.unpackbits(parts["bitmap"].numpy(), bitorder="little", count=numel)
        positions = np.flatnonzero(bits)
    else:
        gaps = parts["gaps8"].numpy().astype(np.int64)
        escapes = np.flatnonzero(gaps == _ESCAPE)
        wide = parts["gaps32"].numpy().view(np.uint32).astype(np.int64)
        if wide.size != escapes.size:
            raise ValueError(f"{escapes.size} escaped gaps but {wide.size} wide ones")
        gaps[escapes] = wide
        positions = np.cumsum(gaps + 1) - 1
    if positions.size != kept or (positions.size and (positions[-1] >= numel or positions[0] < 0)):
        raise ValueError(f"positions do not describe {kept} weights among {numel}")
    return positions


# --- save -----------------------------------------------------------------------------------------------

def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():  # (an empty tensor has no bytes, and may not be viewed as bytes)
            h.update(t.reshape(-1).clone().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_compact(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> dict:
    """Write model's compact file (atomically); returns its header. ``meta`` (JSON-able) is
    stored beside it, e.g. the model's name and how it was pruned."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _PRUNED)}
    masked_keys = {f"{name}.{key}" for name in layers
                   for key in ("weight", "weight_mask", "weight_values", "weight_row_ptr", "weight_col")}
    tensors, header = {}, {}
    for key, value in model.state_dict().items():
        if key not in masked_keys:
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    for name, layer in layers.items():
        mask = layer.weight_mask.detach()
        encoding, parts = _encode_positions(mask)
        kept = layer.weight.detach()[mask != 0]
        tensors[f"{name}.weight.values"] = kept.to("cpu", copy=True).contiguous()
        tensors.update({f"{name}.weight.{k}": v for k, v in parts.items()})
        header[name] = {"shape": list(layer.weight.shape), "dtype": str(layer.weight.dtype),
                        "kept": int(kept.numel()), "encoding": encoding}
    metadata = {"format": FORMAT, "masked": json.dumps(header), "meta": json.dumps(meta or {}),
                "sha256": _digest(tensors)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return metadata


# --- load ----------------------------------------------------------------------------------------------

def read_compact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict of a compact file (dense weights with zeros where pruned, plus a
    ``<name>.weight_mask`` per masked layer) and its user meta; CompactFileError on any damage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compact model file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CompactFileError(f"{path}: not a readable compact model file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise CompactFileError(f"{path}: not a {FORMAT} file (format {metadata.get('format')!r})")
    if _digest(tensors) != metadata.get("sha256"):
        raise CompactFileError(f"{path}: checksum mismatch: the file is corrupt")
    try:
        header, meta = json.loads(metadata["masked"]), json.loads(metadata["meta"])
        state = {k: v for k, v in tensors.items()
                 if not any(k.startswith(f"{name}.weight.") for name in header)}
        for name, info in header.items():
            state.update(_dense_layer(name, info, tensors))
    except (KeyError, ValueError, TypeError) as e:
        raise CompactFileError(f"{path}: malformed header or tensors ({e})") from e
    return state, meta


def _dense_layer(name: str, info: dict, tensors: dict) -> dict[str, torch.Tensor]:
    shape, kept = tuple(info["shape"]), int(info["kept"])
    numel = int(np.prod(shape))
    encoding = info["encoding"]
    keys = {"bitmap": ("bitmap",), "delta": ("gaps8", "gaps32")}[encoding]
    positions = _decode_positions(encoding, {k: tensors[f"{name}.weight.{k}"] for k in keys},
                                  numel, kept)
    values = tensors[f"{name}.weight.values"]
    if values.numel() != kept or str(values.dtype) != info["dtype"]:
        raise ValueError(f"{name}: {values.numel()} {values.dtype} values, header says {kept} "
                         f"{info['dtype']}")
    weight = torch.zeros(numel, dtype=values.dtype)
    mask = torch.zeros(numel, dtype=values.dtype)
    index = torch.from_numpy(positions)
    weight[index] = values
    mask[index] = 1
    return {f"{name}.weight": weight.view(shape), f"{name}.weight_mask": mask.view(shape)}


def load_compact(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a compact file into model, strictly; returns the stored meta. Masked layers get
    their weights and masks; a plain nn.Linear / nn.Conv2d where the file has a masked layer
    gets the weights with the zeros baked in."""
    state, meta = read_compact(path)
    modules = dict(model.named_modules())
    for name in {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_mask")}:
        module = modules.get(name)
        if isinstance(module, (CompressedLinear, CompressedConv2d)):
            state.update(kept_state(name, state.pop(f"{name}.weight"), state.pop(f"{name}.weight_mask")))
        elif not isinstance(module, (MaskedLinear, MaskedConv2d)):
            state.pop(f"{name}.weight_mask")  # baked in: the weight already holds the zeros
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CompactFileError(f"{path}: does not match the model: {e}") from e
    return meta
