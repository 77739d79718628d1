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
  by hand. The takeover replaces the stale object only if it is still the one read (S3: a PUT
  with ``If-Match`` on its ETag; other backends re-read it just before), and every taker reads
  the lock back after writing it, so of two processes taking over the same stale lock exactly
  one holds it. Rule: one writer job per cache key (a torchrun job counts as one: rank 0 holds it).
- **Errors** of the remote client that are not ``OSError`` (botocore's ``NoCredentialsError``,
  ``EndpointConnectionError``, ...) become an :class:`IA2Error` naming the URL (exit 2 from the
  CLI); ``OSError`` s get the URL as their file name.
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

__all__ = ["Location", "RemotePath", "is_remote_failure", "is_url", "location", "probe_writable",
           "remote_lock", "write_json"]

_CLIENT_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "aiohttp")


def is_remote_failure(exc: BaseException) -> bool:
    """True for an error raised by a remote-storage client library (credentials, endpoint,
    network) that is not an ``OSError`` (those carry their own file name)."""
    if isinstance(exc, OSError | IA2Error):
        return False
    return any(type(exc).__module__.split(".")[0] == m for m in _CLIENT_MODULES) or any(
        c.__module__.split(".")[0] in _CLIENT_MODULES for c in type(exc).__mro__[1:])


def remote_failure_message(where: object, exc: BaseException) -> str:
    """One line for a failed remote call: the URL, the client's error, and what to check."""
    return (f"{where}: the remote store failed ({type(exc).__name__}: {exc}); check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, AWS_PROFILE), the endpoint "
            "(AWS_ENDPOINT_URL) and the network")


@contextlib.contextmanager
def _remote_errors(where: object) -> Iterator[None]:
    """Name ``where`` in the errors of the remote client (see the module docstring)."""
    try:
        yield
    except OSError as exc:
        if not exc.filename:
            exc.filename = str(where)
        raise
    except Exception as exc:
        if is_remote_failure(exc):
            raise IA2Error(remote_failure_message(where, exc)) from exc
        raise


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

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``self.fs.<method>(self.path, ...)`` with the client's errors naming this URL."""
        with _remote_errors(self):
            return getattr(self.fs, method)(self.path, *args, **kwargs)

    def exists(self) -> bool:
        self._fresh()
        return bool(self._call("exists"))

    def is_file(self) -> bool:
        self._fresh()
        try:  # not fs.isfile: it answers False to any error, a missing credential included
            return self._call("info").get("type") == "file"
        except FileNotFoundError:
            return False

    def is_dir(self) -> bool:
        self._fresh()
        return bool(self._call("isdir"))

    def iterdir(self) -> Iterator[RemotePath]:
        self._fresh()
        try:
            names = self._call("ls", detail=False)
        except FileNotFoundError:
            return iter(())
        mine = self.path.rstrip("/")
        return iter(self._child(n.rstrip("/")) for n in names if n.rstrip("/") != mine)

    def read_bytes(self) -> bytes:
        return bytes(self._call("cat_file"))

    def etag(self) -> str | None:
        """The object's ETag (S3), or None where the backend has none."""
        self._fresh()
        tag = self._call("info").get("ETag")
        return str(tag) if tag else None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def du(self) -> int:
        """Bytes of every object under this prefix."""
        self._fresh()
        try:
            return int(self._call("du", total=True))
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
            self._call("makedirs", exist_ok=True)
        except FileExistsError:
            if not exist_ok:
                raise

    def write_bytes(self, data: bytes, create_only: bool = False, if_match: str | None = None) -> None:
        """One PUT of the whole object (atomic on S3); ``create_only`` fails if it exists;
        ``if_match`` (S3 only) replaces it only if its ETag is still that one, and raises
        ``OSError`` otherwise."""
        extra = {"IfMatch": if_match} if if_match is not None else {}
        self._call("pipe_file", data, mode="create" if create_only else "overwrite", **extra)
        self._fresh()

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("rm_file")
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


def probe_writable(directory: Location) -> None:
    """Prove ``directory`` writable by making and removing a new empty file in it: locally a new
    file under an unguessable name, never through a link planted there
    (:func:`ia2cache._io.write_probe`); remotely one PUT and one DELETE.

    Raises:
        OSError: it is not writable.
    """
    if isinstance(directory, RemotePath):
        probe = directory / f".ia2cache-write-probe-{os.getpid()}"  # one per process: ranks run at once
        probe.write_bytes(b"")
        probe.unlink()
        return
    from ia2cache._io import write_probe

    write_probe(directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(lock: RemotePath) -> dict[str, Any]:
    try:
        holder = json.loads(lock.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _take_over(lock: RemotePath, stale: dict[str, Any], body: bytes) -> bool:
    """Replace the stale lock object ``stale`` by ``body``, only if it is still that one.

    S3: one PUT with ``If-Match`` on the ETag read, atomic; a second taker's PUT fails its
    precondition. Other backends (no conditional PUT in fsspec): re-read the holder and, if it
    is still the stale one, delete it and create ours; the caller reads the lock back."""
    if lock.protocol in ("s3", "s3a"):
        try:
            tag = lock.etag()
            if tag is None or _read_holder(lock).get("token") != stale.get("token"):
                return False
            lock.write_bytes(body, if_match=tag)
        except OSError:  # FileNotFoundError, or 412 Precondition Failed: someone else was first
            return False
        return True
    if _read_holder(lock).get("token") != stale.get("token"):
        return False
    lock.unlink(missing_ok=True)
    try:
        lock.write_bytes(body, create_only=True)
    except FileExistsError:
        return False
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
            holder = _read_holder(lock)
            stale = (
                holder.get("host") == me["host"]
                and isinstance(holder.get("pid"), int)
                and not _pid_alive(holder["pid"])
            )
            if stale and attempt == 0 and _take_over(lock, holder, body):
                break  # its holder on this host is gone: taken over
            if stale and attempt == 0:
                continue  # another process took it over first: read who holds it now
            raise IA2Error(
                f"another ia2cache process is writing {cache} (lock object {lock}, host "
                f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}); wait for it, or delete "
                f"the lock object if that process is gone"
            ) from None
    holder = _read_holder(lock)
    if holder.get("token") != me["token"]:  # lost a race with another taker: theirs is stored
        raise IA2Error(
            f"another ia2cache process is writing {cache} (lock object {lock}, host "
            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}); it took the lock at the same "
            "moment as this one"
        )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if _read_holder(lock).get("token") == me["token"]:
                lock.unlink(missing_ok=True)
