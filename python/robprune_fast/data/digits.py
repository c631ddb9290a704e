"""scikit-learn's 8x8 digits: embedded in the package, so it needs no files and no cache."""

from __future__ import annotations

import numpy as np
import torch

from .dataset import Dataset, Split


def load_digits(test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 8x8 digits with a fixed stratified split (numpy's frozen legacy RNG)."""
    from sklearn.datasets import load_digits as sk_digits  # optional import: only digits needs it

    bunch = sk_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N x 1 x 8 x 8
    labels = bunch.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    split = lambda m: Split(torch.from_numpy(images[m].copy()), torch.from_numpy(labels[m].copy()))
    return Dataset("digits", split(~is_test), split(is_test), tuple(str(c) for c in range(10)))
