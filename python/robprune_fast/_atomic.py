"""Atomic file writes: a killed process leaves either the old file or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path`` (same folder)."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of ``path`` left by writers that were killed mid-write.

    A killed writer's ``finally`` never ran, so nobody else would ever remove its file.  A
    temporary whose process still runs belongs to a write in flight and is left alone.
    """
    prefix, suffix = f".{path.name}.", ".tmp"
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        pid = entry.name[len(prefix):-len(suffix)]
        if entry.name.startswith(prefix) and entry.name.endswith(suffix) and pid.isdigit() \
                and not _running(int(pid)):
            entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 is never delivered: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; no pid at all: leave it
        return True
    return True
