"""Atomic file writes: nothing is ever left half-written or marked done when it is not."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a Path, after checking that it is, or can be made, a writable directory.

    Run before any expensive work, so that a typo in an output flag fails at once.

    Raises:
        IA2Error: ``path`` or the nearest existing folder above it is not a writable directory.
    """
    from ia2cache.errors import IA2Error

    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise IA2Error(f"{flag} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise IA2Error(f"{flag} {path}: {probe} is not writable")
    return p


def write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write JSON (sorted keys) to a temp file in the same directory, fsync it, rename it over
    ``path``, then fsync the directory so the rename itself is durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, sort_keys=True, indent=indent, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
