"""Local file access that is safe in a shared folder: atomic writes that are never left half-done,
and opens that never follow a link nor block on a special file.

A store or an output folder may be shared with other users. One of them (or an accident) can
put a symbolic link, a FIFO, a device or a folder where ia2cache expects one of its own files.
Following the link would write into someone else's file; opening a FIFO blocks forever. So:

- every file ia2cache writes or locks is opened with ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a
  FIFO cannot block the open) and refused unless ``fstat`` says it is a regular file;
- the folders on the way from a *root* the caller names (the store, ``--out``) are opened one by
  one with ``O_NOFOLLOW | O_DIRECTORY`` relative to the previous one (``openat``), so a
  symlinked folder below the root is refused too, without a race between check and use. The
  root itself may be a symlink: the user chose it (``~/.cache -> /data``).

A refusal is an :class:`~ia2cache.errors.IA2Error` (exit 2) naming the path and what it is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ia2cache.errors import IA2Error

__all__ = [
    "check_beneath",
    "check_writable_dir",
    "ensure_dir_beneath",
    "file_kind",
    "listdir_beneath",
    "open_beneath",
    "open_parts_beneath",
    "pread_all",
    "read_beneath",
    "refusal",
    "remove_beneath",
    "special_files",
    "write_json_atomic",
    "write_probe",
]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | _CLOEXEC
_KINDS = {
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "FIFO",
    stat.S_IFDIR: "directory",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFREG: "regular file",
}


def file_kind(mode: int) -> str:
    """What an ``st_mode`` says a path is: ``"regular file"``, ``"symbolic link"``, ``"FIFO"``, ..."""
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def refusal(path: object, kind: str, want: str = "regular file") -> IA2Error:
    """The one message for a link or special file where ia2cache expects its own file or folder."""
    return IA2Error(
        f"{path} is a {kind}, not a {want}: refusing to use it (ia2cache never follows a link nor "
        "opens a special file inside a store or an output folder); remove it and run the command again"
    )


def _parts(root: Path, path: Path) -> tuple[str, ...]:
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        raise ValueError(f"{path} is not inside {root}") from None
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path}: '..' is not allowed below {root}")
    return parts


def _describe(dir_fd: int, name: str, where: Path, want: str) -> IA2Error | None:
    """The refusal for ``name`` in ``dir_fd`` if it is not a ``want``, else None."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    ok = stat.S_ISDIR(st.st_mode) if want == "directory" else stat.S_ISREG(st.st_mode)
    return None if ok else refusal(where, file_kind(st.st_mode), want)


def _open_dirs(root: Path, parts: Sequence[str], create: bool, follow_root: bool = True) -> int:
    """A directory fd of ``root / *parts``, opening each part below ``root`` with O_NOFOLLOW
    relative to its parent (``create``: make missing parts). The caller closes it."""
    flags = _DIR_FLAGS if follow_root else _DIR_FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(root, flags)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            st = os.lstat(root)
            raise refusal(root, file_kind(st.st_mode), "directory") from None
        exc.filename = exc.filename or str(root)
        raise
    try:
        for i, name in enumerate(parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=fd)
            try:
                nfd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                where = Path(root).joinpath(*parts[: i + 1])  # built only for the message: it costs
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    bad = _describe(fd, name, where, "directory")
                    if bad is not None:
                        raise bad from None
                exc.filename = str(where)
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_beneath(root: Path, path: Path, flags: int, mode: int = 0o666, *, create_dirs: bool = False,
                 follow_root: bool = True) -> int:
    """``os.open(path, flags, mode)`` for a regular file only, following no symlink below ``root``
    and never blocking on a FIFO; the caller closes the fd.

    ``root`` itself may be a symlink unless ``follow_root`` is False. A missing file raises
    ``FileNotFoundError`` (unless ``flags`` create it); ``create_dirs`` makes missing folders.

    Raises:
        IA2Error: ``path``, or a folder between ``root`` and it, is a symlink or special file.
    """
    root = Path(root)
    return open_parts_beneath(root, _parts(root, Path(path)), flags, mode, create_dirs=create_dirs,
                              follow_root=follow_root)


def open_parts_beneath(root: Path, parts: Sequence[str], flags: int, mode: int = 0o666, *,
                       create_dirs: bool = False, follow_root: bool = True) -> int:
    """:func:`open_beneath` of ``root / *parts`` (names, each neither empty, ``.`` nor ``..``,
    nor holding a ``/``), without building paths unless to name a failure: a reader opening a
    thousand shard files spent half its time in pathlib."""
    if not parts or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise ValueError(f"{list(parts)}: not the names of a file below {root}")
    dfd = _open_dirs(root, parts[:-1], create_dirs, follow_root)
    try:
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, mode, dir_fd=dfd)
        except OSError as exc:
            path = Path(root).joinpath(*parts)
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
                bad = _describe(dfd, parts[-1], path, "regular file")
                if bad is not None:
                    raise bad from None
            exc.filename = str(path)
            raise
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise refusal(Path(root).joinpath(*parts), file_kind(st.st_mode))
    return fd


def ensure_dir_beneath(root: Path, path: Path, *, follow_root: bool = True) -> None:
    """Make the folder ``path`` and any missing one between ``root`` and it, refusing a symlink or
    special file on the way (see :func:`open_beneath`)."""
    os.close(_open_dirs(Path(root), _parts(Path(root), Path(path)), True, follow_root))


def listdir_beneath(root: Path, path: Path, *, follow_root: bool = True) -> list[str]:
    """The names in the folder ``path``, reached through no symlink below ``root``; ``[]`` if it
    does not exist.

    Raises:
        IA2Error: ``path`` or a folder on the way is a symlink or special file.
    """
    try:
        fd = _open_dirs(Path(root), _parts(Path(root), Path(path)), False, follow_root)
    except FileNotFoundError:
        return []
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def special_files(root: Path) -> list[tuple[Path, str]]:
    """Every symlink and special file below the folder ``root`` (not following links), with what
    it is, in a stable order."""
    out: list[tuple[Path, str]] = []
    todo = [Path(root)]
    while todo:
        d = todo.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                todo.append(Path(e.path))
            elif not stat.S_ISREG(st.st_mode):
                out.append((Path(e.path), file_kind(st.st_mode)))
    return sorted(out)


def read_beneath(root: Path, path: Path, limit: int, *, follow_root: bool = True) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_beneath`), at most ``limit`` of them.

    Raises:
        IA2Error: a link or special file on the way, or a file larger than ``limit`` bytes.
        FileNotFoundError: ``path`` does not exist.
    """
    fd = open_beneath(root, path, os.O_RDONLY, follow_root=follow_root)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise IA2Error(f"{path} holds {size} bytes, more than the {limit} such a file can hold")
        return pread_all(fd, size, 0)
    finally:
        os.close(fd)


def pread_all(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes of ``fd`` from ``offset`` (fewer only at the end of the file): one
    ``pread`` returns at most ~2 GiB."""
    chunks, done = [], 0
    while done < size:
        b = os.pread(fd, size - done, offset + done)
        if not b:
            break
        chunks.append(b)
        done += len(b)
    return b"".join(chunks)


def check_beneath(root: Path, path: Path, want: str = "regular file") -> None:
    """Refuse a symlink or special file at ``path`` (``want``: ``"regular file"`` or
    ``"directory"``) or a non-directory on the way to it from ``root``; missing parts are fine.

    A check by ``lstat`` before another library writes ``path`` by name (zarr does): a co-user who
    swaps a folder for a symlink between this check and that write still wins the race; where
    ia2cache writes itself it uses :func:`open_beneath`, which has no such gap.

    Raises:
        IA2Error: naming the first offending path.
    """
    root, path = Path(root), Path(path)
    where = root
    parts = _parts(root, path)
    for i, name in enumerate(parts):
        where = where / name
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            return
        last = i == len(parts) - 1
        kind = want if last else "directory"
        ok = stat.S_ISDIR(st.st_mode) if kind == "directory" else stat.S_ISREG(st.st_mode)
        if not ok:
            raise refusal(where, file_kind(st.st_mode), kind)


def remove_beneath(root: Path, path: Path, *, follow_root: bool = True) -> bool:
    """Remove whatever is at ``path`` (a file, a link itself, a FIFO, a whole folder), never
    following a link below ``root``; a link or special file on the way is removed instead, since
    everything below it is gone with it. True if something was removed."""
    import shutil

    root, path = Path(root), Path(path)
    parts = _parts(root, path)
    fd = _open_dirs(root, (), False, follow_root)
    try:
        for i, name in enumerate(parts):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if i == len(parts) - 1 or not stat.S_ISDIR(st.st_mode):
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)  # symlink-attack resistant on this platform
                else:
                    os.unlink(name, dir_fd=fd)
                return True
            nfd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return False
    finally:
        os.close(fd)


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a Path, after checking that it is, or can be made, a writable directory.

    Run before any expensive work, so that a typo in an output flag fails at once.

    Raises:
        IA2Error: ``path`` or the nearest existing folder above it is not a writable directory.
    """
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
    ``path``, then fsync the directory so the rename itself is durable.

    The folder of ``path`` is made if missing (it may be a symlink: the caller chose it). A
    symlink or special file at ``path`` is refused, never written through nor replaced; the temp
    file is created exclusively (``O_EXCL | O_NOFOLLOW``) under a random name.

    Raises:
        IA2Error: ``path`` is a symlink or special file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dfd = os.open(path.parent, _DIR_FLAGS)
    try:
        bad = _describe(dfd, path.name, path, "regular file")
        if bad is not None:
            raise bad
        # The name matches ia2cache.store's debris pattern, like tempfile.mkstemp's did.
        tmp = f".{path.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(obj, f, sort_keys=True, indent=indent, default=str)
                f.flush()
                os.fsync(f.fileno())
            # rename never follows a link at the destination: one planted since the check above
            # is replaced, never written through.
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_probe(directory: Path) -> None:
    """Create and remove an empty file in ``directory`` to prove it writable. The file is new
    (``O_CREAT | O_EXCL | O_NOFOLLOW``) under an unguessable name, so nothing planted there is
    ever written through.

    Raises:
        OSError: ``directory`` is not writable (``filename`` names the probe).
    """
    probe = Path(directory) / f".ia2cache-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600)
    os.close(fd)
    os.unlink(probe)
