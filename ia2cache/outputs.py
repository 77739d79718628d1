"""Output folders: a command writes only into a folder that is new, empty, or its own.

``distill --out``, ``sweep --out``, ``report`` and ``analyze --out`` claim their folder before
any work: a missing or empty folder is made theirs by a marker file (``.ia2cache.json``: which
command made it, with which settings, and which files it writes); a folder with another
command's marker, or with files and no marker (a project, a model folder), is refused with
exit 2 naming what is in the way. A folder of the same command with other settings is refused
naming the first differing setting, unless ``overwrite``, which removes only the files the
marker lists. Two processes writing the same folder: the second exits 2 at once naming the
holder (:class:`OutputLock`), as ``collect`` does for a cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from ia2cache._io import file_kind, open_beneath, refusal, remove_beneath, write_json_atomic
from ia2cache.errors import IA2Error

MARKER = ".ia2cache.json"
"""The marker file's name inside every folder ia2cache made for its outputs."""
LOCK = ".ia2cache.lock"
_MARKER_MAX = 1 << 20


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # missing, or a file on the way (mkdir says so)
        return None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` as a dict, or None when it has none (or it is unreadable)."""
    try:
        data = json.loads(_read_small(folder / MARKER))
    except (FileNotFoundError, IA2Error, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_small(path: Path) -> bytes:
    fd = open_beneath(path.parent, path, os.O_RDONLY, follow_root=False)
    try:
        return os.read(fd, _MARKER_MAX)
    finally:
        os.close(fd)


def _in_the_way(folder: Path, names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"it already holds {shown}"


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def claim_output_dir(path: str | Path, flag: str, kind: str, settings: dict[str, Any] | None = None,
                     writes: Iterable[str] = (), overwrite: bool = False,
                     accept: Iterable[str] = ()) -> Path:
    """Make ``path`` this command's output folder, or refuse.

    Args:
        path: the folder (``~`` expanded). Its parents may be symlinks the user chose; the
            folder itself may not be one.
        flag: the flag that named it, for messages.
        kind: the command (``distill``, ``sweep``, ``analyze``), recorded in the marker.
        settings: what changes the folder's contents; a folder of ``kind`` with other settings is
            refused naming the first difference (None: the caller checks, e.g. sweep per task).
        writes: the file and folder names the command writes there (``overwrite`` removes only
            these).
        overwrite: a folder of ``kind`` with other settings is cleared of ``writes`` and reclaimed.
        accept: other kinds whose folders this command may also write into (report -> sweep).

    Returns:
        The folder, existing and marked.

    Raises:
        IA2Error: naming the folder and what is in the way.
    """
    folder = Path(path).expanduser()
    st = _lstat(folder)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise refusal(folder, file_kind(st.st_mode), "directory")
    writes = sorted(set(writes))
    created = False
    if st is None:
        try:
            folder.mkdir(parents=True)
            created = True
        except FileExistsError:  # made by a racing process: judge it like any existing folder
            pass
        except OSError as exc:
            raise IA2Error(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from None
    marker = _judge(folder, flag, kind, accept)
    mine = {"kind": kind, "settings": settings, "writes": writes, "created": created}
    if marker is None:
        _write_marker(folder, mine)
        return folder
    if marker.get("kind") != kind or settings is None:
        return folder
    old = marker.get("settings")
    if old == settings:
        return folder
    if not overwrite:
        diff = _diff(old or {}, settings)
        first = diff[0] if diff else "settings"
        raise IA2Error(
            f"{flag} {folder}: holds a {kind} run with other settings (--{first.replace('_', '-')}: "
            f"{(old or {}).get(first)!r} there, {settings.get(first)!r} now; {len(diff)} differ); "
            "choose another folder, or pass --overwrite to remove the files ia2cache wrote there"
        )
    for name in set(marker.get("writes") or []) & set(writes):
        remove_beneath(folder, folder / name, follow_root=False)
    _write_marker(folder, {**mine, "created": bool(marker.get("created"))})
    return folder


def check_output_dir(path: str | Path, flag: str, kind: str, accept: Iterable[str] = ()) -> Path:
    """What :func:`claim_output_dir` would refuse, checked without creating or writing anything
    (a missing folder passes): a symlink or non-folder at ``path``, a non-empty folder no ia2cache
    command marked, or one another kind of command made. Returns the folder (``~`` expanded)."""
    folder = Path(path).expanduser()
    st = _lstat(folder)
    if st is None:
        return folder
    if not stat.S_ISDIR(st.st_mode):
        raise refusal(folder, file_kind(st.st_mode), "directory")
    _judge(folder, flag, kind, accept)
    return folder


def _judge(folder: Path, flag: str, kind: str, accept: Iterable[str]) -> dict[str, Any] | None:
    """An existing folder's marker (None: unmarked and empty but for a lock), or refuse it."""
    names = [n for n in os.listdir(folder) if n not in (MARKER, LOCK)]
    marker = read_marker(folder)
    if marker is None:
        if names:
            raise IA2Error(f"{flag} {folder}: not a folder ia2cache {kind} made "
                           f"({_in_the_way(folder, names)}); choose a new or empty folder")
        return None
    if marker.get("kind") != kind and marker.get("kind") not in set(accept):
        raise IA2Error(f"{flag} {folder}: made by `ia2cache {marker.get('kind')}`, not `ia2cache {kind}`; "
                       "choose another folder")
    return marker


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    write_json_atomic(folder / MARKER, marker, indent=1)


def release_if_unused(folder: str | Path) -> None:
    """After a failed command: a folder that holds nothing but its marker (and lock) is unclaimed
    again (its marker removed, and the folder itself when this command created it), so that a
    corrected rerun with other settings can use it. A folder with any output is left as it is."""
    folder = Path(folder).expanduser()
    try:
        names = set(os.listdir(folder))
    except OSError:
        return
    if not names <= {MARKER, LOCK}:
        return
    created = bool((read_marker(folder) or {}).get("created"))
    for name in names:
        with contextlib.suppress(OSError, IA2Error):
            remove_beneath(folder, folder / name, follow_root=False)
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()


class OutputLock:
    """An exclusive, non-blocking lock on a file in an output folder, held for a whole command.

    The lock file is opened without following links; a second holder gets an IA2Error at once
    naming the first one's pid. The lock goes with the process (``flock``): a killed holder
    leaves nothing to clean up.
    """

    def __init__(self, path: Path, flag: str) -> None:
        self.path, self.flag = Path(path), flag
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        fd = open_beneath(self.path.parent, self.path, os.O_RDWR | os.O_CREAT, 0o644, follow_root=False)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise IA2Error(f"{self.flag} {self.path.parent}: in use by another ia2cache process (pid "
                               f"{holder}, lock {self.path}); wait for it or choose another folder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a new temp file beside ``path`` and rename it over ``path``: a link or
    special file planted at ``path`` is refused, never written through (see
    :func:`ia2cache._io.write_json_atomic`, which shares the checks)."""
    import secrets

    from ia2cache._io import _describe

    path = Path(path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bad = _describe(dfd, path.name, path, "regular file")
        if bad is not None:
            raise bad
        tmp = f".{path.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG at ``path``, written like :func:`write_bytes_atomic`."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes_atomic(path, buf.getvalue())
    return path


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """safetensors' ``save_file`` into a fresh, unguessable temp name beside ``path``, renamed over
    it: a link planted at ``path`` is replaced, never written through."""
    import secrets

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def move_into(src_dir: Path, out: Path) -> list[str]:
    """Rename every file of ``src_dir`` (a temp folder this process made inside ``out``) into
    ``out``, replacing what is there (a link is replaced, never followed), then remove
    ``src_dir``. Returns the names moved."""
    names = sorted(os.listdir(src_dir))
    for name in names:
        st = os.lstat(src_dir / name)
        if not stat.S_ISREG(st.st_mode):
            raise refusal(src_dir / name, file_kind(st.st_mode))
        os.replace(src_dir / name, out / name)
    os.rmdir(src_dir)
    return names


def json_safe(x: Any) -> Any:
    """``x`` with every NaN or infinity as None (JSON's null): what ia2cache prints and writes as
    JSON is read by other tools, and bare ``NaN`` is not JSON."""
    import math

    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
