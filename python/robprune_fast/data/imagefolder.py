"""Decoding an ImageFolder split (``<split>/<class>/<image>``) into one uint8 array.

Class folders are taken in sorted order, so label k is the k-th class name; every image must have
the first one's size.  Hidden entries (names starting with ".") are skipped.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def visible(path: Path) -> list[Path]:
    """The entries of a folder that are not hidden, sorted."""
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def decode_image_folder(folder: Path):
    """(images N x 3 x H x W uint8, labels N int64, class names) of one split's folder."""
    class_dirs = [p for p in visible(folder) if p.is_dir()]
    if not class_dirs:
        raise DataError(f"{folder}: no class folders")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        images = [p for p in visible(d) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise DataError(f"{d}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += images
        labels += [label] * len(images)
    first = _read_image(files[0])
    out = np.empty((len(files), *first.shape), dtype=np.uint8)

    def fill(i):
        img = _read_image(files[i])
        if img.shape != first.shape:
            raise DataError(f"{files[i]}: image is {img.shape[1]}x{img.shape[0]}, but "
                            f"{files[0]} is {first.shape[1]}x{first.shape[0]}; all images must match")
        out[i] = img

    # PIL releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(files))))
    return (out.transpose(0, 3, 1, 2), np.asarray(labels, dtype=np.int64),
            tuple(d.name for d in class_dirs))


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    # PIL's errors for truncated or foreign files, and for images too large to decode safely.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e
