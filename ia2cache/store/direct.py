"""Direct reads of uncompressed sharded arrays: the loader's hot path, beside zarr's.

Why this exists (measured, README "Performance", ``benchmarks/loader_throughput``): zarr-python
reads a format-2 activation array at 0.6-1.1 GB/s of one core here whatever the chunking, most
of it spent per chunk in its asyncio codec pipeline (a task, a buffer wrapper and a copy per
codec per chunk); the same bytes, checked the same way, read at ~4 GB/s with one ``preadv`` of
each chunk into a reused buffer, its crc32c, and one copy into the result (the first version of
this module). The loader's target (>= 1 GB/s on 2 cores, with batch assembly beside it) is out
of zarr's reach, so this module reads the one layout the activations are written in, and
nothing else. Now the wanted chunks of a shard are read in file order, each run of adjacent
ones (at most 64 MB) in one ``preadv`` that scatters every wholly wanted chunk straight into
place, with no copy after the read: 0.51 -> 0.31 s for a GB of shuffled chunks here, and the
loader's token arrays (912 small shard files a GB) 0.3 -> 0.075 s with the files opened from
their key's names (:func:`~ia2cache._io.open_parts_beneath`), a checked index remembered and
a short plan for chunks of whole rows. Plans are remembered too (per shard index, part of a
shard and output shape: a loader reads the same few parts of every shard): every chunk of a
shuffled GB 0.50 -> 0.41-0.45 s single-threaded.

What it reads: an array whose zarr metadata (zarr's own parse of ``zarr.json``) is exactly
- a regular chunk grid (one shard file per grid cell) with the default chunk key encoding and
  ``/`` (``<array>/c/<i>/<j>/...``);
- one ``sharding_indexed`` codec, index at the end, index codecs ``bytes`` (little) + ``crc32c``;
- inner codecs ``bytes`` (little endian, or a 1-byte dtype) + ``crc32c``: no compressor;
in a local store of ``ia2cache`` opened read-only (:class:`~ia2cache.store.locations.LocalLocation`),
whose files are opened through no symlink and never as special files. :meth:`ShardReader.of` returns None
for anything else, and the caller reads through zarr; ``tests/test_store_direct.py`` checks that
both give the same values for random layouts and selections, and the same refusals for damage.

The format (zarr v3 "sharding_indexed", index at the end): a shard file is the inner chunks'
encoded bytes, then an index of one ``(offset, nbytes)`` pair of little-endian uint64 per inner
chunk in C order (``2**64 - 1`` twice: the chunk is absent and reads as the fill value), then the
index's crc32c. An encoded inner chunk is the C-order bytes of its values, then their crc32c.

Integrity, as zarr's codecs check it: the index's and every chunk's crc32c (``google-crc32c``,
the library zarr's codec uses); a mismatch, a chunk of the wrong size, or one past the end of
the file raises ``ValueError`` naming the file (damage, as zarr's own ``ValueError``; the ledger's
``DAMAGE_ERRORS``); a missing shard file raises :class:`~ia2cache.store.locations.MissingShardError`.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import product
from typing import Any, NamedTuple

import google_crc32c
import numpy as np

from ia2cache.store.layout import CHUNK_CRC_BYTES, INDEX_ENTRY_BYTES

__all__ = ["ShardReader"]

_ABSENT = 2**64 - 1
_CRC = CHUNK_CRC_BYTES
_KEEP_OPEN = 8
"""Shard files each thread keeps open (over all readers) with their parsed index, most recent
first: opening a file through no link walks every folder above it, and a loader reads a shard a
chunk at a time."""
_KNOWN_INDEXES = 16
"""Checked shard indexes a reader remembers by their bytes and file size (every full shard of an
array has the same index; checking one costs more than reading a token chunk)."""
_KNOWN_PLANS = 64
"""Read plans a reader remembers (:meth:`ShardReader._plan`); all are dropped when it is full."""
_READERS = itertools.count()
"""Each reader's own number, part of its files' keys in :class:`_OpenShards` (never reused, as an
``id`` would be once a reader is collected)."""


class _OpenShards:
    """One thread's open shard files and their indexes; closes them when evicted or collected.
    Per thread, so that no thread closes a file another is reading."""

    def __init__(self) -> None:
        self.files: OrderedDict[tuple[int, str], tuple[int, np.ndarray]] = OrderedDict()

    def get(self, key: tuple[int, str],
            load: Callable[[str], tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
        if key in self.files:
            self.files.move_to_end(key)
            return self.files[key]
        got = self.files[key] = load(key[1])
        while len(self.files) > _KEEP_OPEN:
            os.close(self.files.popitem(last=False)[1][0])
        return got

    def __del__(self) -> None:
        while self.files:
            os.close(self.files.popitem()[1][0])


_LOCAL = threading.local()


class ShardReader:
    """Reads boxes (a slice per axis) of one eligible zarr array."""

    def __init__(self, arr: Any, open_file: Callable[[str], int]) -> None:
        meta = arr.metadata
        sharding = meta.codecs[0]
        self.path: str = arr.path
        self.shape: tuple[int, ...] = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.fill = np.asarray(meta.fill_value, dtype=self.dtype)
        self.shard: tuple[int, ...] = tuple(meta.chunk_grid.chunk_shape)
        self.inner: tuple[int, ...] = tuple(sharding.chunk_shape)
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.inner, strict=True))
        self.n_inner = math.prod(self.per_shard)
        self.chunk_bytes = math.prod(self.inner) * self.dtype.itemsize
        self._open = open_file
        self._key = meta.encode_chunk_key  # shard grid cell -> file key below the array
        self._id = next(_READERS)
        self._indexes: dict[tuple[int, bytes], np.ndarray] = {}  # checked (file size, index bytes)
        self._plans: dict[tuple[int, tuple[tuple[int, int], ...], tuple[int, ...]], _Plan] = {}
        # chunks split only the rows: a chunk of whole rows is one run of the output
        self._by_rows = self.inner[1:] == self.shard[1:] == self.shape[1:]
        self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    @classmethod
    def of(cls, arr: Any) -> ShardReader | None:
        """A reader for ``arr``, or None when its layout or store is not one this module reads."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

        store = arr.store
        open_file = getattr(store, "open_shard_file", None)
        meta = getattr(arr, "metadata", None)
        if (open_file is None or not store.read_only or getattr(meta, "zarr_format", None) != 3
                or len(meta.codecs) != 1):
            return None
        sharding = meta.codecs[0]
        dtype = np.dtype(arr.dtype)

        def plain(codecs: Sequence[Any], itemsize: int) -> bool:  # bytes (little endian), crc32c
            kinds = tuple(type(c) for c in codecs)
            if kinds != (BytesCodec, Crc32cCodec):
                return False
            return itemsize == 1 or getattr(codecs[0].endian, "value", None) == "little"

        ok = (
            isinstance(sharding, ShardingCodec) and sharding.index_location.value == "end"
            and plain(sharding.codecs, dtype.itemsize) and plain(sharding.index_codecs, 8)
            and isinstance(meta.chunk_grid, RegularChunkGrid)
            and isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)
            and meta.chunk_key_encoding.separator == "/"
            and dtype.kind in "uif" and dtype.byteorder in "=<|" and len(arr.shape) >= 1
            and all(s % c == 0
                    for s, c in zip(meta.chunk_grid.chunk_shape, sharding.chunk_shape, strict=True))
        )
        return cls(arr, open_file) if ok else None

    def read(self, sel: Sequence[slice], alloc: Callable[..., np.ndarray] = np.empty) -> np.ndarray:
        """The box ``sel`` (a slice with step 1 per leading axis; the others whole), as zarr's
        ``array[sel]`` gives it, in an array from ``alloc(shape, dtype)`` (e.g. a caller's pool of
        reused buffers: touching fresh memory costs more than the read itself here).

        Raises:
            ValueError: a shard's index or a chunk is damaged (crc32c, size, bounds).
            MissingShardError: a shard file is missing.
        """
        box = self._box(sel)
        out = alloc(tuple(b - a for a, b in box), self.dtype)
        if out.size == 0:
            return out
        into = out if out.flags.c_contiguous else np.empty(out.shape, self.dtype)
        self._read_box(box, _Into(into))
        if into is not out:
            out[...] = into
        return out

    def _box(self, sel: Sequence[slice]) -> list[tuple[int, int]]:
        """``sel`` as [start, stop) per axis (the axes it leaves out: whole)."""
        steps = {s.step for s in sel} - {None, 1}
        if len(sel) > len(self.shape) or steps:
            raise IndexError(f"selection {tuple(sel)} of {self.path} {self.shape}: need slices of step 1")
        box = [s.indices(n)[:2] for s, n in zip(sel, self.shape, strict=False)]
        box = [(a, max(a, b)) for a, b in box]  # a reversed range is empty, as in NumPy and zarr
        return box + [(0, n) for n in self.shape[len(box):]]

    def _read_box(self, box: list[tuple[int, int]], into: _Into) -> None:
        stages: list[np.ndarray] = []  # buffers of partly wanted chunks, reused shard after shard
        cells = [range(a // s, -(-b // s)) for (a, b), s in zip(box, self.shard, strict=True)]
        for cell in product(*cells):
            self._read_shard(cell, box, into, stages)

    def _read_shard(self, cell: tuple[int, ...], box: list[tuple[int, int]], into: _Into,
                    stages: list[np.ndarray]) -> None:
        """Read the part of shard ``cell`` inside ``box`` into ``into``: the wanted chunks in file
        order, each run of adjacent ones in one ``preadv``."""
        key = f"{self.path}/{self._key(cell)}"
        shards = getattr(_LOCAL, "shards", None)
        if shards is None:
            shards = _LOCAL.shards = _OpenShards()
        fd, index = shards.get((self._id, key), self._load)
        origin = [c * s for c, s in zip(cell, self.shard, strict=True)]
        corner = [max(a, o) for (a, _), o in zip(box, origin, strict=True)]  # of the shard's part
        part = tuple((c - o, min(b, o + s) - o)
                     for c, (_, b), o, s in zip(corner, box, origin, self.shard, strict=True))
        plan = self._plan(part, index, into)
        at = _At([c - a for c, (a, _) in zip(corner, box, strict=True)], into)
        for lo, hi in plan.absent:  # never written: zarr's fill value
            at.put(lo, hi, np.broadcast_to(self.fill, [y - x for x, y in zip(lo, hi, strict=True)]))
        for group in plan.groups:
            self._read_group(fd, key, group, at, stages)

    def _plan(self, part: tuple[tuple[int, int], ...], index: np.ndarray, into: _Into) -> _Plan:
        """How to read the box ``part`` of a shard (relative to the shard, inside it) into
        ``into``, with output positions relative to the part's corner there. It depends only on
        the shard's index, ``part`` and the output's shape, so it is remembered: every full shard
        of an array shares one checked index (:data:`_KNOWN_INDEXES`), and a loader reads the same
        few parts of every shard (planning cost as much as the reads of a part's chunks)."""
        memo = (id(index), part, into.out.shape)
        known = self._plans.get(memo)
        if known is not None and known.index is index:  # (a plan holds its index: no reused id)
            return known
        whole_rows = all(part[j] == (0, n) for j, n in enumerate(self.shape) if j)
        chunks, absent = (self._chunks_rows(part[0], index, into) if self._by_rows and whole_rows
                          else self._chunks(part, index, into))
        chunks.sort(key=lambda ch: ch.offset)
        step = self.chunk_bytes + _CRC
        groups: list[list[_Chunk]] = []
        group: list[_Chunk] = []
        iovs = staged = 0
        for ch in chunks:
            n = (len(ch.starts) if ch.starts is not None else 1) + 1
            full = (iovs + n > _MAX_IOV or (len(group) + 1) * step > _MAX_GROUP_BYTES
                    or (ch.starts is None and staged == _MAX_STAGES))
            if group and (ch.offset != group[-1].offset + step or full):
                groups.append(group)
                group, iovs, staged = [], 0, 0
            group.append(ch)
            iovs += n
            staged += ch.starts is None
        if group:
            groups.append(group)
        plan = _Plan(index, absent, groups)
        if len(self._plans) >= _KNOWN_PLANS:
            self._plans.clear()
        self._plans[memo] = plan
        return plan

    def _chunks(self, box: tuple[tuple[int, int], ...], index: np.ndarray,
                into: _Into) -> tuple[list[_Chunk], list[tuple[list[int], list[int]]]]:
        """The present chunks of a shard inside ``box`` (relative to the shard), and the boxes in
        the output of the absent ones."""
        inner = [range(max(0, a // c), min(n, -(-b // c)))
                 for (a, b), c, n in zip(box, self.inner, self.per_shard, strict=True)]
        chunks: list[_Chunk] = []
        absent: list[tuple[list[int], list[int]]] = []
        for at in product(*inner):
            lo, hi, src = [], [], []
            for (a, b), i, c in zip(box, at, self.inner, strict=True):
                first = i * c
                x0, x1 = max(a, first), min(b, first + c)
                lo.append(x0 - a)
                hi.append(x1 - a)
                src.append(slice(x0 - first, x1 - first))
            offset = int(index[at][0])
            if offset == _ABSENT:
                absent.append((lo, hi))
                continue
            whole = all(y - x == c for x, y, c in zip(lo, hi, self.inner, strict=True))
            runs = _runs(into.out.shape, into.strides, lo, hi) if whole else None
            starts, run = runs if runs is not None else (None, 0)
            chunks.append(_Chunk(offset, at, lo, hi, tuple(src), starts, run))
        return chunks, absent

    def _chunks_rows(self, rows: tuple[int, int], index: np.ndarray,
                     into: _Into) -> tuple[list[_Chunk], list[tuple[list[int], list[int]]]]:
        """:meth:`_chunks` where chunks split only the rows and the box holds whole rows (the token
        arrays: a new loader reads ~900 of their shards a GB, and the general plan cost most of it)."""
        a, b = rows
        c = self.inner[0]
        offsets = index.reshape(-1, 2)[:, 0].tolist()  # one chunk a row of the index here
        tail_hi = list(self.shape[1:])
        tail_lo = [0] * len(tail_hi)
        rest = (0,) * len(tail_hi)
        whole = (slice(None),) * len(tail_hi)
        rb = self._row_bytes
        chunks: list[_Chunk] = []
        absent: list[tuple[list[int], list[int]]] = []
        for i in range(max(0, a // c), min(self.per_shard[0], -(-b // c))):
            first = i * c
            x0, x1 = max(a, first), min(b, first + c)
            lo, hi = [x0 - a, *tail_lo], [x1 - a, *tail_hi]
            if offsets[i] == _ABSENT:
                absent.append((lo, hi))
                continue
            starts = [(x0 - a) * rb] if x1 - x0 == c else None
            src = (slice(x0 - first, x1 - first), *whole)
            chunks.append(_Chunk(offsets[i], (i, *rest), lo, hi, src, starts, (x1 - x0) * rb))
        return chunks, absent

    def _read_group(self, fd: int, key: str, group: list[_Chunk], at: _At,
                    stages: list[np.ndarray]) -> None:
        """Read chunks adjacent in the file with one ``preadv``: a wholly wanted chunk straight into
        place, any other into a stage and copied; then check each chunk's crc32c."""
        crcs = np.empty(_CRC * len(group), dtype=np.uint8)
        flat, base = at.into.flat, at.base
        iov: list[np.ndarray] = []
        parts: list[list[np.ndarray]] = []  # each chunk's memory: its pieces, or its stage
        k = 0  # stages used
        for i, ch in enumerate(group):
            if ch.starts is None:
                if len(stages) == k:
                    stages.append(np.empty(self.chunk_bytes, dtype=np.uint8))
                mine = [stages[k]]
                k += 1
            else:
                n = ch.run
                mine = [flat[base + o : base + o + n] for o in ch.starts]
            parts.append(mine)
            iov.extend(mine)
            iov.append(crcs[i * _CRC : (i + 1) * _CRC])
        got = _preadv_all(fd, iov, group[0].offset)
        stored = crcs.view("<u4")
        step = self.chunk_bytes + _CRC
        for i, (ch, mine) in enumerate(zip(group, parts, strict=True)):
            crc = 0
            for piece in mine:
                crc = google_crc32c.extend(crc, piece)
            if got < (i + 1) * step or crc != int(stored[i]):
                raise ValueError(f"shard file {key}: chunk {ch.at} does not match its crc32c (damaged)")
            if ch.starts is None:
                at.put(ch.lo, ch.hi, mine[0].view(self.dtype).reshape(self.inner)[ch.src])

    def _load(self, key: str) -> tuple[int, np.ndarray]:
        """Open shard file ``key`` and parse its index."""
        fd = self._open(key)
        try:
            return fd, self._index(fd, key)
        except BaseException:
            os.close(fd)
            raise

    def _index(self, fd: int, key: str) -> np.ndarray:
        """The shard's (offset, nbytes) pairs, shaped per_shard + (2,), its crc32c checked."""
        size = os.fstat(fd).st_size
        n = self.n_inner * INDEX_ENTRY_BYTES + _CRC
        if size < n:
            raise ValueError(f"shard file {key} is truncated: {size} bytes, its index alone takes {n}")
        raw = os.pread(fd, n, size - n)
        known = self._indexes.get((size, raw))
        if known is not None:  # the same bytes in a file of the same size: checked before
            return known
        if len(raw) != n or google_crc32c.value(raw[:-_CRC]) != int.from_bytes(raw[-_CRC:], "little"):
            raise ValueError(f"shard file {key}: the shard index's crc32c does not match (damaged)")
        index = np.frombuffer(raw[:-_CRC], dtype="<u8").reshape(*self.per_shard, 2)
        # Absent means both numbers are 2**64 - 1 (as zarr reads it); any other entry must hold a
        # whole chunk inside the data part of the file (compared without uint64 sums, which wrap).
        offset, nbytes = index[..., 0], index[..., 1]
        absent = (offset == _ABSENT) & (nbytes == _ABSENT)
        last = size - n - (self.chunk_bytes + _CRC)  # the last offset a chunk can start at
        beyond = np.ones_like(absent) if last < 0 else offset > np.uint64(last)
        bad = ~absent & ((nbytes != self.chunk_bytes + _CRC) | beyond)
        if bad.any():
            at = tuple(np.argwhere(bad)[0].tolist())
            raise ValueError(f"shard file {key}: chunk {at} has a wrong size or lies past the end of the "
                             "file (damaged)")
        if len(self._indexes) < _KNOWN_INDEXES:  # (a read-only array: np.frombuffer of bytes)
            self._indexes[(size, raw)] = index
        return index


class _Chunk(NamedTuple):
    """A wanted inner chunk of one shard: where it starts in the file, its grid position in the
    shard, its box in the output (``lo``/``hi``), its part wanted (``src``), and, when it is
    wanted whole, where the C-order runs of ``run`` bytes it is read into start in the output's
    bytes (else None: read into a stage and copied)."""

    offset: int
    at: tuple[int, ...]
    lo: list[int]
    hi: list[int]
    src: tuple[slice, ...]
    starts: list[int] | None
    run: int


class _Plan(NamedTuple):
    """How to read one box of one shard: the output boxes of its absent chunks (the fill value),
    and its present chunks in file order, in groups of one ``preadv`` each."""

    index: np.ndarray
    absent: list[tuple[list[int], list[int]]]
    groups: list[list[_Chunk]]


class _Into:
    """Where a read goes: one C-contiguous array."""

    def __init__(self, out: np.ndarray) -> None:
        self.out = out
        self.flat = out.reshape(-1).view(np.uint8)
        # C strides from the shape (NumPy may give an axis of length 1 any stride)
        self.strides = tuple(math.prod(out.shape[i + 1:]) * out.itemsize for i in range(out.ndim))


class _At:
    """A place in an output: positions relative to ``shift`` (a corner), ``base`` its byte offset."""

    def __init__(self, shift: list[int], into: _Into) -> None:
        self.shift = shift
        self.into = into
        self.base = sum(d * s for d, s in zip(shift, into.strides, strict=True))

    def put(self, lo: list[int], hi: list[int], values: np.ndarray) -> None:
        """Copy ``values`` into the box ``lo``..``hi`` (relative to the corner)."""
        self.into.out[tuple(slice(d + x, d + y) for d, x, y in zip(self.shift, lo, hi, strict=True))] = values


def _preadv_all(fd: int, iov: list[np.ndarray], offset: int) -> int:
    """``os.preadv`` until every buffer is full or the file ends (a read may stop short: at a
    signal, or at Linux's 2 GiB a call); returns the bytes read."""
    total = os.preadv(fd, iov, offset)
    want = sum(b.nbytes for b in iov)
    while 0 < total < want:
        rest, skip = [], total
        for b in iov:
            if skip >= b.nbytes:
                skip -= b.nbytes
                continue
            rest.append(b[skip:] if skip else b)
            skip = 0
        got = os.preadv(fd, rest, offset + total)
        if got == 0:
            break
        total += got
    return total


_MAX_GROUP_BYTES = 64 << 20
"""Most bytes one ``preadv`` reads (Linux stops a call at 2 GiB; smaller also stays in cache)."""
_MAX_STAGES = 8
"""Most partly wanted chunks one ``preadv`` reads (each into its own stage until checked)."""
_MAX_RUNS = 512
"""Most pieces one chunk is scattered into."""
_MAX_IOV = 1000
"""Most pieces of one ``preadv`` (its limit, IOV_MAX, is 1024 on Linux)."""


def _runs(shape: tuple[int, ...], strides: tuple[int, ...], lo: list[int],
          hi: list[int]) -> tuple[list[int], int] | None:
    """The C-order contiguous byte runs of the box ``lo``..``hi`` of a C-contiguous array of
    ``shape`` and ``strides``: (their starts, their length); None when there would be more than
    :data:`_MAX_RUNS`."""
    k = len(shape) - 1
    while k > 0 and lo[k] == 0 and hi[k] == shape[k]:
        k -= 1  # the axes after k are whole: a run spans them
    count = math.prod(y - x for x, y in zip(lo[:k], hi[:k], strict=True))
    if count > _MAX_RUNS:
        return None
    starts = [lo[k] * strides[k]]
    for j in range(k):
        starts = [s + i * strides[j] for s in starts for i in range(lo[j], hi[j])]
    return starts, (hi[k] - lo[k]) * strides[k]
