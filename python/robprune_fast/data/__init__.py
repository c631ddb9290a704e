"""Data sets as uint8 tensors, decoded once and cached; batches served from memory on the device.

Sources: scikit-learn's 8x8 digits (embedded, no files), CIFAR-10 as the official python batches,
as an ImageFolder directory (``train/<class>/*``, ``test/<class>/*``) or as a ``.tar.gz`` of either,
and any user ImageFolder.  Decoded tensors are cached as safetensors keyed by a checksum of the
source, so a changed source invalidates the cache.  An archive's compressed stream is read to its
end, so its own checksum (gzip's CRC-32, bzip2's, xz's) is verified before anything is cached.
Nothing here is ever unpickled with plain ``pickle``: the official batches go through a restricted
unpickler.

One module per job; this file only gathers the public names:

- ``dataset``: Split, Dataset, DataError (what loaders return and raise)
- ``loading``: ``load`` and ``source_root`` (name + source -> Dataset, through the cache)
- ``cache``: the decoded-data cache and the source checksum that keys it
- ``archives``: unpacking a source archive, its compressed stream verified
- ``imagefolder``, ``cifar_batches``, ``digits``: the decoders of each source format
- ``subsets``: ``stratified_subset``, ``fingerprint``
- ``batches``: ``Batches``, ``crop_flip`` (batches and augmentation on the device)
"""

from __future__ import annotations

from .archives import DECOMPRESSORS
from .batches import Batches, crop_flip
from .cache import CACHE_FORMAT, CACHE_TENSORS, default_cache_dir
from .cifar_batches import (CIFAR10_CLASSES, OFFICIAL_TEST, OFFICIAL_TRAIN, RestrictedUnpickler,
                            restricted_load)
from .dataset import DataError, Dataset, Split
from .digits import load_digits
from .imagefolder import IMAGE_EXTENSIONS
from .loading import KNOWN_DATASETS, load, source_root
from .subsets import fingerprint, stratified_subset

__all__ = [
    "Batches", "CACHE_FORMAT", "CACHE_TENSORS", "CIFAR10_CLASSES", "DECOMPRESSORS", "DataError",
    "Dataset", "IMAGE_EXTENSIONS", "KNOWN_DATASETS", "OFFICIAL_TEST", "OFFICIAL_TRAIN",
    "RestrictedUnpickler", "Split", "crop_flip", "default_cache_dir", "fingerprint", "load",
    "load_digits", "restricted_load", "source_root", "stratified_subset",
]
