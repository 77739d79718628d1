"""The loader: stream seeded, resumable training batches from a complete cache.

Each batch holds what a training step needs for its rows: the student prompt, the response
the teacher's activations were taken on, the gold target, the aligned student positions with
their mask, the activations of the chosen layers, and the teacher's top-k log-probs when the
cache has them.

How rows are ordered (a pure function of seed, epoch and read unit; :meth:`CacheLoader.order`):
the split's rows are grouped in read units (``read_rows``; by default two of the cache's
chunks, :func:`default_read_rows`). With ``shuffle``, epoch ``e`` permutes the units with
``np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, e])))``, concatenates their
rows, and permutes each consecutive window of ``shuffle_buffer`` rows with that same generator
(a block shuffle). Batches are consecutive slices of that order.

How data is read: never the whole store. A daemon thread reads unit by unit, in the order
the remaining batches first need them, ``prefetch`` units at a time
(:meth:`~ia2cache.store.Cache.read_many`): each unit is one read of the one activation array
``acts/<site>`` for the asked layers, plus the top-k logits; every inner chunk's crc32c is
checked. Uncompressed arrays of a local cache (what collect writes) are read by
:mod:`~ia2cache.store.direct` straight into buffers that the assembler hands back once their rows
are emitted (:class:`_Pool`: fresh memory costs more than the read here); others go through zarr.
The small ``tokens/`` arrays are read once per loader, for the split only (while the reader
thread reads the first chunks). A read that fails is narrowed to the chunk, and the damage is
named by array and rows (or, with ``skip_damaged``, its rows were left out up front).

What a batch holds: activations in the *stored* dtype (bf16 stays bf16; int8 comes with its
scales in :attr:`Batch.act_scales`), so that a GPU receives half the bytes (or a quarter) and
the conversion to float happens on the device (:meth:`Batch.activations`). With CUDA present the
batches are gathered into pinned memory, so that ``.to(device, non_blocking=True)`` overlaps.

Memory: the assembler keeps decoded units (``read_rows`` rows) until all their rows of
the epoch are emitted. A row moves less than a window from its place in the unit stream, so the
units held while batch ``k`` is gathered are those with rows within a window of its rows: at most
``batch_size + 2 * (shuffle_buffer + rows_per_unit)`` rows (:attr:`CacheLoader.max_rows_held`),
on top of at most ``2 * prefetch`` units in flight (a group being read, and the queue),
``2 * prefetch + 2`` spent units' buffers kept for the reader to reuse, and up to 4 batch buffers
per array (:class:`_BatchMemory`). A batch is one ``torch.stack`` of its rows, its one copy after
the read (beside a conversion asked by ``dtype``, and the pending rows picked from a unit that
holds rows of another rank, or rows a resume skips).

Launch: ``for batch in CacheLoader("<store>/<key>", LoaderConfig(batch_size=4)): ...``
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ia2cache.errors import IA2Error
from ia2cache.store import ArraySpec, Cache, act_path, check_chunk, decode_activations, dequantize, layout
from ia2cache.store.ledger import DAMAGE_ERRORS

if TYPE_CHECKING:
    from ia2cache.models import ModelInfo

__all__ = ["Batch", "CacheLoader", "LoaderConfig"]

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "train+unlabelled")
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_FP16_MAX = 65504.0
_TOKENS = (
    layout.STUDENT_IDS,
    layout.STUDENT_LEN,
    layout.RESPONSE_IDS,
    layout.RESPONSE_LEN,
    layout.TARGET_IDS,
    layout.TARGET_LEN,
    layout.STUDENT_POSITIONS,
    layout.POSITIONS_LEN,
)
_TOPK = (layout.TOPK_VALUES, layout.TOPK_IDS)
ORDER = "block-shuffle"
"""The row order a loader's state was saved with (module docstring); states from before it, with
no ``order``, used a shuffle buffer."""
_JOIN_SECONDS = 30.0
_BUFFER = "_buffer"
"""Key of a read unit's pooled activation array, beside its decoded tensors (reader -> assembler)."""


@dataclass(frozen=True)
class LoaderConfig:
    """How to stream one split of a cache."""

    batch_size: int = 4
    """Rows per batch."""
    split: str = "train"
    """Which rows: ``train`` (the N labelled rows), ``dev``, or ``train+unlabelled`` (the labelled
    rows and those of ``collect --unlabelled M``, which carry activations but no targets)."""
    layers: tuple[int, ...] | None = None
    """Layers to load, a subset of the cache's; None: all stored; (): none (token objectives)."""
    seed: int = 0
    """Seed of the row order (unit permutation + shuffle within windows), per epoch."""
    shuffle: bool = True
    """Shuffle the rows each epoch; False: row order (dev loaders)."""
    shuffle_buffer: int = 64
    """Rows shuffled together: after the read units are permuted, each consecutive window of this
    many rows is permuted. More mixes better and holds more rows in memory (about two windows). A
    window no larger than a batch that divides it leaves which rows meet in a batch to the unit
    permutation alone (only their order within the batch changes)."""
    prefetch: int = 4
    """Read units (``read_rows``) the background thread reads ahead, in one call
    (:meth:`Cache.read_many`: direct reads, or one concurrent zarr call whose fixed cost, ~1 ms, is
    then paid once for all of them)."""
    dtype: str | None = None
    """Activations as stored (None: bf16 stays bf16, int8 comes with its scales; convert on the
    device with :meth:`Batch.activations`), or float32, bfloat16 or float16 here, in the loader."""
    drop_last: bool = False
    """Drop the last batch of an epoch when it is short."""
    topk: bool = True
    """Load the teacher's cached top-k log-probs when the cache holds them."""
    keep_in_memory_mb: int = 256
    """Keep decoded chunks across epochs when the split's activations fit in this many MB (a
    few-shot cache does), so later epochs read nothing from disk; 0 always streams."""
    read_rows: int | None = None
    """Rows read per unit and permuted as one unit, a multiple of the cache's chunk; None: two
    chunks where a shard holds an even number of them, else one (:func:`default_read_rows`).
    Bigger units make fewer, larger reads at the price of coarser shuffling (rows still mix
    within each ``shuffle_buffer`` window); the chunk itself gives the finest order."""
    rank: int = 0
    """Data-parallel rank (torchrun): each batch holds only this rank's share of the global batch."""
    world_size: int = 1
    """Data-parallel ranks. Batch k of the epoch is the same global batch of ``batch_size`` rows
    as in one process; rank r gets its rows r, r+W, ... (the order is unchanged)."""
    checksums: bool = False
    """Also compare every chunk read with its sha256 in the ledger, as ``verify`` does (zarr's
    crc32c checks every read anyway: flipped bytes, truncated or deleted shard files). sha256 also
    catches a shard file swapped for another cache's; it costs about 1.5 ms a MB here."""
    skip_damaged: bool = False
    """Train without the rows of damaged chunks instead of failing: the split is read once up
    front and every chunk checked against the ledger's sha256; how many rows are dropped is
    logged (:attr:`CacheLoader.skipped_rows`)."""
    pin_memory: bool | None = None
    """Gather batches into pinned memory (faster, asynchronous copies to a GPU); None: when CUDA is
    available."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise IA2Error(f"--batch-size {self.batch_size}: must be at least 1")
        if self.split not in SPLITS:
            raise IA2Error(f"split {self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.layers is not None:
            layers = tuple(int(i) for i in self.layers)
            if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise IA2Error(f"--layers {list(self.layers)}: layers must be distinct and >= 0")
            object.__setattr__(self, "layers", layers)
        if self.seed < 0:
            raise IA2Error(f"--seed {self.seed}: must be 0 or more")
        if self.shuffle_buffer < 1:
            raise IA2Error(f"shuffle_buffer {self.shuffle_buffer}: must be at least 1")
        if self.prefetch < 1:
            raise IA2Error(f"prefetch {self.prefetch}: must be at least 1")
        if self.dtype is not None and self.dtype not in TORCH_DTYPES:
            raise IA2Error(f"loader dtype {self.dtype!r}: choose one of {', '.join(TORCH_DTYPES)}, or "
                           "None (as stored)")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise IA2Error(f"rank {self.rank} of world size {self.world_size}: need 0 <= rank < world")


@dataclass
class Batch:
    """One training batch. Token ids are right padded with the loader's ``pad_id``."""

    rows: torch.Tensor
    """(B,) int64: the rows of the cache."""
    student_ids: torch.Tensor
    """(B, L) int64: student prompts; L is the longest in the batch."""
    student_len: torch.Tensor
    """(B,) int64."""
    response_ids: torch.Tensor
    """(B, T) int64: the response the activations were taken on."""
    response_len: torch.Tensor
    """(B,) int64."""
    target_ids: torch.Tensor
    """(B, Tg) int64: the gold target (" " + target); Tg is the longest in the batch."""
    target_len: torch.Tensor
    """(B,) int64."""
    student_positions: torch.Tensor
    """(B, P) int64: student positions of the aligned slots (in prompt + response); pads are 0."""
    position_mask: torch.Tensor
    """(B, P) bool: True at the slots that hold an aligned position."""
    acts: dict[int, torch.Tensor]
    """Layer -> (B, P, H) teacher activations, zero at masked slots: in the stored dtype
    (bfloat16, float16, float32, or int8 with :attr:`act_scales`) unless the loader's ``dtype``
    converted them. :meth:`activations` gives float32 on a device."""
    topk_values: torch.Tensor | None = None
    """(B, P, K) float32 teacher top-k log-probs, or None."""
    topk_ids: torch.Tensor | None = None
    """(B, P, K) int64 their token ids (pads are 0), or None."""
    global_rows: int = 0
    """Rows of the global batch this batch is a share of (data-parallel ranks); equals B alone
    (0, the default, means B)."""
    act_scales: dict[int, torch.Tensor] | None = None
    """Layer -> (B, P) float32 scales of int8 activations (value = int8 x scale); None otherwise."""

    def __post_init__(self) -> None:
        if self.global_rows <= 0:
            self.global_rows = int(self.rows.shape[0])

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def activations(self, device: torch.device | str) -> dict[int, torch.Tensor]:
        """Layer -> (B, P, H) float32 teacher activations on ``device``: the stored bytes are moved
        (asynchronously from pinned memory) and converted, and int8 scaled, there."""
        dev = torch.device(device)
        blocking = dev.type == "cpu"
        scales = self.act_scales or {}
        out = {}
        for i, a in self.acts.items():
            s = scales.get(i)
            out[i] = dequantize(a.to(dev, non_blocking=not blocking),
                                None if s is None else s.to(dev, non_blocking=not blocking))
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""

        def move(t: Any) -> Any:
            return t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t

        skip = ("acts", "act_scales")
        kw: dict[str, Any] = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        kw["acts"] = {i: move(a) for i, a in self.acts.items()}
        scales = self.act_scales
        kw["act_scales"] = None if scales is None else {i: move(a) for i, a in scales.items()}
        return Batch(**kw)


# ----------------------------------------------------------------------------- order


def default_read_rows(rows_per_chunk: int, rows_per_shard: int) -> int:
    """The loader's read unit when ``read_rows`` is None: two chunks of rows where a shard holds an
    even number of them, else one chunk.

    zarr writes a shard's inner chunks in Morton order, so where chunks also split the layers the
    chunks of two consecutive row chunks and two layer chunks lie together in the file: a unit of
    two row chunks is 3 ``preadv`` calls for 16 rows of the default layout (30 layers in chunks of
    5) where units of one chunk need 12, and half the per-unit work. Measured on the GB cache of
    ``benchmarks/loader_throughput`` (fastest of 4 interleaved rounds): a new loader's epoch 0.74
    -> 0.60 s, a later epoch 0.62 -> 0.50 s; units of a whole shard (32 rows) were no faster
    (0.64 s and 0.49 s) and hold more memory."""
    two = 2 * rows_per_chunk
    return two if rows_per_shard % two == 0 else rows_per_chunk


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))


def _shuffle_rows(chunks: list[tuple[int, int]], window: int, rng: np.random.Generator) -> np.ndarray:
    """Permute the read units (``chunks``), then permute each consecutive run of ``window`` rows
    of their stream.

    A block shuffle (as FFCV's quasi-random order): a row moves only within its window, so the
    loader holds only the chunks of the windows one batch touches, and copies a row once, into
    its batch. (A shuffle buffer, which this replaced, let a row linger for long: its chunk stayed
    in memory or was compacted, copied again: 61 compactions in an epoch of 114 batches here.)"""
    perm = rng.permutation(len(chunks))
    stream = np.concatenate([np.arange(*chunks[i], dtype=np.int64) for i in perm])
    if window == 1:  # (a permutation of one row draws nothing from rng)
        return stream
    for s in range(0, len(stream), window):
        run = stream[s : s + window]
        stream[s : s + window] = run[rng.permutation(len(run))]
    return stream


# ----------------------------------------------------------------------------- assembly


class _Block:
    """Decoded rows held in memory: a unit as read (or its rows still pending)."""

    __slots__ = ("buffer", "data", "live", "rows")

    def __init__(self, rows: np.ndarray, data: dict[str, torch.Tensor], buffer: np.ndarray | None) -> None:
        self.rows = rows
        self.data = data
        self.live = len(rows)
        self.buffer = buffer  # the pooled array under data["acts"], handed back when the block goes


class _Pool:
    """Activation buffers the assembler hands back once their rows are emitted, reused by the
    reader thread: writing into fresh memory (page faults, zeroing) cost more than the direct
    reads themselves here (a 0.25 GB cache read 8 rows at a time, 4 arrays alive at once:
    0.88 GB/s into new arrays against 2.6-3.7 GB/s into reused ones). Only arrays it allocated
    come back (a read through zarr, or of a layer subset that is not one run, makes its own), and
    it keeps at most ``most`` (the reader's group and its queue: ``2 * prefetch + 2``)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._mine: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._held = 0

    def alloc(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                self._held -= 1
                return free.pop()
            a = np.empty(shape, dtype)
            self._mine[id(a)] = a
        return a

    def give(self, a: np.ndarray) -> None:
        """Keep ``a`` for reuse if this pool made it (and has room); else let it go."""
        with self._lock:
            if self._held < self.most and self._mine.get(id(a)) is a:
                self._free.setdefault((a.shape, a.dtype.str), []).append(a)
                self._held += 1


class _BatchMemory:
    """Memory of the batches' stacked arrays, reused once no batch made from it is alive.

    A fresh 9 MB batch costs a page fault every 4 KB: stacking a shuffled GB into new tensors took
    0.45 s here, into reused ones 0.25 s. torch sees each buffer through ``torch.from_numpy`` of a
    fresh NumPy view of it, which torch's storage keeps alive for as long as any tensor (a batch's
    array, a view of one layer, a NumPy view of those) uses it; the pool holds only a weak
    reference to that view, so a buffer is free exactly when its view is gone. A batch the caller
    keeps keeps its buffer: the pool then allocates anew, keeping up to ``most`` buffers a shape.
    Used by the consumer's thread only."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._bufs: dict[tuple[tuple[int, ...], torch.dtype],
                         list[tuple[np.ndarray, weakref.ref[np.ndarray]]]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` (one of :data:`_NUMPY_SAME`) that nothing else uses."""
        bufs = self._bufs.setdefault((shape, dtype), [])
        free = [i for i, (_, seen) in enumerate(bufs) if seen() is None]
        buf = bufs[free[0]][0] if free else np.empty(shape, dtype=_NUMPY_SAME[dtype])
        view = buf.view()
        if free:
            bufs[free[0]] = (buf, weakref.ref(view))
        elif len(bufs) < self.most:
            bufs.append((buf, weakref.ref(view)))
        t = torch.from_numpy(view)
        return t if t.dtype == dtype else t.view(dtype)


_NUMPY_SAME = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32,
               torch.int8: np.int8, torch.int64: np.int64, torch.int32: np.int32}
"""NumPy dtypes of the same item size as the torch dtypes a batch stacks (bf16: as uint16 bits)."""


class _Assembler:
    """Holds decoded blocks, gathers batches from them, and drops spent ones."""

    def __init__(self, start: int, pending: np.ndarray, pin: bool = False, pool: _Pool | None = None,
                 batches: _BatchMemory | None = None) -> None:
        self.start = start
        self.pin = pin
        self.pool = pool
        self.batches = batches
        self.pending = pending  # over the split's rows: still to be emitted this epoch
        self.block_of = np.full(len(pending), -1, dtype=np.int64)
        self.local_of = np.zeros(len(pending), dtype=np.int64)
        self.blocks: dict[int, _Block] = {}
        self.rows_held = 0
        self._next = 0

    def add(self, rows: np.ndarray, data: dict[str, torch.Tensor], buffer: np.ndarray | None = None) -> None:
        """Hold the decoded ``rows``; ``buffer``: the pooled array under ``data["acts"]``."""
        keep = self.pending[rows - self.start]
        if not keep.all():  # rows consumed before a resume, or in a dropped last batch
            idx = torch.from_numpy(np.flatnonzero(keep))
            data = {k: v.index_select(0, idx) for k, v in data.items()}
            rows = rows[keep]
            self._recycle(buffer)
            buffer = None
        if len(rows):
            self._new_block(rows, data, buffer)
        else:
            self._recycle(buffer)

    def _recycle(self, buffer: np.ndarray | None) -> None:
        if buffer is not None and self.pool is not None:
            self.pool.give(buffer)

    def _new_block(self, rows: np.ndarray, data: dict[str, torch.Tensor], buffer: np.ndarray | None) -> None:
        bid, self._next = self._next, self._next + 1
        self.blocks[bid] = _Block(rows, data, buffer)
        self.block_of[rows - self.start] = bid
        self.local_of[rows - self.start] = np.arange(len(rows))
        self.rows_held += len(rows)

    def take(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The data of ``rows`` (in that order); marks them emitted."""
        off = rows - self.start
        bids = self.block_of[off]
        if (bids < 0).any():
            raise RuntimeError(f"loader bug: rows {rows[bids < 0].tolist()} were not loaded")
        # One torch.stack of row views per array: a single copy into the batch. Gathering each
        # block's rows (index_select), concatenating and reordering copied every byte three
        # times: 4.6 ms against 0.93 ms for a bf16 batch of 32 x 30 x 8 x 576 from 16 blocks.
        picks = list(zip(bids.tolist(), self.local_of[off].tolist(), strict=True))
        keys = next(iter(self.blocks.values())).data.keys()
        out = {k: self._stack([self.blocks[b].data[k][i] for b, i in picks]) for k in keys}
        self.pending[off] = False
        self.block_of[off] = -1
        for b, _ in picks:
            self.blocks[b].live -= 1
        self._release(list(dict.fromkeys(bids.tolist())))
        return out

    def _stack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``parts`` stacked along a new first axis, into pinned memory when asked."""
        if self.pin:  # torch's pinned allocator caches blocks, and knows of copies in flight
            out = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=True)
        elif self.batches is not None and parts[0].dtype in _NUMPY_SAME:
            out = self.batches.take((len(parts), *parts[0].shape), parts[0].dtype)
        else:
            return torch.stack(parts)
        return torch.stack(parts, out=out)

    def _release(self, touched: list[int]) -> None:
        """Drop the spent blocks among ``touched``, handing their buffers back to the pool."""
        for b in touched:
            blk = self.blocks[b]
            if blk.live == 0:
                del self.blocks[b]
                self.rows_held -= len(blk.rows)
                self._recycle(blk.buffer)


class _Failure:
    """An exception raised in the reader thread, carried to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _reader(
    read: Callable[[list[tuple[int, int]]], list[dict[str, torch.Tensor]]],
    chunks: list[tuple[int, int]],
    group: int,
    q: queue.Queue,
    stop: threading.Event,
) -> None:
    """Body of the reader thread: read and decode ``chunks`` in order, ``group`` at a time (one
    concurrent read), into ``q``."""
    try:
        for g in range(0, len(chunks), group):
            if stop.is_set():
                return
            units = chunks[g : g + group]
            for (a, b), data in zip(units, read(units), strict=True):
                if not _put(q, (a, b, data), stop):
                    return
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put(q, _Failure(e), stop)


# ----------------------------------------------------------------------------- loader


class CacheLoader:
    """Seeded, resumable batches of one split of a complete cache.

    One ``for batch in loader`` runs one epoch from the current position; at its end the
    epoch advances and the position returns to 0. :meth:`state_dict` after any batch and
    :meth:`load_state_dict` on a new loader resume exactly there. Iterate one epoch at a
    time: two live iterators of one loader share its position.

    Args:
        cache: a :class:`~ia2cache.store.Cache` or the path of a cache directory.
        config: what to load and in which order.
        model_info: the model being trained; its fingerprints must match the manifest's.
        allow_model_mismatch: accept a cache made by another model or tokenizer (a warning).
        pad_id: the id that pads student, response and target ids.

    Raises:
        IA2Error: the cache is not complete, was made by another model, lacks a layer asked
            for, or has no rows in the split.
    """

    wait_seconds: float
    """Seconds iteration spent blocked waiting for data (cumulative)."""
    bytes_read: int
    """Activation bytes read from the store (cumulative, as stored)."""
    chunks_read: int
    """Read units (``read_rows`` rows each) read (cumulative)."""
    max_rows_held: int
    """Peak rows held decoded by the assembler (queue not included)."""
    max_chunks_held: int
    """Peak decoded data in read units: ceil(rows held / read_rows) + units queued."""
    skipped_rows: int
    """Rows of the split left out because a chunk holding them is damaged (``skip_damaged``)."""

    def __init__(
        self,
        cache: Cache | str | Path,
        config: LoaderConfig,
        *,
        model_info: ModelInfo | None = None,
        allow_model_mismatch: bool = False,
        pad_id: int = 0,
    ) -> None:
        self.cache = cache if isinstance(cache, Cache) else Cache.open(cache)
        self.config = config
        self.pad_id = int(pad_id)
        manifest = self.cache.manifest
        if self.cache.status != "complete":
            raise IA2Error(
                f"cache {self.cache.path} is {self.cache.status}, not complete: run `ia2cache collect` "
                f"again with the same options to finish it"
            )
        if model_info is not None:
            self._check_model(model_info, allow_model_mismatch)
        self._rows = self._split_rows()
        cache = self.cache
        self._unit = config.read_rows or default_read_rows(cache.rows_per_chunk, cache.rows_per_shard)
        if self._unit % self.cache.rows_per_chunk:
            raise IA2Error(
                f"read_rows {config.read_rows}: must be a multiple of the cache's chunk "
                f"({self.cache.rows_per_chunk} rows)"
            )
        self._layers = self._resolve_layers()
        site = manifest.site or ""
        self._acts = act_path(site) if self._layers else None
        spec = self.cache.specs.get(self._acts) if self._acts else None
        self._scales = spec.scales if spec is not None else None
        self._logical = spec.logical_dtype if spec is not None else None
        self._topk = config.topk and all(k in self.cache.specs for k in _TOPK)
        missing = [k for k in _TOKENS if k not in self.cache.specs]
        if missing:
            raise IA2Error(f"cache {self.cache.path} lacks the arrays {missing}; collect it again")
        for p in self._paths():
            self.cache.array(p)  # open once here, not concurrently in reader threads
        if config.dtype == "float16":
            self._check_fp16()
        # (array, first row of chunk) -> why it is damaged; rows of the split still used.
        self._damaged: dict[tuple[str, int], str] = {}
        self._good: np.ndarray | None = None
        self.skipped_rows = 0
        if config.skip_damaged:
            self._scan_damage()
        self._check_shares()  # after the scan: skipped rows leave every epoch's order
        self._pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        self._pool = _Pool(2 * config.prefetch + 2)
        self._batches = _BatchMemory(4)
        self.epoch = 0
        self.position = 0
        self._tokens: dict[str, torch.Tensor] | None = None
        # What it cost: seconds its consumer waited, what it read, the most it held at once.
        self.wait_seconds, self.bytes_read, self.chunks_read = 0.0, 0, 0
        self.max_rows_held = self.max_chunks_held = 0
        # Decoded units by row range, reused by every later epoch; None: stream every epoch.
        self._kept_chunks: dict[tuple[int, int], dict[str, torch.Tensor]] | None = (
            {} if self._split_mb(spec) <= config.keep_in_memory_mb else None
        )

    def _split_mb(self, spec: ArraySpec | None) -> float:
        """MB of activations the split's rows take as the loader yields them."""
        if spec is None:
            return 0.0
        dtype = self.config.dtype
        itemsize = (torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size() if dtype
                    else np.dtype(spec.dtype).itemsize)
        return len(self._rows) * int(np.prod(spec.shape[1:])) * len(self._layers) * itemsize / 1e6

    # ------------------------------------------------------------------ checks

    def _paths(self) -> list[str]:
        """The row arrays each chunk read reads: activations (and scales), top-k."""
        out = [p for p in (self._acts, self._scales) if p]
        return out + (list(_TOPK) if self._topk else [])

    def _check_model(self, info: ModelInfo, allow: bool) -> None:
        model = self.cache.manifest.get("model", {})
        stored = (model.get("fingerprint"), model.get("tokenizer_fingerprint"))
        given = (info.fingerprint, info.tokenizer_fingerprint)
        if stored == given:
            return
        msg = (
            f"cache {self.cache.path} was made by model {model.get('name')!r} (fingerprint {stored[0]}, "
            f"tokenizer {stored[1]}), not by {info.name!r} (fingerprint {given[0]}, tokenizer {given[1]})"
        )
        if not allow:
            raise IA2Error(f"{msg}; pass --allow-model-mismatch to train on it anyway")
        log.warning("%s; going on (--allow-model-mismatch)", msg)

    def _split_rows(self) -> range:
        m = self.cache.manifest
        if m.split != "train":
            raise IA2Error(
                f"cache {self.cache.path} holds {m.split} rows (collect --split {m.split}), for "
                "`ia2cache analyze`; distill needs a train cache: collect it without --split"
            )
        n_train, n_dev = m.count("n_train"), m.count("n_dev")
        n_unl = m.count("n_unlabelled") or 0
        if n_train is None or n_dev is None:
            raise IA2Error(f"cache {self.cache.path}: the manifest lacks n_train/n_dev")
        if n_train + n_unl + n_dev != self.cache.n_rows:
            raise IA2Error(
                f"cache {self.cache.path}: n_train {n_train} + n_unlabelled {n_unl} + n_dev {n_dev} "
                f"!= rows {self.cache.n_rows}"
            )
        # Rows are stored train | unlabelled | dev (prompts.build_rows).
        rows = {
            "train": range(0, n_train),
            "train+unlabelled": range(0, n_train + n_unl),
            "dev": range(n_train + n_unl, n_train + n_unl + n_dev),
        }[self.config.split]
        if not rows:
            raise IA2Error(f"cache {self.cache.path} has no {self.config.split} rows")
        return rows

    def _check_shares(self) -> None:
        """With several ranks, every rank must get at least one row of every batch."""
        w, bs, n = self.config.world_size, self.config.batch_size, len(self._rows) - self.skipped_rows
        if w == 1:
            return
        tail = 0 if self.config.drop_last else n % bs
        if bs < w or n < w or 0 < tail < w:
            raise IA2Error(
                f"--batch-size {bs} with {w} ranks: every rank needs a row of every batch, but the "
                f"{self.config.split} split has {n} rows (last batch {tail or min(bs, n)}); use a "
                f"batch size of at least {w} whose last batch has at least {w} rows, or fewer ranks"
            )

    def _resolve_layers(self) -> list[int]:
        m = self.cache.manifest
        if not m.layers or m.site is None:
            raise IA2Error(f"cache {self.cache.path}: the manifest's layers {m.get('layers')!r} / site "
                           f"{m.get('site')!r} are malformed; run `ia2cache verify {self.cache.path}`")
        want = list(m.layers if self.config.layers is None else self.config.layers)
        self.cache.layer_positions(want)  # refuses a layer the cache lacks
        if want and act_path(m.site) not in self.cache.specs:
            raise IA2Error(f"cache {self.cache.path} lacks the array {act_path(m.site)}; run "
                           "`ia2cache verify` on it")
        return want

    def _check_fp16(self) -> None:
        for i in self._layers:
            peak = self.cache.stats(act_path(self.cache.manifest.site or ""), i)["max_abs"]
            if peak > _FP16_MAX:
                raise IA2Error(
                    f"loader dtype float16 cannot hold layer {i} of {self.cache.path}: max |x| is "
                    f"{peak:.6g}, above {_FP16_MAX:g}; use bfloat16 or float32"
                )

    # ------------------------------------------------------------------ order and state

    @property
    def rows(self) -> range:
        """The split's rows of the cache."""
        return self._rows

    @property
    def layers(self) -> list[int]:
        """The layers each batch carries."""
        return list(self._layers)

    def __len__(self) -> int:
        n = len(self._rows) - self.skipped_rows
        bs = self.config.batch_size
        return n // bs if self.config.drop_last else math.ceil(n / bs)

    def _chunks(self) -> list[tuple[int, int]]:
        """The split's read units as [start, stop) rows; one cut by the split boundary is partial."""
        rpc, r = self._unit, self._rows
        first = r.start // rpc
        return [
            (max(c * rpc, r.start), min((c + 1) * rpc, r.stop)) for c in range(first, (r.stop - 1) // rpc + 1)
        ]

    def _order(self, epoch: int) -> np.ndarray:
        if not self.config.shuffle:
            order = np.arange(self._rows.start, self._rows.stop, dtype=np.int64)
        else:
            order = _shuffle_rows(self._chunks(), self.config.shuffle_buffer, _rng(self.config.seed, epoch))
        if self._good is not None:  # damaged rows leave the order; the rest keep theirs
            order = order[self._good[order - self._rows.start]]
        return order

    def order(self, epoch: int) -> list[int]:
        """The row order of ``epoch``; computed without reading data."""
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        return self._order(epoch).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch on the next iteration."""
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, int | str]:
        """``{"epoch", "position" (batches already yielded this epoch), "seed", "order",
        "read_rows"}`` (``order``: which row order, :data:`ORDER`; ``read_rows``: its unit)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.config.seed, "order": ORDER,
                "read_rows": self._unit}

    def load_state_dict(self, state: dict) -> None:
        """Resume where :meth:`state_dict` was taken: the next iteration yields the batch after.

        Raises:
            IA2Error: the state was saved with another seed, or mid-epoch (shuffled) with another
                row order, or with another read unit than an explicit ``read_rows``, or is out of
                range. (With ``read_rows`` None, a loader takes the unit of a mid-epoch state.)
        """
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if seed != self.config.seed:
            raise IA2Error(
                f"--seed {self.config.seed}: the loader state to resume was saved with seed {seed}"
            )
        # At an epoch's start, or without shuffling, the rows to come do not depend on the order
        # or unit the state was saved with.
        mid = bool(position) and self.config.shuffle
        order = state.get("order", "shuffle-buffer")
        if mid and order != ORDER:
            raise IA2Error(
                f"the loader state to resume was saved mid-epoch (batch {position}) by a loader with "
                f"another row order ({order!r}, this one: {ORDER!r}): its next rows cannot be found; "
                f"resume from a checkpoint at an epoch boundary, or start again"
            )
        # States saved before the unit was recorded read ``read_rows`` or, by default, the chunk.
        unit = int(state.get("read_rows", self.config.read_rows or self.cache.rows_per_chunk))
        if mid and unit != self._unit:
            rpc = self.cache.rows_per_chunk
            if self.config.read_rows is not None or unit < rpc or unit % rpc:
                raise IA2Error(
                    f"the loader state to resume was saved mid-epoch (batch {position}) by a loader "
                    f"that read units of {unit} rows (this one: read_rows={self.config.read_rows}, "
                    f"{self._unit} rows): resume it with the same read_rows (LoaderConfig), or from "
                    f"a checkpoint at an epoch boundary"
                )
            # The default unit follows the state: the rest of the run reads as it was read.
            self._unit = unit
            if self._kept_chunks is not None:
                self._kept_chunks.clear()
        if epoch < 0 or not 0 <= position <= len(self):
            raise IA2Error(f"loader state {state} is out of range (0..{len(self)} batches per epoch)")
        self.epoch, self.position = epoch, position

    # ------------------------------------------------------------------ reading

    def _read_tokens(self) -> dict[str, torch.Tensor]:
        """The split's token arrays, decoded once: ids padded with pad_id, positions with 0."""
        a, b = self._rows.start, self._rows.stop
        out = {}
        for k, raw in zip(_TOKENS, self._read_all([(k, a, b) for k in _TOKENS]), strict=True):
            x = torch.from_numpy(raw.astype(np.int64))
            if k.endswith("_ids"):
                x = x.masked_fill(x < 0, self.pad_id)
            elif k == layout.STUDENT_POSITIONS:
                x = x.masked_fill(x < 0, 0)
            out[k.split("/", 1)[1]] = x
        return out

    def _read_units(self, units: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Rows [a, b) of each unit, decoded: the asked layers of the activations in their stored
        dtype (and int8's scales), and the top-k; in the reader thread, one concurrent read for all.
        Batches are gathered copies, so a kept unit is never modified by its consumers."""
        memo = self._kept_chunks if self._kept_chunks is not None else {}
        todo = [u for u in units if u not in memo]
        paths = self._paths()
        pooled = self._kept_chunks is None  # kept chunks live on: their memory is never reused
        alloc = self._pool.alloc if pooled else np.empty
        raws = self._read_all([(p, a, b) for a, b in todo for p in paths], alloc) if todo and paths else []
        fresh: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for i, (a, b) in enumerate(todo):
            got = dict(zip(paths, raws[i * len(paths) : (i + 1) * len(paths)], strict=True))
            out: dict[str, torch.Tensor] = {}
            if self._acts:
                self.bytes_read += got[self._acts].nbytes
                out["acts"] = decode_activations(got[self._acts], self._logical)
                if pooled:
                    out[_BUFFER] = got[self._acts]  # type: ignore[assignment]  # handed back when spent
            if self._scales:
                out["scales"] = torch.from_numpy(np.ascontiguousarray(got[self._scales]))
            if self._topk:
                out["topk_values"] = torch.from_numpy(got[layout.TOPK_VALUES].astype(np.float32))
                ids = torch.from_numpy(got[layout.TOPK_IDS].astype(np.int64))
                out["topk_ids"] = ids.masked_fill(ids < 0, 0)
            self.chunks_read += 1
            fresh[(a, b)] = out
        if self._kept_chunks is not None:
            self._kept_chunks.update(fresh)
        return [fresh[u] if u in fresh else memo[u] for u in units]

    def _read_all(self, requests: list[tuple[str, int, int]],
                  alloc: Callable[..., np.ndarray] = np.empty) -> list[np.ndarray]:
        """Each (array, first row, stop) read, in one concurrent call (direct reads into memory
        from ``alloc``); where that fails, each read alone, so that the damage is named
        (:meth:`_read_checked`)."""
        if self.config.checksums or self._damaged:
            return [self._read_checked(*r) for r in requests]
        try:
            return self.cache.read_many(requests, layers=self._layers, alloc=alloc)
        except OSError:
            raise  # the file system failing is not damage to skip
        except DAMAGE_ERRORS:
            return [self._read_checked(*r) for r in requests]

    def _read_checked(self, path: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of ``path``, read chunk by chunk where needed to name a damaged chunk (and,
        with ``checksums``, each chunk compared with the ledger's sha256). A chunk known damaged
        under ``skip_damaged`` reads as zeros: its rows never reach a batch."""
        layers = self._layers
        if not self.config.checksums:
            try:
                return self.cache.read(path, a, b, layers=layers)
            except OSError:
                raise
            except DAMAGE_ERRORS:
                pass  # find the chunk below
        rpc = self.cache.rows_per_chunk
        parts = []
        for c0 in range(a // rpc * rpc, b, rpc):
            c1 = min(c0 + rpc, self.cache.n_rows)
            want = self._want(path, c0) if self.config.checksums else None
            if isinstance(want, tuple):  # the ledger entry itself is unusable
                reason: str | None = want[1]
                data = None
            else:
                got = check_chunk(lambda c0=c0, c1=c1: self.cache.read(path, c0, c1, layers=layers), want)
                reason, data = got.reason, got.data
            if reason is not None:
                if (path, c0) not in self._damaged:
                    raise IA2Error(self._damage_message(path, c0, c1, reason))
                data = None
            if data is None:
                spec = self.cache.specs[path]
                shape = (c1 - c0, *spec.shape)
                if path in (self._acts, self._scales):  # read for the asked layers only
                    shape = (c1 - c0, len(layers), *spec.shape[1:])
                data = np.zeros(shape, dtype=spec.dtype)
            parts.append(data[max(a, c0) - c0 : min(b, c1) - c0])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _want(self, path: str, c0: int) -> str | tuple[None, str]:
        """The ledger's sha256 of the chunk of ``path`` starting at row ``c0``, or (None, why not)."""
        shard = c0 // self.cache.rows_per_shard
        try:
            s0 = self.cache.shard_rows(shard)[0]
            return self.cache.ledger_entry(shard).arrays[path].chunks[(c0 - s0) // self.cache.rows_per_chunk]
        except (OSError, ValueError, KeyError, IndexError) as e:
            return None, f"the ledger entry of shard {shard} is unusable ({type(e).__name__}: {e})"

    def _damage_message(self, path: str, c0: int, c1: int, reason: str) -> str:
        return (
            f"cache {self.cache.path}: array {path} rows [{c0}, {c1}) are damaged: {reason}; run "
            f"`ia2cache verify {self.cache.path}`, then the same `ia2cache collect` with --repair to "
            f"recompute the damaged shards, or pass --skip-damaged (LoaderConfig(skip_damaged=True)) "
            f"to train without those rows"
        )

    def _scan_damage(self) -> None:
        """Read the split's chunks of every array the loader uses once, each checked against the
        ledger's sha256; leave out the rows of damaged chunks."""
        r = self._rows
        bad = np.zeros(len(r), dtype=bool)
        for p in [*_TOKENS, *self._paths()]:
            for c0, c1, reason in self.cache.check_rows(p, r.start, r.stop):
                self._damaged[(p, c0)] = reason
                bad[max(c0, r.start) - r.start : min(c1, r.stop) - r.start] = True
                log.warning("cache %s: array %s rows [%d, %d) are damaged: %s", self.cache.path, p, c0, c1,
                            reason)
        self.skipped_rows = int(bad.sum())
        if self.skipped_rows == len(r):
            raise IA2Error(
                f"cache {self.cache.path}: every {self.config.split} row is damaged; recompute them with the "
                f"same `ia2cache collect` and --repair"
            )
        if self.skipped_rows:
            log.warning("skipping %d of %d %s rows of cache %s: they sit in damaged chunks (--skip-damaged)",
                        self.skipped_rows, len(r), self.config.split, self.cache.path)
            self._good = ~bad

    def _get(self, q: queue.Queue, thread: threading.Thread) -> tuple[int, int, dict[str, torch.Tensor]]:
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    item = q.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not thread.is_alive() and q.empty():
                        raise RuntimeError("the loader's reader thread ended early") from None
        finally:
            self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, _Failure):
            raise item.exc
        return item

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self.position
        bs, n_batches = self.config.batch_size, len(self)
        if start < n_batches:
            yield from self._epoch(epoch, start, n_batches, bs)
        self.epoch, self.position = epoch + 1, 0

    def _epoch(self, epoch: int, start: int, n_batches: int, bs: int) -> Iterator[Batch]:
        order = self._order(epoch)
        rk, w = self.config.rank, self.config.world_size
        # Batch k is order[k*bs:(k+1)*bs] as in one process; this rank keeps its rows r, r+W, ...
        shares = {k: order[k * bs : (k + 1) * bs][rk::w] for k in range(start, n_batches)}
        sizes = {k: min(bs, len(order) - k * bs) for k in shares}
        todo = np.concatenate([shares[k] for k in range(start, n_batches)]) if shares else order[:0]
        batch_of = np.concatenate(
            [np.full(len(shares[k]), k, dtype=np.int64) for k in range(start, n_batches)]
        ) if shares else np.zeros(0, dtype=np.int64)
        pending = np.zeros(len(self._rows), dtype=bool)
        pending[todo - self._rows.start] = True
        # Chunks in the order the remaining batches first need them; the batch that needs each.
        cid, first = np.unique(todo // self._unit, return_index=True)
        by_need = np.argsort(first, kind="stable")
        rpc, r = self._unit, self._rows
        chunks = [(max(int(c) * rpc, r.start), min((int(c) + 1) * rpc, r.stop)) for c in cid[by_need]]
        need_at = batch_of[first[by_need]].tolist()
        q: queue.Queue = queue.Queue(maxsize=self.config.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=_reader,
            args=(self._read_units, chunks, self.config.prefetch, q, stop),
            name=f"ia2cache-loader-{id(self):x}",
            daemon=True,
        )
        thread.start()
        asm = _Assembler(r.start, pending, self._pin, self._pool, self._batches)
        loaded = 0
        try:
            if self._tokens is None:  # while the reader thread reads the first chunks
                t0 = time.perf_counter()
                self._tokens = self._read_tokens()
                self.wait_seconds += time.perf_counter() - t0
            for k in range(start, n_batches):
                while loaded < len(chunks) and need_at[loaded] <= k:
                    a, b, data = self._get(q, thread)
                    if (a, b) != chunks[loaded]:
                        raise RuntimeError(f"loader bug: got chunk {(a, b)}, expected {chunks[loaded]}")
                    data = dict(data)
                    buffer = data.pop(_BUFFER, None)
                    asm.add(np.arange(a, b, dtype=np.int64), data, buffer)  # type: ignore[arg-type]
                    loaded += 1
                self.max_rows_held = max(self.max_rows_held, asm.rows_held)
                held = math.ceil(asm.rows_held / rpc) + q.qsize()
                self.max_chunks_held = max(self.max_chunks_held, held)
                rows = shares[k]
                batch = self._batch(rows, asm.take(rows) if asm.blocks else {})
                batch.global_rows = sizes[k]
                self.position = k + 1
                yield batch
        finally:
            stop.set()
            while not q.empty():  # unblock a put
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            thread.join(_JOIN_SECONDS)

    def _batch(self, rows: np.ndarray, data: dict[str, torch.Tensor]) -> Batch:
        assert self._tokens is not None
        idx = torch.from_numpy(rows - self._rows.start)
        t = {k: v.index_select(0, idx) for k, v in self._tokens.items()}
        s_w = max(1, int(t["student_len"].max()))
        g_w = max(1, int(t["target_len"].max()))
        p = t["student_positions"].shape[1]
        acts: dict[int, torch.Tensor] = {}
        scales: dict[int, torch.Tensor] | None = None
        if "acts" in data:
            block, sc = data["acts"], data.get("scales")
            if self.config.dtype is not None:
                block, sc = dequantize(block, sc).to(TORCH_DTYPES[self.config.dtype]), None
            acts = {layer: block[:, j] for j, layer in enumerate(self._layers)}
            if sc is not None:
                scales = {layer: sc[:, j] for j, layer in enumerate(self._layers)}
        return Batch(
            rows=torch.from_numpy(rows.copy()),
            student_ids=t["student_ids"][:, :s_w].contiguous(),
            student_len=t["student_len"],
            response_ids=t["response_ids"],
            response_len=t["response_len"],
            target_ids=t["target_ids"][:, :g_w].contiguous(),
            target_len=t["target_len"],
            student_positions=t["student_positions"],
            position_mask=torch.arange(p)[None, :] < t["positions_len"][:, None],
            acts=acts,
            topk_values=data.get("topk_values"),
            topk_ids=data.get("topk_ids"),
            act_scales=scales,
        )
