"""The writer's lock on a cache: one writer job per cache key.

- **Local:** an ``fcntl`` lock on ``<cache>/.lock``, opened through no link and only if it is a
  regular file (a planted link would get the pid written over its target; a FIFO would block the
  open). The lock dies with its process, so it is never stale.
- **Remote:** an object ``<cache>/.lock`` made with a conditional PUT (``If-None-Match: *``, which
  S3 and S3-compatible servers honour; fsspec backends without it fall back to exists-then-write,
  which is not atomic). It holds the holder's host, pid and start time and is deleted on release.
  A lock left by a killed process on the same host (its pid is gone) is taken over; one from
  another host is refused with its URL, to be deleted by hand. The takeover replaces the stale
  object only if it is still the one read (S3: a PUT with ``If-Match`` on its ETag; other
  backends re-read it just before), and every taker reads the lock back after writing it, so of
  two processes taking over the same stale lock exactly one holds it.

Under torchrun only rank 0 takes the lock, for the whole job (:mod:`ia2cache.distributed`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia2cache._io import open_beneath
from ia2cache.errors import IA2Error

if TYPE_CHECKING:
    from ia2cache.store.locations import RemotePath

__all__ = ["local_lock", "remote_lock"]


@contextlib.contextmanager
def local_lock(folder: Path, rel: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``folder / rel``; the holder's pid is written in it.

    Raises:
        IA2Error: another process holds it, or the lock file is a link or special file.
    """
    lock_path = folder / rel
    fd = open_beneath(folder, lock_path, os.O_RDWR | os.O_CREAT, 0o666, follow_root=False)
    f = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise IA2Error(
                f"another ia2cache process is writing {folder} (lock file {lock_path}, "
                f"pid {holder}); wait for it to finish and run the same command again (a complete "
                "cache is then reused, a partial one resumed). The lock dies with its process, so "
                "it is never stale"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()


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
def remote_lock(lock: RemotePath, what: str | None = None) -> Iterator[None]:
    """Hold the lock object ``lock`` (conditional create) while writing ``what`` (a remote cache)."""
    what = what or str(lock.parent)
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
                f"another ia2cache process is writing {what} (lock object {lock}, host "
                f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}); wait for it, or delete "
                f"the lock object if that process is gone"
            ) from None
    holder = _read_holder(lock)
    if holder.get("token") != me["token"]:  # lost a race with another taker: theirs is stored
        raise IA2Error(
            f"another ia2cache process is writing {what} (lock object {lock}, host "
            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}); it took the lock at the same "
            "moment as this one"
        )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if _read_holder(lock).get("token") == me["token"]:
                lock.unlink(missing_ok=True)
