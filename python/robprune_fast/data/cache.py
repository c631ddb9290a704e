"""The decoded-data cache: one safetensors file per source, keyed by a checksum of the source.

Decoding a source is slow and reading tensors back is fast, so a source is decoded once.  The key
covers every byte of the source, so a changed source invalidates the cache; a cache file that
cannot be read, or holds something else, is a DataError, so the caller can decode again.  The
cache is safetensors, never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._atomic import atomic_write
from .dataset import DataError

# Bump when the decoded representation changes, so old caches are not reused.  Format 2: caches
# of format 1 may hold a corrupt archive's pixels, decoded before archives were verified.
CACHE_FORMAT = "2"
CACHE_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")


def default_cache_dir() -> Path:
    """$ROBPRUNE_CACHE, else the user's cache folder: never inside the repository."""
    if os.environ.get("ROBPRUNE_CACHE"):
        return Path(os.environ["ROBPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robprune_fast"


def checksum(source: Path) -> str:
    """sha256 over the archive, or over every file's relative path and bytes in a folder."""
    h = hashlib.sha256(CACHE_FORMAT.encode())
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(source)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_cache(path: Path, tensors: dict[str, torch.Tensor], classes: tuple[str, ...],
                source: Path) -> None:
    """Write a decode cache atomically: a killed writer leaves no half file to be read later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(
        tensors, tmp, metadata={"classes": json.dumps(classes), "source": str(source)}))


def read_cache(path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The tensors and class names of a decode cache; DataError naming it if it is not one."""
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            classes = tuple(json.loads((f.metadata() or {})["classes"]))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: unreadable decoded-data cache ({type(e).__name__}: {e})") from e
    if sorted(tensors) != sorted(CACHE_TENSORS):
        raise DataError(f"{path}: not a decoded-data cache: holds {sorted(tensors)}, "
                        f"expected {list(CACHE_TENSORS)}")
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.dtype != torch.int64 \
                or labels.shape != images.shape[:1] or not len(labels) \
                or not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
            raise DataError(f"{path}: not a decoded-data cache: its {split} tensors are "
                            f"{images.dtype} {tuple(images.shape)} images and {labels.dtype} "
                            f"{tuple(labels.shape)} labels for {len(classes)} classes")
    return tensors, classes
