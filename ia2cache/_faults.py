"""Fault injection for crash tests, armed by environment variables (unset, they cost two dict
lookups per point).

- ``IA2CACHE_FAULT=name[:n]`` SIGKILLs this process the n-th time (default first) execution
  passes the point ``name``. Two points sit inside zarr's own atomic file write (temp file
  written and flushed, not yet renamed into place), where a real crash tears a write:
  ``zarr.before_rename`` (any zarr file: shard, array metadata, group metadata) and
  ``store.manifest_write`` (a cache's group ``zarr.json``, the manifest: its first write is the
  cache's creation, its last the ``complete`` status).
- ``IA2CACHE_HOLD=name:FILE`` pauses the first time execution passes ``name``: it creates
  ``FILE.reached`` and waits (up to 10 minutes) until ``FILE`` exists. Tests use it to run a
  second process while the first one provably sits at that point (e.g. holding the lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_hits: dict[str, int] = {}
_held: set[str] = set()
_HOLD_SECONDS = 600.0
_KEY_DIR = re.compile(r"[0-9a-f]{16}")


def fault_point(name: str) -> None:
    spec = os.environ.get("IA2CACHE_FAULT")
    if spec:
        want, _, nth = spec.partition(":")
        if want == name:
            _hits[name] = _hits.get(name, 0) + 1
            if _hits[name] == int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)
    hold = os.environ.get("IA2CACHE_HOLD")
    if hold:
        want, _, file = hold.partition(":")
        if want == name and name not in _held:
            _held.add(name)
            _hold(Path(file))


def _hold(release: Path) -> None:
    Path(f"{release}.reached").write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + _HOLD_SECONDS
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _arm_zarr_writes() -> None:
    """Put ``zarr.before_rename`` and ``store.manifest_write`` inside zarr's atomic writes."""
    from zarr.storage import _local

    real = _local._atomic_write

    @contextlib.contextmanager
    def atomic_write(path: Path, mode: Any, exclusive: bool = False) -> Iterator[Any]:
        with real(path, mode, exclusive) as f:
            yield f
            f.flush()  # the temp file is whole on disk; the rename has not happened
            # Creating an array also tries exclusive writes of its parent groups' metadata,
            # which fail harmlessly when they exist: those are not manifest updates.
            if not exclusive and path.name == "zarr.json" and _KEY_DIR.fullmatch(path.parent.name):
                fault_point("store.manifest_write")
            fault_point("zarr.before_rename")

    _local._atomic_write = atomic_write


if os.environ.get("IA2CACHE_FAULT", "").startswith(("zarr.", "store.manifest_write")):
    _arm_zarr_writes()
