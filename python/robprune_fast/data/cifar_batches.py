"""The official CIFAR-10 python batches (``cifar-10-batches-py``), read safely.

The batches are pickles, and a plain ``pickle.load`` of a downloaded file runs whatever code it
names.  Here they go through a restricted unpickler that admits only the types the format uses,
and every field is checked before it becomes a tensor.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from .dataset import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
OFFICIAL_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_TEST = "test_batch"


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


def read_official_batch(path: Path):
    """(images N x 3 x 32 x 32 uint8, labels N int64) of one batch file."""
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


def read_official_classes(path: Path) -> tuple[str, ...]:
    """The class names in ``batches.meta``; the standard names when the file is absent."""
    if not path.exists():
        return CIFAR10_CLASSES
    names = _batch_dict(path).get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{path}: 'label_names' must be a list of 10 names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
