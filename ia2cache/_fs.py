"""Remote stores: fsspec URLs (``s3://bucket/prefix``, ``gs://...``, ``memory://...``) as cache
locations, next to local paths.

:func:`location` turns a ``--store`` / ``--cache`` value into either a :class:`pathlib.Path`
(local; unchanged behaviour) or a :class:`RemotePath`, which offers the small part of the
pathlib API the store uses (``/``, ``name``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``,
``mkdir``, ``read_text``, ``write_bytes``, ``unlink``) over an fsspec filesystem, and hands zarr
an ``FsspecStore`` for the arrays.

What differs from a local store (see README "Scale-out"):

- **Ledger entries and other small JSON** are written with one ``PUT`` (``pipe_file``) of the
  whole object. An object store has no rename, but a single PUT is atomic there: a reader sees
  the old object, no object, or the whole new one, never part of it. So a ledger entry still
  appears only after every byte of its shard is in place.
- **The cache lock** is an object ``<cache>/.lock`` created with a conditional PUT
  (``If-None-Match: *``, which S3 and S3-compatible servers honour; fsspec backends without it
  fall back to exists-then-write, which is not atomic). It holds the holder's host, pid and
  start time and is deleted on release. A lock left by a killed process on the same host
  (its pid is gone) is taken over; one from another host is refused with its URL, to be deleted
  by hand. Rule: one writer job per cache key (a torchrun job counts as one: rank 0 holds it).
- **Listings** (which ledger entries exist) bypass fsspec's listing cache, since other
  processes write the same prefix.

Credentials and endpoints come from the usual fsspec/botocore sources (``AWS_*`` environment
variables, ``~/.aws``, ``AWS_ENDPOINT_URL`` for S3-compatible servers); nothing is stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ia2cache.errors import IA2Error

__all__ = ["Location", "RemotePath", "is_url", "location", "remote_lock", "write_json"]


def is_url(x: object) -> bool:
    """True for an fsspec URL other than ``file://`` (``s3://b/p``, ``memory://p``)."""
    if isinstance(x, RemotePath):
        return True
    if not isinstance(x, str) or "://" not in x:
        return False
    return x.split("://", 1)[0] not in ("", "file", "local")


_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "r2"})


class RemotePath:
    """A path inside an fsspec filesystem, with the pathlib methods the store needs."""

    def __init__(self, url: str, _fs: Any | None = None, _path: str | None = None) -> None:
        if _fs is not None and _path is not None:
            self.protocol, self.fs, self.path = url, _fs, _path
            return
        try:
            import fsspec.core
        except ImportError as e:  # pragma: no cover - fsspec comes with zarr
            raise IA2Error(f"{url}: remote stores need fsspec ({e})") from None
        protocol = url.split("://", 1)[0]
        try:
            fs, path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise IA2Error(
                f"--store {url}: no fsspec filesystem for {protocol}:// ({e}); for s3:// install s3fs"
            ) from None
        self.protocol, self.fs, self.path = protocol, fs, path.rstrip("/")

    # ------------------------------------------------------------------ pure path ops

    def _child(self, path: str) -> RemotePath:
        return RemotePath(self.protocol, _fs=self.fs, _path=path)

    def __truediv__(self, other: str) -> RemotePath:
        other = str(other).strip("/")
        return self._child(f"{self.path}/{other}" if other else self.path)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __fspath__(self) -> str:  # refuse silently treating a URL as a local path
        raise TypeError(f"{self} is a remote location, not a local path")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> RemotePath:
        return self._child(posixpath.dirname(self.path))

    def expanduser(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        """The path with ``.`` and ``..`` collapsed (no symlinks on object stores)."""
        norm = posixpath.normpath(self.path) if self.path else ""
        return self._child("" if norm == "." else norm)

    def is_relative_to(self, other: RemotePath) -> bool:
        return (
            isinstance(other, RemotePath)
            and self.protocol == other.protocol
            and (self.path == other.path or self.path.startswith(other.path.rstrip("/") + "/"))
        )

    # ------------------------------------------------------------------ queries (uncached)

    def _fresh(self) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.path)

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        self._fresh()
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> Iterator[RemotePath]:
        self._fresh()
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return iter(())
        mine = self.path.rstrip("/")
        return iter(self._child(n.rstrip("/")) for n in names if n.rstrip("/") != mine)

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def du(self) -> int:
        """Bytes of every object under this prefix."""
        self._fresh()
        try:
            return int(self.fs.du(self.path, total=True))
        except FileNotFoundError:
            return 0

    # ------------------------------------------------------------------ writes

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: nothing to do (and no bucket is ever created: a
        missing bucket makes the first write fail). Other fsspec backends make the folders."""
        del parents
        if self.protocol in _OBJECT_STORES:
            return
        try:
            self.fs.makedirs(self.path, exist_ok=True)
        except FileExistsError:
            if not exist_ok:
                raise

    def write_bytes(self, data: bytes, create_only: bool = False) -> None:
        """One PUT of the whole object (atomic on S3); ``create_only`` fails if it exists."""
        self.fs.pipe_file(self.path, data, mode="create" if create_only else "overwrite")
        self._fresh()

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._fresh()

    def zarr_store(self, read_only: bool) -> Any:
        """A zarr ``FsspecStore`` rooted here (its own asynchronous filesystem instance)."""
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(str(self), read_only=read_only)


Location = Path | RemotePath
"""Where a store or a cache lives: a local directory or a remote prefix."""


def location(x: str | Path | RemotePath) -> Location:
    """A ``--store``/``--cache`` value as a local path (``~`` expanded) or a :class:`RemotePath`."""
    if isinstance(x, RemotePath | Path):
        return x
    s = str(x)
    if is_url(s):
        return RemotePath(s)
    if s.startswith("file://"):
        s = s[len("file://") :]
    return Path(s).expanduser()


def write_json(path: Location, obj: Any, write_local: Any) -> None:
    """Write ``obj`` as JSON (sorted keys): locally through ``write_local`` (temp file + rename),
    remotely as one PUT, which is atomic on S3."""
    if isinstance(path, RemotePath):
        path.write_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))
    else:
        write_local(path, obj)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def remote_lock(cache: RemotePath) -> Iterator[None]:
    """Hold ``<cache>/.lock`` (conditional create) while writing a remote cache."""
    lock = cache / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
          "token": os.urandom(8).hex()}
    body = json.dumps(me, sort_keys=True).encode()
    for attempt in range(2):
        try:
            lock.write_bytes(body, create_only=True)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (FileNotFoundError, ValueError):
                holder = {}
            stale = (
                holder.get("host") == me["host"]
                and isinstance(holder.get("pid"), int)
                and not _pid_alive(holder["pid"])
            )
            if stale and attempt == 0:
                lock.unlink(missing_ok=True)  # its holder on this host is gone: take it over
                continue
            raise IA2Error(
                f"another ia2cache process is writing {cache} (lock object {lock}, host "
                f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}); wait for it, or delete "
                f"the lock object if that process is gone"
            ) from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if json.loads(lock.read_text()).get("token") == me["token"]:
                lock.unlink(missing_ok=True)
