"""Data: every source layout, the decode cache, the restricted unpickler, bad input, batches."""

import os
import pickle
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import save_file

from robprune_fast import data

CLASSES = data.CIFAR10_CLASSES


def write_image_folder(root, n_train=2, n_test=1, size=32, classes=CLASSES, seed=0, ext=".png"):
    """A tiny ImageFolder (PNG or BMP: pixels survive exactly); returns the expected uint8 tensors."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i:04d}{ext}")
                images.append(img.transpose(2, 0, 1))
                labels.append(label)
        expected[split] = (torch.from_numpy(np.stack(images)), torch.tensor(labels))
    return expected


def official_batch(name, pixels, labels):
    return pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": pixels,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(len(pixels))]},
                        protocol=2)


def write_official_batches(root, n=3, seed=0):
    """The official cifar-10-batches-py layout, pickled as the original (protocol 2, bytes keys)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    expected = {}
    for name in (*data.OFFICIAL_TRAIN, data.OFFICIAL_TEST):
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        (root / name).write_bytes(official_batch(name, pixels, labels))
        expected[name] = (torch.from_numpy(pixels.reshape(n, 3, 32, 32)), torch.tensor(labels))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": n}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    train = [expected[name] for name in data.OFFICIAL_TRAIN]
    return {"train": (torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])),
            "test": expected[data.OFFICIAL_TEST]}


def make_tar(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def assert_matches(dataset, expected):
    for split in ("train", "test"):
        images, labels = expected[split]
        got = getattr(dataset, split)
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
        assert torch.equal(got.images, images)
        assert torch.equal(got.labels, labels)


# --- digits --------------------------------------------------------------------------------------

def test_digits_fixed_stratified_split():
    a, b = data.load("digits"), data.load("digits")
    assert a.train.images.shape == (1347, 1, 8, 8) and a.test.images.shape == (450, 1, 8, 8)
    assert a.train.images.dtype == torch.uint8 and a.train.images.max() == 255
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 44 and counts.max() <= 46  # 25% of every class
    assert a.classes == tuple("0123456789") and a.input_shape == (1, 8, 8)


def test_digits_takes_no_source(tmp_path):
    with pytest.raises(ValueError, match="takes no source"):
        data.load("digits", tmp_path)


# --- every layout --------------------------------------------------------------------------------

def test_image_folder_directory(tmp_path):
    expected = write_image_folder(tmp_path / "cifar10-jpeg")
    dataset = data.load("cifar10", tmp_path / "cifar10-jpeg", cache_dir=tmp_path / "cache")
    assert_matches(dataset, expected)
    assert dataset.classes == CLASSES and dataset.input_shape == (3, 32, 32)


def test_image_folder_archive_unpacked_once(tmp_path, monkeypatch):
    expected = write_image_folder(tmp_path / "cifar10-jpeg")
    archive = make_tar(tmp_path / "cifar10-jpeg", tmp_path / "cifar10-jpeg.tar.gz")
    cache = tmp_path / "cache"
    assert_matches(data.load("cifar10", archive, cache_dir=cache), expected)
    assert len(list((cache / "extracted").iterdir())) == 1
    root = data.source_root(archive, cache_dir=cache)  # for tools that read the files themselves
    assert root.name == "cifar10-jpeg" and (root / "train" / "cat" / "0000.png").exists()
    # Without the decoded cache, the second load decodes the unpacked copy: no second unpack.
    for f in cache.glob("*.safetensors"):
        f.unlink()
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("archive unpacked twice"))
    assert_matches(data.load("cifar10", archive, cache_dir=cache), expected)


def test_official_batches_directory_and_wrapper(tmp_path):
    expected = write_official_batches(tmp_path / "src" / "cifar-10-batches-py")
    for source in (tmp_path / "src" / "cifar-10-batches-py", tmp_path / "src"):  # or its parent
        dataset = data.load("cifar10", source, cache_dir=tmp_path / "cache")
        assert_matches(dataset, expected)
        assert dataset.classes == CLASSES


def test_official_batches_archive(tmp_path):
    expected = write_official_batches(tmp_path / "src" / "cifar-10-batches-py")
    archive = make_tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    assert_matches(data.load("cifar10", archive, cache_dir=tmp_path / "cache"), expected)


def test_any_user_image_folder(tmp_path):
    expected = write_image_folder(tmp_path / "pets", size=12, classes=("cat", "dog", "emu"))
    dataset = data.load("imagefolder", tmp_path / "pets", cache_dir=tmp_path / "cache")
    assert_matches(dataset, expected)
    assert dataset.classes == ("cat", "dog", "emu") and dataset.input_shape == (3, 12, 12)


def test_jpeg_images_decode(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "ds" / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 30)).save(tmp_path / "ds" / split / "a" / "0.jpg", quality=95)
    dataset = data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")
    assert (dataset.train.images[0, 0].float().mean() - 200).abs() < 5


# --- the decode cache ----------------------------------------------------------------------------

def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    cache = tmp_path / "cache"
    first = data.load("imagefolder", tmp_path / "ds", cache_dir=cache)
    decode = data.loading._decode
    monkeypatch.setattr(data.loading, "_decode",
                        lambda root: pytest.fail("decoded again despite the cache"))
    assert torch.equal(data.load("imagefolder", tmp_path / "ds", cache_dir=cache).train.images,
                       first.train.images)
    # A changed image changes the checksum: the stale cache must not be served.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ds" / "train" / "a" / "0000.png")
    monkeypatch.setattr(data.loading, "_decode", decode)
    changed = data.load("imagefolder", tmp_path / "ds", cache_dir=cache)
    assert changed.train.images[0].sum() == 0 and first.train.images[0].sum() > 0
    assert len(list(cache.glob("imagefolder-*.safetensors"))) == 2


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBPRUNE_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"
    write_image_folder(tmp_path / "ds", classes=("a",))
    data.load("imagefolder", tmp_path / "ds")
    assert list((tmp_path / "envcache").glob("imagefolder-*.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_damaged_cache_is_decoded_again(tmp_path, monkeypatch, damage):
    expected = write_image_folder(tmp_path / "ds", classes=("a", "b"))
    cache = tmp_path / "cache"
    data.load("imagefolder", tmp_path / "ds", cache_dir=cache)
    (cached,) = cache.glob("imagefolder-*.safetensors")
    if damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:-100])
    elif damage == "garbage":
        cached.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}")
    else:  # a readable safetensors file that is no decoded data set
        save_file({"weights": torch.zeros(3)}, cached)
    with pytest.warns(UserWarning, match=re.escape(str(cached)) + ".*decoding .*ds again"):
        assert_matches(data.load("imagefolder", tmp_path / "ds", cache_dir=cache), expected)
    # The cache was rewritten whole: the next load reads it without decoding.
    monkeypatch.setattr(data.loading, "_decode",
                        lambda root: pytest.fail("decoded despite a repaired cache"))
    assert_matches(data.load("imagefolder", tmp_path / "ds", cache_dir=cache), expected)


def test_cache_never_pickles(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a",))
    data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".safetensors" for p in files)


# --- the restricted unpickler --------------------------------------------------------------------

class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    write_official_batches(tmp_path / "batches")
    marker = tmp_path / "pwned"
    (tmp_path / "batches" / "data_batch_2").write_bytes(
        pickle.dumps({b"data": Exploit(marker)}, protocol=2))
    with pytest.raises(data.DataError, match=r"data_batch_2.*refusing to load (os|posix)\.system"):
        data.load("cifar10", tmp_path / "batches", cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_restricted_unpickler_refuses_builtins(tmp_path):
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps(eval, protocol=2))
    with pytest.raises(data.DataError, match=r"refusing to load (__builtin__|builtins)\.eval"):
        data.restricted_load(path)


# --- bad input -----------------------------------------------------------------------------------

def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known datasets: cifar10, digits, imagefolder"):
        data.load("mnist")


def test_missing_source(tmp_path):
    with pytest.raises(ValueError, match="needs a source"):
        data.load("cifar10")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load("cifar10", tmp_path / "nowhere", cache_dir=tmp_path / "cache")


def test_missing_batch_file_is_named(tmp_path):
    write_official_batches(tmp_path / "batches")
    (tmp_path / "batches" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load("cifar10", tmp_path / "batches", cache_dir=tmp_path / "cache")


def test_truncated_batch_file_is_named(tmp_path):
    write_official_batches(tmp_path / "batches")
    path = tmp_path / "batches" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(data.DataError, match="test_batch"):
        data.load("cifar10", tmp_path / "batches", cache_dir=tmp_path / "cache")


def test_wrong_batch_contents_are_named(tmp_path):
    write_official_batches(tmp_path / "batches")
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "batches" / "data_batch_4").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(data.DataError, match="data_batch_4.*N x 3072"):
        data.load("cifar10", tmp_path / "batches", cache_dir=tmp_path / "cache")


def test_corrupt_image_is_named(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    (tmp_path / "ds" / "train" / "b" / "0001.png").write_bytes(b"not a png at all")
    with pytest.raises(data.DataError, match=r"b/0001\.png.*cannot decode"):
        data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_empty_class_folder_is_named(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    (tmp_path / "ds" / "train" / "empty").mkdir()
    with pytest.raises(data.DataError, match="train/empty: class folder has no images"):
        data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_mismatched_image_size_is_named(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "ds" / "train" / "b" / "0000.png")
    with pytest.raises(data.DataError, match=r"b/0000\.png: image is 20x16.*all images must match"):
        data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_test_classes_must_match_train(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    (tmp_path / "ds" / "test" / "b").rename(tmp_path / "ds" / "test" / "c")
    with pytest.raises(data.DataError, match="differ from train classes"):
        data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_cifar10_needs_ten_classes(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    with pytest.raises(data.DataError, match="needs 10 classes, found 2"):
        data.load("cifar10", tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_unrecognised_layout_is_named(tmp_path):
    (tmp_path / "ds" / "x").mkdir(parents=True)
    (tmp_path / "ds" / "y").mkdir()
    with pytest.raises(data.DataError, match="ds: found neither"):
        data.load("cifar10", tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_corrupt_archive_is_named(tmp_path):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DataError, match="broken.tar.gz: cannot unpack"):
        data.load("cifar10", tmp_path / "broken.tar.gz", cache_dir=tmp_path / "cache")


def flip_bit(path, position, bit):
    raw = bytearray(path.read_bytes())
    raw[position] ^= 1 << bit
    path.write_bytes(bytes(raw))


def tiny_archive(tmp_path, layout):
    """A .tar.gz of a tiny data set in ``layout``, and the tensors it holds.

    ImageFolder images are BMP: uncompressed and unchecked, like JPEG's pixels, so a flipped bit
    changes pixels instead of tripping a PNG chunk's CRC."""
    if layout == "imagefolder":
        expected = write_image_folder(tmp_path / "src" / "cifar10-bmp", ext=".bmp")
        return make_tar(tmp_path / "src" / "cifar10-bmp", tmp_path / "cifar10-bmp.tar.gz"), expected
    expected = write_official_batches(tmp_path / "src" / "cifar-10-batches-py")
    archive = make_tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    return archive, expected


@pytest.mark.parametrize("layout", ["imagefolder", "official"])
def test_bit_flipped_archive_is_refused(tmp_path, layout):
    archive, _ = tiny_archive(tmp_path, layout)
    size = archive.stat().st_size
    good = archive.read_bytes()
    # The compressed payload (start, middle, end), gzip's CRC-32 and its length field.
    for position in (100, size // 3, size // 2, size - 40, size - 7, size - 2):
        flip_bit(archive, position, 3)
        cache = tmp_path / f"cache-{position}"
        with pytest.raises(data.DataError, match=re.escape(str(archive)) + ": cannot unpack archive"):
            data.load("cifar10", archive, cache_dir=cache)
        assert not list(cache.glob("*.safetensors")) and not list(cache.glob("extracted/*"))
        archive.write_bytes(good)


@pytest.mark.parametrize("layout", ["imagefolder", "official"])
def test_bit_flipped_archive_never_loads_other_pixels(tmp_path, layout):
    """Anywhere in the file, a flipped bit is refused or (gzip header fields that carry no data:
    time stamp, OS, text flag) changes nothing."""
    archive, expected = tiny_archive(tmp_path, layout)
    good = archive.read_bytes()
    rng = random.Random(0)
    refused = 0
    for trial in range(40):
        flip_bit(archive, rng.randrange(len(good)), rng.randrange(8))
        try:
            loaded = data.load("cifar10", archive, cache_dir=tmp_path / f"cache-{trial}")
        except data.DataError as e:
            assert str(archive) in str(e)
            refused += 1
        else:
            assert_matches(loaded, expected)
        archive.write_bytes(good)
    assert refused >= 35  # the header fields without data are 7 of the archive's thousands of bytes


def test_truncated_archive_is_refused(tmp_path):
    archive, _ = tiny_archive(tmp_path, "official")
    archive.write_bytes(archive.read_bytes()[:-20])  # the tar's end blocks stay, the trailer goes
    with pytest.raises(data.DataError, match="cifar-10-python.tar.gz: cannot unpack archive"):
        data.load("cifar10", archive, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz", "w"])
def test_other_archive_compressions_load(tmp_path, mode):
    expected = write_official_batches(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar.tar"
    with tarfile.open(archive, mode) as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert_matches(data.load("cifar10", archive, cache_dir=tmp_path / "cache"), expected)
    if mode != "w":  # bzip2 and xz check their streams too
        flip_bit(archive, archive.stat().st_size // 2, 3)
        with pytest.raises(data.DataError, match="cifar.tar: cannot unpack archive"):
            data.load("cifar10", archive, cache_dir=tmp_path / "cache2")


def test_decompression_bomb_is_named(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 is then "a bomb"
    with pytest.raises(data.DataError,
                       match=r"ds/train/a/0000\.png: cannot decode image.*decompression bomb"):
        data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("bad,found", [
    (1.0, r"labels\[1\] is a float"), (True, r"labels\[1\] is a bool"),
    (b"3", r"labels\[1\] is a bytes"), (2 ** 70, r"labels\[1\] is a 71-bit int"),
    (10, r"labels\[1\] is 10$"), (-1, r"labels\[1\] is -1$"),
])
def test_bad_official_labels_are_named(tmp_path, bad, found):
    write_official_batches(tmp_path / "batches")
    pixels = np.zeros((3, 3072), np.uint8)
    batch = official_batch("data_batch_2", pixels, [0, bad, 1])
    (tmp_path / "batches" / "data_batch_2").write_bytes(batch)
    with pytest.raises(data.DataError,
                       match=r"data_batch_2: 'labels' must be ints in 0\.\.9, but " + found):
        data.load("cifar10", tmp_path / "batches", cache_dir=tmp_path / "cache")


def test_wrong_number_of_official_labels_is_named(tmp_path):
    write_official_batches(tmp_path / "batches")
    pixels = np.zeros((3, 3072), np.uint8)
    batch = official_batch("data_batch_1", pixels, [0, 1])
    (tmp_path / "batches" / "data_batch_1").write_bytes(batch)
    with pytest.raises(data.DataError, match="data_batch_1: 'labels' must be a list of 3 ints"):
        data.load("cifar10", tmp_path / "batches", cache_dir=tmp_path / "cache")


def test_empty_official_batch_is_named(tmp_path):
    write_official_batches(tmp_path / "batches")
    # Protocol 4: protocol 2 spells empty bytes as a call of builtins.bytes, which is refused.
    empty = {b"labels": [], b"data": np.zeros((0, 3072), np.uint8)}
    (tmp_path / "batches" / "test_batch").write_bytes(pickle.dumps(empty, protocol=4))
    with pytest.raises(data.DataError, match="test_batch: the batch holds no images"):
        data.load("cifar10", tmp_path / "batches", cache_dir=tmp_path / "cache")


def test_split_without_class_folders_is_named(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    for d in (tmp_path / "ds" / "test").iterdir():
        for f in d.iterdir():
            f.rename(tmp_path / "ds" / "test" / f"{d.name}{f.name}")  # images, but no class folders
        d.rmdir()
    with pytest.raises(data.DataError, match="ds/test: no class folders"):
        data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_class_folders_without_images_are_named(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b"))
    for f in (tmp_path / "ds" / "test").rglob("*.png"):
        f.rename(f.with_suffix(".txt"))
    with pytest.raises(data.DataError, match="ds/test/a: class folder has no images"):
        data.load("imagefolder", tmp_path / "ds", cache_dir=tmp_path / "cache")


# --- stratified subsets --------------------------------------------------------------------------

def by_class(counts):
    """A split sorted by class, as an ImageFolder is: ``counts[c]`` points of class c."""
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    return data.Split(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels)


@pytest.mark.parametrize("n", [1, 7, 50, 99, 100])
def test_stratified_subset_keeps_class_proportions(n):
    split = by_class([40, 30, 20, 10])
    idx = data.stratified_subset(split, n, seed=0)
    assert len(idx) == n and len(set(idx.tolist())) == n
    assert 0 <= int(idx.min()) and int(idx.max()) < len(split)
    counts = torch.bincount(split.labels[idx], minlength=4)
    share = torch.tensor([40, 30, 20, 10]) * n / 100
    assert ((counts - share).abs() < 1).all(), (counts, share)  # proportional, up to rounding


def test_stratified_subset_covers_every_class_of_a_class_sorted_split():
    split = data.load("digits").test
    order = torch.argsort(split.labels, stable=True)  # sorted by class, like an ImageFolder
    sorted_split = data.Split(split.images[order], split.labels[order])
    idx = data.stratified_subset(sorted_split, 100, seed=0)
    assert torch.bincount(sorted_split.labels[idx], minlength=10).tolist() == [10] * 10


def test_stratified_subset_is_seeded():
    split = by_class([40, 30, 20, 10])
    a, b = data.stratified_subset(split, 20, seed=1), data.stratified_subset(split, 20, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, data.stratified_subset(split, 20, seed=2))
    assert torch.equal(torch.sort(data.stratified_subset(split, 100, seed=3)).values, torch.arange(100))


@pytest.mark.parametrize("n,error,match", [
    (0, ValueError, "n must be >= 1, got 0"), (-3, ValueError, "n must be >= 1"),
    (101, ValueError, "n=101 exceeds the split's 100 points"),
    (2.5, TypeError, "n must be an int, got 2.5"), (True, TypeError, "n must be an int, got True"),
])
def test_stratified_subset_errors(n, error, match):
    with pytest.raises(error, match=match):
        data.stratified_subset(by_class([40, 30, 20, 10]), n, seed=0)


# --- batches on the device -----------------------------------------------------------------------

def reference_crop_flip(images, dy, dx, flip, pad):
    out = []
    for img, a, b, f in zip(images, dy.tolist(), dx.tolist(), flip.tolist()):
        p = torch.nn.functional.pad(img, (pad,) * 4)[:, a:a + img.shape[1], b:b + img.shape[2]]
        out.append(p.flip(-1) if f else p)
    return torch.stack(out)


def test_crop_flip_matches_per_sample_reference():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 10, 12), dtype=torch.uint8)
    dy, dx = torch.randint(0, 9, (50,)), torch.randint(0, 9, (50,))
    flip = torch.rand(50) < 0.5
    assert torch.equal(data.crop_flip(images, dy, dx, flip, 4), reference_crop_flip(images, dy, dx, flip, 4))
    centre = torch.full((50,), 4)
    assert torch.equal(data.crop_flip(images, centre, centre, torch.zeros(50, dtype=torch.bool), 4), images)


def small_split(n=37):
    torch.manual_seed(0)
    return data.Split(torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8), torch.arange(n))


@pytest.mark.parametrize("augment", [False, True])
def test_batches_cover_the_split_once_per_epoch(augment):
    split = small_split()
    batches = data.Batches(split, 8, augment=augment, seed=3)
    assert len(batches) == 5
    seen = [(x, y) for x, y in batches.epoch(2)]
    labels = torch.cat([y for _, y in seen])
    assert sorted(labels.tolist()) == list(range(37))
    for x, _ in seen:
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    if not augment:
        assert torch.equal(torch.cat([x for x, _ in seen]), split.images[labels].float() / 255)
    assert not torch.equal(labels, torch.cat([y for _, y in batches.epoch(3)]))  # reshuffled
    assert len(data.Batches(split, 8, drop_last=True)) == 4


def test_batches_replay_and_resume_bit_for_bit():
    split = small_split()
    a = data.Batches(split, 8, augment=True, seed=1)
    b = data.Batches(split, 8, augment=True, seed=1)
    full = list(a.epoch(4))
    tail = list(b.epoch(4, start=2))
    assert len(tail) == 3
    for (x1, y1), (x2, y2) in zip(full[2:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_batches_reject_bad_size():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.Batches(small_split(), 0)
