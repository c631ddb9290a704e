"""Data sets as uint8 tensors, decoded once and cached; batches served from memory on the device.

Sources: scikit-learn's 8x8 digits (embedded, no files), CIFAR-10 as the official python batches,
as an ImageFolder directory (``train/<class>/*``, ``test/<class>/*``) or as a ``.tar.gz`` of either,
and any user ImageFolder.  Decoded tensors are cached as safetensors keyed by a checksum of the
source, so a changed source invalidates the cache.  An archive's compressed stream is read to its
end, so its own checksum (gzip's CRC-32, bzip2's, xz's) is verified before anything is cached.
Nothing here is ever unpickled with plain ``pickle``: the official batches go through a restricted
unpickler.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ._atomic import atomic_write

KNOWN_DATASETS = ("cifar10", "digits", "imagefolder")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
OFFICIAL_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_TEST = "test_batch"
# Bump when the decoded representation changes, so old caches are not reused.  Format 2: caches
# of format 1 may hold a corrupt archive's pixels, decoded before archives were verified.
CACHE_FORMAT = "2"
CACHE_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")
# The compressions tarfile reads, by their magic bytes.  Each module checks the stream's checksum
# when it reaches the stream's end.
DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


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


def default_cache_dir() -> Path:
    """$ROBPRUNE_CACHE, else the user's cache folder: never inside the repository."""
    if os.environ.get("ROBPRUNE_CACHE"):
        return Path(os.environ["ROBPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robprune_fast"


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


# --- digits -------------------------------------------------------------------------------------

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


# --- cache --------------------------------------------------------------------------------------

def _load_cached(name: str, source: Path, cache: Path) -> Dataset:
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    key = _checksum(source)
    cached = cache / f"{name}-{key[:20]}.safetensors"
    if cached.exists():
        try:
            return _dataset(name, *_read_cache(cached))
        except DataError as e:  # the source is still there: decoding it again repairs the cache
            warnings.warn(f"{e}; decoding {source} again", stacklevel=3)
    tensors, classes = _decode(_root(source, key, cache))
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda tmp: save_file(
        tensors, tmp, metadata={"classes": json.dumps(classes), "source": str(source)}))
    return _dataset(name, tensors, classes)


def _dataset(name: str, tensors: dict[str, torch.Tensor], classes: tuple[str, ...]) -> Dataset:
    return Dataset(name, Split(tensors["train_images"], tensors["train_labels"]),
                   Split(tensors["test_images"], tensors["test_labels"]), classes)


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
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


def source_root(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds a source's data; an archive is unpacked (once) into the cache first.

    For tools that read the files themselves, e.g. a torchvision ImageFolder baseline.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _root(source, _checksum(source), cache)


def _root(source: Path, key: str, cache: Path) -> Path:
    return _find_root(_unpack(source, key, cache) if source.is_file() else source)


def _checksum(source: Path) -> str:
    """sha256 over the archive, or over every file's relative path and bytes in a folder."""
    h = hashlib.sha256(CACHE_FORMAT.encode())
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(source)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _unpack(archive: Path, key: str, cache: Path) -> Path:
    """Unpack an archive once into the cache, atomically (a killed unpack leaves no half folder)."""
    target = cache / "extracted" / key[:20]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        try:
            _extract(archive, tmp)
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise DataError(f"{archive}: cannot unpack archive ({type(e).__name__}: {e})") from e
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract(archive: Path, dest: Path) -> None:
    """Extract a (compressed) tar in one pass, then verify the compressed stream's checksum."""
    with _decompressed(archive) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, links out, devices
        # tarfile stops at the tar's end-of-archive blocks, before the compressed stream's
        # trailer: its checksum is only verified once the stream is read to its end.
        while stream.read(1 << 20):
            pass


def _decompressed(archive: Path):
    with open(archive, "rb") as f:
        magic = f.read(6)
    for prefix, opener in DECOMPRESSORS:
        if magic.startswith(prefix):
            return opener(archive, "rb")
    return open(archive, "rb")  # an uncompressed tar: it carries no checksum of its contents


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _find_root(path: Path) -> Path:
    """Descend through single-folder wrappers (cifar-10-batches-py/, cifar10-jpeg/) to the data."""
    while True:
        if (path / OFFICIAL_TEST).exists() or (path / OFFICIAL_TRAIN[0]).exists():
            return path
        if (path / "train").is_dir() and (path / "test").is_dir():
            return path
        entries = _visible(path)
        if len(entries) != 1 or not entries[0].is_dir():
            raise DataError(f"{path}: found neither the official CIFAR-10 batches "
                            f"({', '.join(OFFICIAL_TRAIN)}, {OFFICIAL_TEST}) nor an ImageFolder "
                            "layout (train/<class>/..., test/<class>/...)")
        path = entries[0]


def _decode(root: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    if (root / "train").is_dir():
        train_x, train_y, classes = _decode_image_folder(root / "train")
        test_x, test_y, test_classes = _decode_image_folder(root / "test")
        if test_classes != classes:
            raise DataError(f"{root / 'test'}: classes {list(test_classes)} differ from "
                            f"train classes {list(classes)}")
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(f"{root / 'test'}: images are {tuple(test_x.shape[1:])}, "
                            f"train images are {tuple(train_x.shape[1:])}")
    else:
        train_x, train_y = _concat([_read_official_batch(root / n) for n in OFFICIAL_TRAIN])
        test_x, test_y = _read_official_batch(root / OFFICIAL_TEST)
        classes = _read_official_classes(root / "batches.meta")
    tensors = {"train_images": train_x, "train_labels": train_y,
               "test_images": test_x, "test_labels": test_y}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, classes


def _concat(parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- ImageFolder --------------------------------------------------------------------------------

def _decode_image_folder(folder: Path):
    class_dirs = [p for p in _visible(folder) if p.is_dir()]
    if not class_dirs:
        raise DataError(f"{folder}: no class folders")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        images = [p for p in _visible(d) if p.suffix.lower() in IMAGE_EXTENSIONS]
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


# --- official CIFAR-10 python batches -----------------------------------------------------------

class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR-10 batches contain: dicts, lists, bytes, ints and numpy arrays.

    Any other global (os.system, builtins.eval, ...) is refused before it can be called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not a type the CIFAR-10 batch format uses")
        return super().find_class(module, name)


def restricted_load(path: Path):
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing CIFAR-10 batch file: {path}") from None
    try:
        # The batches were pickled by Python 2: their strings are bytes.
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}") from e
    except Exception as e:  # truncated or garbled pickles raise a zoo of error types
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e


def _batch_dict(path: Path) -> dict:
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_official_batch(path: Path):
    batch = _batch_dict(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape N x 3072")
    if data.shape[0] == 0:
        raise DataError(f"{path}: the batch holds no images")
    if not isinstance(labels, list):
        raise DataError(f"{path}: 'labels' must be a list of ints in 0..9, found "
                        f"{type(labels).__name__}")
    if len(labels) != data.shape[0]:
        raise DataError(f"{path}: 'labels' must be a list of {data.shape[0]} ints (one per image), "
                        f"found {len(labels)}")
    for i, label in enumerate(labels):
        problem = _label_problem(label)
        if problem:
            raise DataError(f"{path}: 'labels' must be ints in 0..9, but labels[{i}] is {problem}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _label_problem(label) -> str | None:
    """What makes ``label`` no CIFAR-10 label, or None if it is one."""
    if type(label) is not int:  # bool is an int subclass; a float would be truncated silently
        return f"a {type(label).__name__}"
    if not 0 <= label <= 9:
        # Huge ints: printing one of thousands of digits would itself fail.
        return str(label) if label.bit_length() <= 64 else f"a {label.bit_length()}-bit int"
    return None


def _read_official_classes(path: Path) -> tuple[str, ...]:
    if not path.exists():
        return CIFAR10_CLASSES
    names = _batch_dict(path).get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{path}: 'label_names' must be a list of 10 names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


# --- subsets ------------------------------------------------------------------------------------

def stratified_subset(split: Split, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``n`` points of ``split``, every class in proportion to its share.

    Class k gets floor(n * count_k / N) points, and the points left over go to the largest
    remainders (ties to the lower class), so shares are exact up to one point.  Within a class the
    points are drawn without replacement by a generator seeded with ``seed`` alone.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > len(split):
        raise ValueError(f"n={n} exceeds the split's {len(split)} points")
    labels = split.labels.cpu()
    counts = torch.bincount(labels).tolist()
    quotas = [n * c // len(split) for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda k: (-(n * counts[k] % len(split)), k))
    for k in by_remainder[:n - sum(quotas)]:
        quotas[k] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for k, quota in enumerate(quotas):
        members = torch.nonzero(labels == k).flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:quota]])
    return torch.sort(torch.cat(chosen)).values


def fingerprint(split: Split) -> dict:
    """What identifies a split's contents: its size, image shape and dtype, and sha256 digests of
    its labels and of all its image bytes (about 0.12 s for CIFAR-10's 150 MB of training images)."""
    return {"size": len(split), "shape": list(split.images.shape[1:]),
            "dtype": str(split.images.dtype).removeprefix("torch."),
            "labels_sha256": _sha256(split.labels.to(torch.int64)),
            "images_sha256": _sha256(split.images)}


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()


# --- batches on the device ----------------------------------------------------------------------

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
