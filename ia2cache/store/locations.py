"""Where a store or a cache lives: one :class:`Location` type for local folders and fsspec URLs.

:func:`location` turns a ``--store`` / ``--cache`` value (a path, ``~/x``, ``file://x``,
``s3://bucket/prefix``, ``memory://p``) into a :class:`Location`. Everything the store does with
files goes through its methods, which take paths *relative to it* (``ledger/shard_000001.json``);
the two implementations are the only place where local and remote differ:

- :class:`LocalLocation`: every file is opened through :mod:`ia2cache._io`, folder by folder with
  ``O_NOFOLLOW`` below the location, regular files only (a FIFO, device or link planted in a
  shared store is refused, never followed nor blocked on). The location itself must be a real
  folder when it is a cache (:meth:`Location.check_folder`); a store root may be a link the user
  chose. zarr reads and writes through :class:`_SafeLocalStore`.
- :class:`RemoteLocation` over an fsspec filesystem (zarr's ``FsspecStore`` for the arrays):
  - **small JSON** (ledger entries) is written with one ``PUT`` of the whole object: an object
    store has no rename, but a single PUT is atomic there, so a ledger entry still appears only
    after every byte of its shard is in place;
  - **the lock** is an object made with a conditional PUT (see :mod:`ia2cache.store.lock`);
  - **errors** of the remote client that are not ``OSError`` (botocore's ``NoCredentialsError``,
    ``EndpointConnectionError``, ...) become an :class:`IA2Error` naming the URL; ``OSError`` s get
    the URL as their file name;
  - **listings** bypass fsspec's listing cache, since other processes write the same prefix;
  - object stores have no links: the link checks are local only.

Credentials and endpoints come from the usual fsspec/botocore sources (``AWS_*`` environment
variables, ``~/.aws``, ``AWS_ENDPOINT_URL`` for S3-compatible servers); nothing is stored.

Reads of shard files are *strict*: a shard file that does not exist raises instead of reading as
zarr's fill value, so a deleted shard is damage, never a block of zeros (:class:`MissingShardError`);
an empty one (0 bytes, which zarr reads as all chunks absent) is damage too (``ValueError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import posixpath
import re
import shutil
import stat
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore

from ia2cache._io import (
    check_beneath,
    ensure_dir_beneath,
    file_kind,
    listdir_beneath,
    open_beneath,
    open_parts_beneath,
    pread_all,
    read_beneath,
    refusal,
    remove_beneath,
    special_files,
    write_json_atomic,
    write_probe,
)
from ia2cache.errors import IA2Error

__all__ = [
    "LocalLocation",
    "Location",
    "MissingShardError",
    "RemoteLocation",
    "RemotePath",
    "is_remote_failure",
    "is_url",
    "location",
    "remote_failure_message",
]

_CLIENT_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "aiohttp")
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "r2"})
_CHUNK_KEY = re.compile(r"(?:^|.*/)c/\d+(?:/\d+)*")
"""A shard file's key in zarr's default chunk key encoding (``acts/attn/c/3/0/0/0``)."""


class MissingShardError(IA2Error):
    """A shard file that must exist does not (deleted, or never written): damage, not zeros."""

    @classmethod
    def of(cls, key: str) -> MissingShardError:
        return cls(f"shard file {key} is missing (deleted?)")


def _refuse_empty_shard(key: str, size: int, what: str = "is empty (0 bytes)") -> None:
    """Raise ``ValueError`` (damage) for an empty shard file (or a read of it that returned
    nothing): zarr's sharding codec reads one as "every chunk absent", i.e. fill values, and
    ia2cache never writes one (every shard it writes holds at least its index)."""
    if size == 0 and _CHUNK_KEY.fullmatch(key):
        raise ValueError(f"shard file {key} {what}: damaged, not zeros")


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
    if isinstance(x, RemotePath | RemoteLocation):
        return True
    if not isinstance(x, str) or "://" not in x:
        return False
    return x.split("://", 1)[0] not in ("", "file", "local")


# --------------------------------------------------------------------------- remote addresses


class RemotePath:
    """A path inside an fsspec filesystem, with the pathlib methods a store needs (the address of
    a remote :class:`Location`, as :class:`pathlib.Path` is of a local one)."""

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

    def is_relative_to(self, other: object) -> bool:
        return (
            isinstance(other, RemotePath)
            and self.protocol == other.protocol
            and (self.path == other.path or self.path.startswith(other.path.rstrip("/") + "/"))
        )

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

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def etag(self) -> str | None:
        """The object's ETag (S3), or None where the backend has none."""
        self._fresh()
        tag = self._call("info").get("ETag")
        return str(tag) if tag else None

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


# --------------------------------------------------------------------------- the location type


class Location(ABC):
    """A local folder or a remote prefix holding a store or a cache.

    Relative paths (``rel``) name files below the location with ``/``; nothing below it is
    reached through a link (local). ``path`` is the address to show a user: a
    :class:`pathlib.Path` or a :class:`RemotePath`.
    """

    path: Any
    can_swap: bool = False
    """Whether :meth:`exchange` can swap two folders atomically here."""

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and type(other) is type(self) and self.path == other.path

    def __hash__(self) -> int:
        return hash((type(self).__name__, str(self)))

    def __truediv__(self, rel: str) -> Location:
        return type(self)(self.path / rel)

    @property
    def name(self) -> str:
        return str(self.path.name)

    @property
    def parent(self) -> Location:
        return type(self)(self.path.parent)

    def resolve(self) -> Location:
        """The location with ``..`` collapsed (and, locally, links resolved)."""
        return type(self)(self.path.resolve())

    def is_relative_to(self, other: Location) -> bool:
        return type(other) is type(self) and self.path.is_relative_to(other.path)

    # ------------------------------------------------------------------ queries

    @abstractmethod
    def exists(self) -> bool:
        """Whether anything is at the location."""

    @abstractmethod
    def is_dir(self) -> bool:
        """Whether the location is a folder (remote: a prefix with objects)."""

    @abstractmethod
    def children(self) -> list[Location]:
        """What the folder holds, one level (empty if it does not exist)."""

    @abstractmethod
    def is_link(self) -> bool:
        """Whether the location itself is a symbolic link (never, remotely)."""

    @abstractmethod
    def has(self, rel: str) -> bool:
        """Whether anything (a file, a folder, a link) is at ``rel``, without following a link."""

    @abstractmethod
    def read(self, rel: str, limit: int) -> bytes:
        """The bytes of the file ``rel``: locally a regular file reached through no link (the
        location itself included) of at most ``limit`` bytes; remotely one GET.

        Raises:
            FileNotFoundError: it does not exist.
            ValueError: a link or special file, or too large: damage, like a malformed file.
            IA2Error: the remote store failed (credentials, network): no damage.
        """

    @abstractmethod
    def listdir(self, rel: str) -> list[str]:
        """The names in the folder ``rel`` (``[]`` if it does not exist).

        Raises:
            IA2Error: the folder, or one on the way, is a link or special file.
        """

    @abstractmethod
    def file_problem(self, rel: str) -> str | None:
        """Why the file ``rel`` cannot be read as one of ours (missing, a link, a FIFO), or None."""

    @abstractmethod
    def special_files(self) -> list[tuple[str, str]]:
        """Every link and special file below the location, as (rel, what it is); remote: none."""

    @abstractmethod
    def du(self) -> int:
        """Bytes of every file below the location."""

    @abstractmethod
    def free_bytes(self) -> int | None:
        """Free bytes on the file system the location is (or would be) on; None if unknown."""

    # ------------------------------------------------------------------ changes

    @abstractmethod
    def check_folder(self) -> None:
        """Refuse a location that is a link or special file: a cache is a real folder, so a link
        planted as ``<store>/<key>`` is never written to, nor trusted.

        Raises:
            IA2Error: naming the location and what it is.
        """

    @abstractmethod
    def mkdir(self) -> None:
        """Make the folder (and the ones above it); nothing on an object store."""

    @abstractmethod
    def probe_writable(self) -> None:
        """Prove the folder writable by making and removing a new empty file in it (locally under
        an unguessable name, never through a link planted there).

        Raises:
            OSError: it is not writable.
        """

    @abstractmethod
    def write_json(self, rel: str, obj: Any) -> None:
        """Write ``obj`` as JSON (sorted keys) at ``rel``, atomically: locally a temp file, then a
        rename (the folders made through no link, a link or special file at ``rel`` refused);
        remotely one PUT, which is atomic on S3."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Remove whatever is at ``rel`` (a file, a folder tree, a link itself), never following a
        link; nothing if it is absent."""

    @abstractmethod
    def remove_tree(self) -> None:
        """Remove this folder and everything below it, never following a link (a link in its place
        is removed itself); nothing if it is absent."""

    @abstractmethod
    def remove_debris(self, names: re.Pattern[str]) -> list[str]:
        """Delete the files below the location whose name matches ``names`` (temp files a killed
        writer left); returns what was removed. Remote: object stores have no temp files."""

    @abstractmethod
    def lock(self, rel: str) -> contextlib.AbstractContextManager[None]:
        """Hold an exclusive lock named ``rel`` while writing (see :mod:`ia2cache.store.lock`).

        Raises:
            IA2Error: another process holds it.
        """

    @abstractmethod
    def zarr_store(self, read_only: bool) -> Any:
        """A zarr store rooted here. Reads of a missing shard file raise
        :class:`MissingShardError` when ``read_only`` (a reader never wants zeros in its place)."""

    @abstractmethod
    def cache_folder(self, name: str, is_key: bool) -> Location:
        """The cache folder ``name`` names in this store: a path to an existing cache (absolute, or
        relative to the working directory, where ``name`` is not a key), else a name under this
        store, which it may not leave (nor reach through a link below it, locally).

        Raises:
            IA2Error: the name leaves the store, or names no cache.
        """

    @abstractmethod
    def exchange(self, other: Location) -> None:
        """Swap this folder and ``other`` (a sibling) in one atomic step, so that a crash leaves
        each name holding one whole folder, never none (``ia2cache migrate``).

        Raises:
            IA2Error: the file system (or the store) cannot swap folders atomically.
        """


class LocalLocation(Location):
    """A folder on this machine; every file is opened through no link (:mod:`ia2cache._io`)."""

    can_swap = True

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _below(self, rel: str) -> Path:
        return self.path / rel

    def exists(self) -> bool:
        return self.path.exists()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def children(self) -> list[Location]:
        try:
            return [LocalLocation(p) for p in self.path.iterdir()]
        except FileNotFoundError:
            return []

    def is_link(self) -> bool:
        return self.path.is_symlink()

    def has(self, rel: str) -> bool:
        try:
            os.lstat(self._below(rel))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def read(self, rel: str, limit: int) -> bytes:
        try:
            return read_beneath(self.path, self._below(rel), limit, follow_root=False)
        except IA2Error as exc:
            raise ValueError(str(exc)) from None

    def listdir(self, rel: str) -> list[str]:
        return listdir_beneath(self.path, self._below(rel), follow_root=False)

    def file_problem(self, rel: str) -> str | None:
        try:
            check_beneath(self.path, self._below(rel))
        except IA2Error as e:
            return f"shard file {rel}: {e}"
        if not os.path.lexists(self._below(rel)):
            return f"shard file {rel} is missing (deleted?)"
        return None

    def special_files(self) -> list[tuple[str, str]]:
        return [(p.relative_to(self.path).as_posix(), kind) for p, kind in special_files(self.path)]

    def du(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def free_bytes(self) -> int | None:
        p = self.path.expanduser().absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            return shutil.disk_usage(p).free
        except OSError:
            return None

    def check_folder(self) -> None:
        _dir_identity(self.path)

    def mkdir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def probe_writable(self) -> None:
        write_probe(self.path)

    def write_json(self, rel: str, obj: Any) -> None:
        target = self._below(rel)
        ensure_dir_beneath(self.path, target.parent, follow_root=False)
        check_beneath(self.path, target)
        write_json_atomic(target, obj)

    def remove(self, rel: str) -> None:
        remove_beneath(self.path, self._below(rel), follow_root=False)

    def remove_tree(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.path)  # never follows a link below (fd based on this platform)
        else:
            os.unlink(self.path)

    def remove_debris(self, names: re.Pattern[str]) -> list[str]:
        removed = []
        for root, _dirs, files in os.walk(self.path):  # never into a linked folder
            for name in files:  # a link or FIFO of such a name is removed itself, never followed
                if names.fullmatch(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, name))
                        removed.append(os.path.join(root, name))
        return removed

    def lock(self, rel: str) -> contextlib.AbstractContextManager[None]:
        from ia2cache.store.lock import local_lock

        return local_lock(self.path, rel)

    def zarr_store(self, read_only: bool) -> Any:
        return _SafeLocalStore(str(self.path), read_only=read_only)

    def cache_folder(self, name: str, is_key: bool) -> Location:
        store_dir = self.path.resolve()
        given = Path(name).expanduser()
        if not is_key and not given.is_absolute() and LocalLocation(given).has("zarr.json"):
            return LocalLocation(given.resolve())  # an explicit path, relative to the working directory
        if given.is_absolute():
            p = given.resolve()
            if not LocalLocation(p).has("zarr.json"):
                raise IA2Error(f"{name} is not an ia2cache cache (no zarr group with a manifest)")
            return LocalLocation(p)
        p = (store_dir / given).resolve()
        if p == store_dir or not p.is_relative_to(store_dir):
            raise IA2Error(f"refusing a cache path outside the store: {name!r} (store {store_dir})")
        named = Path(os.path.normpath(store_dir / given))
        if named.is_relative_to(store_dir):
            check_beneath(store_dir, named, "directory")  # a link below the store, even to inside it
        if not is_key and not p.is_dir():
            raise IA2Error(f"no cache {name!r} in store {store_dir}: give a 16-hex-char key or an existing "
                           "cache directory (see `ia2cache ls`)")
        return LocalLocation(p)

    def exchange(self, other: Location) -> None:
        if not isinstance(other, LocalLocation) or other.path.parent != self.path.parent:
            raise IA2Error(f"{self} can only be swapped with a sibling folder, not {other}")
        _rename_exchange(self.path, other.path)


class RemoteLocation(Location):
    """A prefix of an fsspec filesystem (``s3://bucket/prefix``): no links, no renames."""

    def __init__(self, path: RemotePath | str) -> None:
        self.path = path if isinstance(path, RemotePath) else RemotePath(path)

    def exists(self) -> bool:
        return self.path.exists()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def children(self) -> list[Location]:
        return [RemoteLocation(p) for p in self.path.iterdir()]

    def is_link(self) -> bool:
        return False

    def has(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def read(self, rel: str, limit: int) -> bytes:
        del limit  # one GET of an object ia2cache wrote; no link can redirect it
        return (self.path / rel).read_bytes()

    def listdir(self, rel: str) -> list[str]:
        d = self.path / rel
        return [p.name for p in d.iterdir()] if d.is_dir() else []

    def file_problem(self, rel: str) -> str | None:
        return None if (self.path / rel).is_file() else f"shard file {rel} is missing (deleted?)"

    def special_files(self) -> list[tuple[str, str]]:
        return []

    def du(self) -> int:
        self.path._fresh()
        try:
            return int(self.path._call("du", total=True))
        except FileNotFoundError:
            return 0

    def free_bytes(self) -> int | None:
        return None

    def check_folder(self) -> None:
        return None

    def mkdir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def probe_writable(self) -> None:
        probe = self.path / f".ia2cache-write-probe-{os.getpid()}"  # one per process: ranks run at once
        probe.write_bytes(b"")
        probe.unlink()

    def write_json(self, rel: str, obj: Any) -> None:
        (self.path / rel).write_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))

    def remove(self, rel: str) -> None:
        target = self.path / rel
        if target.is_dir():
            with _remote_errors(target):
                target.fs.rm(target.path, recursive=True)
            target._fresh()
        else:
            target.unlink(missing_ok=True)

    def remove_tree(self) -> None:
        if self.path.is_dir():
            with _remote_errors(self.path):
                self.path.fs.rm(self.path.path, recursive=True)
            self.path._fresh()

    def remove_debris(self, names: re.Pattern[str]) -> list[str]:
        del names  # every zarr chunk and ledger entry is one PUT: no temp objects
        return []

    def lock(self, rel: str) -> contextlib.AbstractContextManager[None]:
        from ia2cache.store.lock import remote_lock

        return remote_lock(self.path / rel, str(self))

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(str(self.path), read_only=read_only)
        return _StrictStore(store) if read_only else store

    def cache_folder(self, name: str, is_key: bool) -> Location:
        given = Path(name).expanduser()
        if not is_key and LocalLocation(given).has("zarr.json"):
            return LocalLocation(given.resolve())  # an explicit local cache path still works
        root = self.path.resolve()
        if given.is_absolute() or name.startswith("/") or "\\" in name:
            raise IA2Error(f"refusing a cache path outside the store: {name!r} (store {root})")
        p = (root / name).resolve()
        if p == root or not p.is_relative_to(root):
            raise IA2Error(f"refusing a cache path outside the store: {name!r} (store {root})")
        if not is_key and not (p / "zarr.json").exists():
            raise IA2Error(f"no cache {name!r} in store {root}: give a 16-hex-char key or an existing "
                           f"cache name (see `ia2cache ls --store {root}`)")
        return RemoteLocation(p)

    def exchange(self, other: Location) -> None:
        raise IA2Error(
            f"{self}: an object store cannot swap two prefixes atomically, so a cache there cannot be "
            "migrated in place; copy it to a local store (e.g. `aws s3 sync`), run `ia2cache migrate` "
            "there and copy it back"
        )


def location(x: str | Path | RemotePath | Location) -> Location:
    """A ``--store``/``--cache`` value as a :class:`Location`: a local folder (``~`` expanded,
    ``file://`` dropped) or a remote prefix for an fsspec URL."""
    if isinstance(x, Location):
        return x
    if isinstance(x, RemotePath):
        return RemoteLocation(x)
    if isinstance(x, Path):
        return LocalLocation(x)
    s = str(x)
    if is_url(s):
        return RemoteLocation(s)
    if s.startswith("file://"):
        s = s[len("file://") :]
    return LocalLocation(Path(s).expanduser())


# --------------------------------------------------------------------------- local helpers


def _dir_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the real folder ``path``, None if it does not exist.

    Raises:
        IA2Error: ``path`` is a symlink or not a folder.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise refusal(path, file_kind(st.st_mode), "directory")
    return st.st_dev, st.st_ino


_RENAME_EXCHANGE = 2  # linux/fs.h


def _rename_exchange(a: Path, b: Path) -> None:
    """``renameat2(a, b, RENAME_EXCHANGE)``: swap two folders atomically (Linux 3.15+; ext4, xfs,
    btrfs, tmpfs). Python has no binding; glibc 2.28+ exports the call.

    Raises:
        IA2Error: the platform or file system cannot do it.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise IA2Error(f"cannot swap {a} and {b} atomically: this C library has no renameat2")
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise IA2Error(f"cannot swap {a} and {b} atomically: the file system does not support "
                           f"RENAME_EXCHANGE ({os.strerror(err)})")
        raise OSError(err, os.strerror(err), str(a))


def _byte_span(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    """``[start, stop)`` of a zarr byte request in a file of ``size`` bytes (as zarr's LocalStore)."""
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"Unexpected byte_range, got {byte_range}.")


class _SafeLocalStore(LocalStore):
    """zarr's LocalStore for one cache folder, never following a link nor opening a special file.

    Reads open each file through :func:`~ia2cache._io.open_beneath` (``O_NOFOLLOW`` folder by
    folder, ``O_NONBLOCK``, regular files only), so a FIFO in place of a shard file is refused at
    once instead of blocking, and a symlink is never read through; the refusal names the file.
    Reads run on zarr's event loop itself rather than in a worker thread: a ``pread`` from the
    page cache costs less than the thread hand-off (measured in the README's "Performance").
    A read-only store refuses a missing shard file (:class:`MissingShardError`) and an empty one
    (``ValueError``, damage: zarr would read it as fill values).

    Writes stay zarr's own (a temp file under a random name, then a rename: the rename never
    follows a link at the destination, and the crash tests' fault points sit inside it). Before
    each one the folder is checked to be the same real folder as when this store was made (device
    and inode) and every part of the path below it is checked with ``lstat``. That leaves a race:
    a co-user who can write into the cache folder and swaps a sub-folder for a symlink between
    this check and zarr's write redirects that one write. Closing it would mean reimplementing
    zarr's writes on directory fds; the files ia2cache writes itself (lock, ledger) have no gap.
    """

    _KEEP_OPEN = 16
    """Shard files a read-only store keeps open, most recently read first: zarr reads a shard's
    index and then each of its chunks by a call each, and opening a file through no link walks
    every folder above it (8 opens for ``acts/attn/c/3/0/0/0``)."""

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._identity = _dir_identity(self.root)
        self._files: OrderedDict[str, int] = OrderedDict()
        self._files_lock = threading.Lock()

    def __del__(self) -> None:
        self._close_files()

    def close(self) -> None:
        self._close_files()
        super().close()

    def _close_files(self) -> None:
        with self._files_lock:
            while self._files:
                os.close(self._files.popitem()[1])

    def _fd(self, key: str) -> tuple[int, bool]:
        """An fd of the file ``key`` (opened through no link, a regular file) and whether the
        caller closes it: shard files of a read-only store stay open for the next reads."""
        keep = self.read_only and _CHUNK_KEY.fullmatch(key) is not None
        if keep:
            with self._files_lock:
                if key in self._files:
                    self._files.move_to_end(key)
                    return self._files[key], False
        fd = open_beneath(self.root, self.root / key, os.O_RDONLY, follow_root=False)
        if not keep:
            return fd, True
        with self._files_lock:
            self._files[key] = fd
            while len(self._files) > self._KEEP_OPEN:
                os.close(self._files.popitem(last=False)[1])
        return fd, False

    def open_shard_file(self, key: str) -> int:
        """A new fd of the shard file ``key`` for :mod:`~ia2cache.store.direct`, which the caller
        closes, opened as every read here: through no link, a regular file only.

        Raises:
            MissingShardError: the file is missing and the store is read-only (a reader never
                wants zeros in its place); FileNotFoundError: missing from a writable store.
        """
        try:
            return open_parts_beneath(self.root, key.split("/"), os.O_RDONLY, follow_root=False)
        except FileNotFoundError:
            if self.read_only:
                raise MissingShardError.of(key) from None
            raise

    def _check_write(self, key: str) -> None:
        ident = _dir_identity(self.root)  # refuses a link or special file at the cache folder
        if self._identity is None:
            self._identity = ident
        elif ident is not None and ident != self._identity:
            raise IA2Error(
                f"cache folder {self.root} was replaced by another folder while it was being "
                "written; refusing to go on"
            )
        check_beneath(self.root, self.root / key)

    def _read(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer | None:
        try:
            fd, close = self._fd(key)
        except FileNotFoundError:
            if self.read_only and _CHUNK_KEY.fullmatch(key):
                raise MissingShardError.of(key) from None
            return None  # metadata: as zarr's, absent
        try:
            size = os.fstat(fd).st_size
            if self.read_only:
                _refuse_empty_shard(key, size)
            start, stop = _byte_span(byte_range, size)
            data = pread_all(fd, stop - start, start) if stop > start else b""
        finally:
            if close:
                os.close(fd)
        return prototype.buffer.from_bytes(data)

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        self._ensure_open_sync()
        return self._read(key, prototype or default_buffer_prototype(), byte_range)

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        return self._read(key, prototype or default_buffer_prototype(), byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [self._read(k, prototype, r) for k, r in key_ranges]

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_write(key)
        super().set_sync(key, value)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        self._check_write(key)
        await super()._set(key, value, exclusive=exclusive)

    async def delete(self, key: str) -> None:
        self._check_write(key)
        await super().delete(key)


class _StrictStore(WrapperStore[Any]):
    """A read-only zarr store (remote) that refuses a missing or empty shard file instead of zeros."""

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        got = await self._store.get(key, prototype or default_buffer_prototype(), byte_range)
        if got is None and _CHUNK_KEY.fullmatch(key):
            raise MissingShardError.of(key)
        if got is not None:  # no read of a whole shard, nor of a part of one, is empty
            _refuse_empty_shard(key, len(got), "read as 0 bytes (empty, or shorter than its index says)")
        return got

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        pairs = list(key_ranges)
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in pairs)))
