"""Direct reads of uncompressed sharded arrays: the loader's hot path, beside zarr's.

Why this exists (measured, README "Performance", ``benchmarks/loader_throughput``): zarr-python
reads a format-2 activation array at 0.6-1.1 GB/s of one core here whatever the chunking, most
of it spent per chunk in its asyncio codec pipeline (a task, a buffer wrapper and a copy per
codec per chunk); the same bytes, checked the same way, read at ~4 GB/s with one ``preadv`` of
each chunk into a reused buffer, its crc32c, and one copy into the result. The loader's target
(>= 1 GB/s on 2 cores, with batch assembly beside it) is out of zarr's reach, so this module
reads the one layout the activations are written in, and nothing else.

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
from typing import Any

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
        box = [s.indices(n)[:2] for s, n in zip(sel, self.shape, strict=False)]
        box = [(a, max(a, b)) for a, b in box]  # a reversed range is empty, as in NumPy and zarr
        box += [(0, n) for n in self.shape[len(box):]]
        steps = {s.step for s in sel} - {None, 1}
        if len(sel) > len(self.shape) or steps:
            raise IndexError(f"selection {tuple(sel)} of {self.path} {self.shape}: need slices of step 1")
        out = alloc(tuple(b - a for a, b in box), self.dtype)
        if out.size == 0:
            return out
        buf = np.empty(self.chunk_bytes + _CRC, dtype=np.uint8)
        cells = [range(a // s, -(-b // s)) for (a, b), s in zip(box, self.shard, strict=True)]
        for cell in product(*cells):
            self._read_shard(cell, box, out, buf)
        return out

    def _read_shard(self, cell: tuple[int, ...], box: list[tuple[int, int]], out: np.ndarray,
                    buf: np.ndarray) -> None:
        """Copy the part of shard ``cell`` inside ``box`` into ``out``."""
        key = f"{self.path}/{self._key(cell)}"
        shards = getattr(_LOCAL, "shards", None)
        if shards is None:
            shards = _LOCAL.shards = _OpenShards()
        fd, index = shards.get((self._id, key), self._load)
        origin = [c * s for c, s in zip(cell, self.shard, strict=True)]
        inner = [range(max(0, (a - o) // c), min(n, -(-(b - o) // c)))
                 for (a, b), o, c, n in zip(box, origin, self.inner, self.per_shard, strict=True)]
        for at in product(*inner):
            self._copy_chunk(fd, key, index, origin, at, box, out, buf)

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
        return index

    def _copy_chunk(self, fd: int, key: str, index: np.ndarray, origin: list[int], at: tuple[int, ...],
                    box: list[tuple[int, int]], out: np.ndarray, buf: np.ndarray) -> None:
        """Read inner chunk ``at`` of the shard, check it, and copy its part inside ``box`` into ``out``."""
        src, dst = [], []
        for (a, b), o, i, c in zip(box, origin, at, self.inner, strict=True):
            lo = o + i * c
            x0, x1 = max(a, lo), min(b, lo + c)
            src.append(slice(x0 - lo, x1 - lo))
            dst.append(slice(x0 - a, x1 - a))
        offset, nbytes = (int(x) for x in index[at])
        if offset == _ABSENT:  # never written: zarr's fill value
            out[tuple(dst)] = self.fill
            return
        target = out[tuple(dst)]
        pieces = _runs(target) if target.shape == self.inner else None
        if pieces is not None:  # the whole chunk is wanted: read it straight into place
            got = os.preadv(fd, [*pieces, buf[:_CRC]], offset)
            crc = 0
            for piece in pieces:
                crc = google_crc32c.extend(crc, piece)
            stored = buf[:_CRC]
        else:
            got = os.preadv(fd, [buf], offset)
            crc = google_crc32c.value(buf[: self.chunk_bytes])
            stored = buf[self.chunk_bytes :]
        if got != nbytes or crc != int.from_bytes(stored.tobytes(), "little"):
            raise ValueError(f"shard file {key}: chunk {at} does not match its crc32c (damaged)")
        if pieces is None:
            target[...] = buf[: self.chunk_bytes].view(self.dtype).reshape(self.inner)[tuple(src)]


_MAX_RUNS = 512
"""Most pieces one chunk is scattered into (``preadv``'s limit, IOV_MAX, is 1024 on Linux)."""


def _runs(view: np.ndarray) -> list[np.ndarray] | None:
    """The C-order contiguous runs of ``view`` (a strided view into a C-contiguous array), as
    byte arrays ``preadv`` writes into; None when there would be more than :data:`_MAX_RUNS`."""
    for k in range(view.ndim + 1):
        if view[(0,) * k].flags.c_contiguous:
            if math.prod(view.shape[:k]) > _MAX_RUNS:
                return None
            return [view[i].reshape(-1).view(np.uint8) for i in np.ndindex(*view.shape[:k])]
    return None
