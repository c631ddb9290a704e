"""What every loader returns (Split, Dataset) and what it raises on a bad source (DataError)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A source that cannot be read: the message names the offending file or folder."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, N x C x H x W, pixel values 0..255
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return self.labels.numel()

    def select(self, indices: torch.Tensor) -> "Split":
        return Split(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])
