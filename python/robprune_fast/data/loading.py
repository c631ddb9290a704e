"""``load``: a data set by name, from its source on disk through the decode cache.

A source is a folder or an archive of one; the data may sit below single-folder wrappers
(``cifar-10-batches-py/``, ``cifar10-jpeg/``).  Its layout picks the decoder: the official CIFAR-10
python batches, or an ImageFolder with ``train/`` and ``test/``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .archives import unpack
from .cache import checksum, default_cache_dir, read_cache, write_cache
from .cifar_batches import OFFICIAL_TEST, OFFICIAL_TRAIN, read_official_batch, read_official_classes
from .dataset import DataError, Dataset, Split
from .digits import load_digits
from .imagefolder import decode_image_folder, visible

KNOWN_DATASETS = ("cifar10", "digits", "imagefolder")


def load(name: str, source: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a data set by name.  ``source`` is a directory or archive for cifar10/imagefolder."""
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    if name == "digits":
        if source is not None:
            raise ValueError("dataset 'digits' is embedded and takes no source")
        return load_digits()
    if source is None:
        raise ValueError(f"dataset {name!r} needs a source: a folder of the official CIFAR-10 python "
                         "batches, an ImageFolder folder with train/ and test/, or a .tar.gz of either")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dataset = _load_cached(name, Path(source), cache)
    if name == "cifar10" and dataset.num_classes != 10:
        raise DataError(f"{source}: CIFAR-10 needs 10 classes, found {dataset.num_classes}")
    return dataset


def _load_cached(name: str, source: Path, cache: Path) -> Dataset:
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    key = checksum(source)
    cached = cache / f"{name}-{key[:20]}.safetensors"
    if cached.exists():
        try:
            return _dataset(name, *read_cache(cached))
        except DataError as e:  # the source is still there: decoding it again repairs the cache
            warnings.warn(f"{e}; decoding {source} again", stacklevel=3)  # points at load's caller
    tensors, classes = _decode(_root(source, key, cache))
    write_cache(cached, tensors, classes, source)
    return _dataset(name, tensors, classes)


def _dataset(name: str, tensors: dict[str, torch.Tensor], classes: tuple[str, ...]) -> Dataset:
    return Dataset(name, Split(tensors["train_images"], tensors["train_labels"]),
                   Split(tensors["test_images"], tensors["test_labels"]), classes)


def source_root(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds a source's data; an archive is unpacked (once) into the cache first.

    For tools that read the files themselves, e.g. a torchvision ImageFolder baseline.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _root(source, checksum(source), cache)


def _root(source: Path, key: str, cache: Path) -> Path:
    return _find_root(unpack(source, key, cache) if source.is_file() else source)


def _find_root(path: Path) -> Path:
    """Descend through single-folder wrappers (cifar-10-batches-py/, cifar10-jpeg/) to the data."""
    while True:
        if (path / OFFICIAL_TEST).exists() or (path / OFFICIAL_TRAIN[0]).exists():
            return path
        if (path / "train").is_dir() and (path / "test").is_dir():
            return path
        entries = visible(path)
        if len(entries) != 1 or not entries[0].is_dir():
            raise DataError(f"{path}: found neither the official CIFAR-10 batches "
                            f"({', '.join(OFFICIAL_TRAIN)}, {OFFICIAL_TEST}) nor an ImageFolder "
                            "layout (train/<class>/..., test/<class>/...)")
        path = entries[0]


def _decode(root: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The cache's tensors (``cache.CACHE_TENSORS``) and class names of the data at ``root``."""
    if (root / "train").is_dir():
        train_x, train_y, classes = decode_image_folder(root / "train")
        test_x, test_y, test_classes = decode_image_folder(root / "test")
        if test_classes != classes:
            raise DataError(f"{root / 'test'}: classes {list(test_classes)} differ from "
                            f"train classes {list(classes)}")
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(f"{root / 'test'}: images are {tuple(test_x.shape[1:])}, "
                            f"train images are {tuple(train_x.shape[1:])}")
    else:
        train_x, train_y = _concat([read_official_batch(root / n) for n in OFFICIAL_TRAIN])
        test_x, test_y = read_official_batch(root / OFFICIAL_TEST)
        classes = read_official_classes(root / "batches.meta")
    tensors = {"train_images": train_x, "train_labels": train_y,
               "test_images": test_x, "test_labels": test_y}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, classes


def _concat(parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
