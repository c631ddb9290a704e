"""Batches served from memory on the device, with augmentation done there as one gather.

A decoded split is small enough to live on the device whole (CIFAR-10's training images are
150 MB), so batches need no worker processes and no host-to-device copy per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import Split


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              pad: int) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a whole batch in one gather.

    ``dy``, ``dx`` in [0, 2 * pad] are the crop offsets in the padded image; ``flip`` is boolean.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dev = images.device
    rows = dy[:, None] + torch.arange(h, device=dev)  # N x H
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # N x W
    return padded[torch.arange(n, device=dev)[:, None, None, None],
                  torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class Batches:
    """Serves (x in [0, 1] float32, y int64) batches of a split from memory on ``device``.

    An epoch's shuffle and augmentation draws come from a generator seeded by (seed, epoch) alone,
    so any epoch can be replayed, or resumed at any step, bit for bit.
    """

    def __init__(self, split: Split, batch_size: int, device="cpu", shuffle: bool = True,
                 augment: bool = False, pad: int = 4, drop_last: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment, self.pad = batch_size, shuffle, augment, pad
        self.drop_last, self.seed = drop_last, seed

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0, start: int = 0):
        """Yield the batches of ``epoch`` from batch index ``start`` on."""
        n = len(self.labels)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.augment:
            offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g).to(self.device)
            flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
        order = order.to(self.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                pos = slice(b * self.batch_size, b * self.batch_size + len(idx))
                x = crop_flip(x, offsets[0, pos], offsets[1, pos], flips[pos], self.pad)
            yield x.float().div_(255), self.labels[idx]

    def __iter__(self):
        return self.epoch(0)
