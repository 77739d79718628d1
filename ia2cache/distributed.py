"""Rank, world and collective helpers for runs launched by ``torchrun``; every one is a no-op in
a plain single process (``WORLD_SIZE`` unset or 1). Nothing crosses between ranks as pickle. How
collect and distill use them, the backends, and what happens when a rank fails:
``docs/distributed.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ia2cache.errors import IA2Error

__all__ = [
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "device",
    "init",
    "is_main",
    "local_rank",
    "my_share",
    "rank",
    "rank0_call",
    "world_size",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

BACKEND = "gloo"
"""The backend without CUDA; with CUDA it is :data:`CUDA_BACKEND`."""
CUDA_BACKEND = "cpu:gloo,cuda:nccl"
TIMEOUT_S = float(os.environ.get("IA2CACHE_DIST_TIMEOUT", "1800"))
"""Seconds a collective waits for the other ranks before failing (env IA2CACHE_DIST_TIMEOUT)."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise IA2Error(f"environment variable {name}={raw!r}: expected an integer") from None


def world_size() -> int:
    """Processes in the job: ``WORLD_SIZE`` as set by torchrun, 1 otherwise."""
    w = _env_int("WORLD_SIZE", 1)
    if w < 1:
        raise IA2Error(f"environment variable WORLD_SIZE={w}: must be at least 1")
    return w


def rank() -> int:
    """This process's rank: ``RANK`` as set by torchrun, 0 otherwise."""
    r = _env_int("RANK", 0)
    if not 0 <= r < world_size():
        raise IA2Error(f"environment variable RANK={r}: must be in 0..WORLD_SIZE-1 ({world_size() - 1})")
    return r


def is_main() -> bool:
    """True on rank 0 (and in every single-process run)."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` as set by torchrun, 0 otherwise."""
    r = _env_int("LOCAL_RANK", 0)
    if r < 0:
        raise IA2Error(f"environment variable LOCAL_RANK={r}: must be at least 0")
    return r


def device() -> torch.device:
    """The device this process computes on by default: CPU without CUDA; with CUDA, ``cuda`` in
    a single process and ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank). Where the
    launcher shows each rank only its own GPU (one visible device), that one, ``cuda:0``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if not _active():
        return torch.device("cuda")
    lr, n = local_rank(), torch.cuda.device_count()
    if n == 1:
        return torch.device("cuda", 0)
    if lr >= n:
        raise IA2Error(f"LOCAL_RANK={lr} but only {n} CUDA devices are visible: start at most {n} "
                       "processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", lr)


def _backend() -> str:
    import torch.distributed as dist

    return CUDA_BACKEND if torch.cuda.is_available() and dist.is_nccl_available() else BACKEND


def _active() -> bool:
    return world_size() > 1


def init() -> bool:
    """Join the process group when ``WORLD_SIZE > 1`` (idempotent). Returns whether distributed."""
    if not _active():
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise IA2Error("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise IA2Error(
                f"WORLD_SIZE={world_size()} but {', '.join(missing)} is not set: launch with "
                "`torchrun --nproc-per-node=N -m cli ...`"
            )
        backend = _backend()
        dev = device()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before the group: NCCL binds each rank to its own GPU
        dist.init_process_group(
            backend, rank=rank(), world_size=world_size(), timeout=timedelta(seconds=TIMEOUT_S)
        )
        log.info("rank %d of %d joined the %s process group on %s", rank(), world_size(), backend, dev)
        # Leave the group before the interpreter exits: gloo may otherwise abort the process
        # ("terminate called without an active exception") after its peer has exited.
        atexit.register(_leave)
    return True


def _leave() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process). A one-number CPU ``all_reduce``, so it
    runs on gloo under either backend and needs no guess of the rank's GPU."""
    if init():
        all_reduce_sum([0.0])


def _broadcast_bytes(data: bytes | None, src: int) -> bytes:
    """``data`` as rank ``src`` has it, on every rank: its length, then its bytes, as CPU tensors."""
    import torch.distributed as dist

    mine = rank() == src
    if mine and data is None:
        raise ValueError("the source rank must give the bytes to broadcast")
    size = torch.tensor([len(data) if mine and data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=src)
    n = int(size.item())
    if mine and data:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buf = torch.empty(n, dtype=torch.uint8)
    if n:
        dist.broadcast(buf, src=src)
    return buf.numpy().tobytes()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (no-op alone).

    JSON values only (``None``, bools, numbers including NaN/inf, strings, lists, dicts with
    string keys; tuples arrive as lists). It travels as JSON text, never as pickle.
    """
    if not init():
        return obj
    data = json.dumps(obj).encode("utf-8") if rank() == src else None
    return json.loads(_broadcast_bytes(data, src).decode("utf-8"))


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int = 0) -> dict[str, torch.Tensor]:
    """Rank ``src``'s named tensors on every rank, on CPU (identity alone; other ranks pass None).

    They travel as one safetensors buffer (names, dtypes, shapes in its JSON header), never as
    pickle.
    """
    if not init():
        return dict(tensors or {})
    from safetensors.torch import load, save

    data = None
    if rank() == src:
        data = save({k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()})
    return load(_broadcast_bytes(data, src))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks, in float64 (identity alone)."""
    if not init():
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items: ``items[rank::world]`` (all of them in a single process)."""
    return list(items[rank() :: world_size()])


def rank0_call(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its result (JSON values) on every rank.

    If ``fn`` raises, the other ranks are told and raise an :class:`IA2Error` with its message
    (rank 0 raises the original exception), so no rank waits at the next collective for a rank
    that has failed. Alone it is ``fn()``.
    """
    if not init():
        return fn()
    failure: BaseException | None = None
    box: dict[str, Any] = {}
    if is_main():
        try:
            box = {"ok": fn()}
            json.dumps(box)  # a result that cannot travel fails here, on rank 0, and is told
        except Exception as e:  # told to the others, then re-raised here
            failure = e
            if isinstance(e, IA2Error):
                box = {"error": str(e)}
            elif isinstance(e, OSError) and e.filename:
                box = {"error": f"rank 0: {e.filename}: {e.strerror or e}"}
            else:
                box = {"error": f"rank 0 failed: {type(e).__name__}: {e}"}
    box = broadcast_object(box)
    if failure is not None:
        raise failure
    if "error" in box:
        raise IA2Error(box["error"])
    return box["ok"]
