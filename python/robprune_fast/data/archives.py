"""Unpacking a source archive (.tar, .tar.gz, .tar.bz2, .tar.xz) into the cache, verified.

An archive's compressed stream is read to its end, so its own checksum (gzip's CRC-32, bzip2's,
xz's) is verified before anything decoded from it is cached: a corrupt download is an error,
never a data set of wrong pixels.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from .dataset import DataError

# The compressions tarfile reads, by their magic bytes.  Each module checks the stream's checksum
# when it reaches the stream's end.
DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def unpack(archive: Path, key: str, cache: Path) -> Path:
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
