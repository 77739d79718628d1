"""Arms ia2cache's fault points in a test subprocess: this folder is on the PYTHONPATH of every
process the tests start (``tests/conftest.py``), and Python imports ``sitecustomize`` at startup.

- ``IA2CACHE_FAULT=name[:n]`` SIGKILLs the process the n-th time (default first) execution passes
  the point ``name``. Two points are added inside zarr's own atomic file write (temp file
  written and flushed, not yet renamed into place), where a real crash tears a write:
  ``zarr.before_rename`` (any zarr file: shard, array metadata, group metadata) and
  ``store.manifest_write`` (a cache's group ``zarr.json``, the manifest: its first write is the
  cache's creation, its last the ``complete`` status).
- ``IA2CACHE_HOLD=name:FILE`` pauses the first time execution passes ``name``: it creates
  ``FILE.reached`` and waits (up to 10 minutes) until ``FILE`` exists, so that a test can run a
  second process while the first provably sits at that point (e.g. holding the lock).

Without either variable nothing is imported.
"""

from __future__ import annotations

import os

if os.environ.get("IA2CACHE_FAULT") or os.environ.get("IA2CACHE_HOLD"):
    import contextlib
    import re
    import signal
    import sys
    import time
    from pathlib import Path

    # At startup the current folder is not on sys.path yet: import this checkout's ia2cache
    # (the one the tests run), installed or not.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from ia2cache._faults import fault_point, set_fault_hook

    _hits: dict[str, int] = {}
    _held: set[str] = set()
    _key_dir = re.compile(r"[0-9a-f]{16}")

    def _hook(name: str) -> None:
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
                release = Path(file)
                Path(f"{release}.reached").write_text(str(os.getpid()), encoding="utf-8")
                deadline = time.monotonic() + 600.0
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)

    set_fault_hook(_hook)

    if os.environ.get("IA2CACHE_FAULT", "").startswith(("zarr.", "store.manifest_write")):
        from zarr.storage import _local

        _real = _local._atomic_write

        @contextlib.contextmanager
        def _atomic_write(path, mode, exclusive=False):  # type: ignore[no-untyped-def]
            with _real(path, mode, exclusive) as f:
                yield f
                f.flush()  # the temp file is whole on disk; the rename has not happened
                # Creating an array also tries exclusive writes of its parent groups' metadata,
                # which fail harmlessly when they exist: those are not manifest updates.
                if not exclusive and path.name == "zarr.json" and _key_dir.fullmatch(path.parent.name):
                    fault_point("store.manifest_write")
                fault_point("zarr.before_rename")

        _local._atomic_write = _atomic_write
