"""Rank, world and collective helpers for runs launched by ``torchrun``.

``torchrun --nproc-per-node=2 -m ia2cache.cli collect ...`` starts one process per rank with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. Every
helper here is a no-op in a plain single process (``WORLD_SIZE`` unset or 1), so the library
and the CLI behave exactly as before there. The process group is initialised lazily, only when
``WORLD_SIZE > 1``, with the ``gloo`` backend: it runs on CPU, and its collectives here move
only small Python objects and adapter gradients.

How collect uses it: rank 0 creates (or resumes) the cache, takes the cache lock and lists the
missing shards; it broadcasts that list (or the error that stopped it); rank ``r`` writes the
missing shards ``r, r+W, ...`` of that list, whole shards only; after a barrier rank 0 marks
the cache complete, and a last barrier lets every rank return the finished cache.

How distill uses it: every rank holds the whole adapter; each global batch is split across
ranks by the loader (rank ``r`` takes rows ``r, r+W, ...`` of the batch); gradients are summed
with one ``all_reduce`` per optimizer step; only rank 0 writes checkpoints, the adapter and
``run.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ia2cache.errors import IA2Error

__all__ = [
    "all_reduce_grads",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "broadcast_params",
    "init",
    "is_main",
    "main_holds",
    "my_share",
    "rank",
    "world_size",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

BACKEND = "gloo"
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
                "`torchrun --nproc-per-node=N -m ia2cache.cli ...`"
            )
        dist.init_process_group(
            BACKEND, rank=rank(), world_size=world_size(), timeout=timedelta(seconds=TIMEOUT_S)
        )
        log.info("rank %d of %d joined the %s process group", rank(), world_size(), BACKEND)
    return True


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if init():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (JSON-like values only; no-op alone)."""
    if not init():
        return obj
    import torch.distributed as dist

    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks, in float64 (identity alone)."""
    if not init():
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks, in place, with one flat ``all_reduce``
    (what DistributedDataParallel does, bucketed into a single buffer).

    A parameter without a gradient on this rank counts as zeros (and gets one), so every rank
    takes part in the same collective. Alone it does nothing.
    """
    if not init():
        return
    import torch.distributed as dist

    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    i = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        new = flat[i : i + n].view_as(g).to(g.dtype)
        if p.grad is None:
            p.grad = new.clone()
        else:
            p.grad.copy_(new)
        i += n


def broadcast_params(params: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (as DDP does at start)."""
    if not init():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            buf = p.detach().to("cpu").contiguous().clone()
            dist.broadcast(buf, src=src)
            p.copy_(buf.to(p.device))


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items: ``items[rank::world]`` (all of them in a single process)."""
    return list(items[rank() :: world_size()])


@contextlib.contextmanager
def main_holds(make_lock: Callable[[], contextlib.AbstractContextManager[Any]]) -> Iterator[None]:
    """Rank 0 holds ``make_lock()`` for the whole block; the other ranks only wait for it.

    The cache lock keeps a second *job* out; the ranks of one job are told apart by the shards
    they own, so they must not each try the lock (they would lock each other out). If rank 0
    cannot take the lock, every rank raises the same :class:`IA2Error`, so none waits forever.
    """
    if not init():
        with make_lock():
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if is_main():
            try:
                stack.enter_context(make_lock())
            except IA2Error as e:
                error = str(e)
        error = broadcast_object(error)
        if error is not None:
            raise IA2Error(error)
        yield
