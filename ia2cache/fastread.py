"""Direct reads of the store's own sharded arrays, for the loader's hot path.

zarr-python costs about 1-4 ms per read call on these CPUs (event-loop hand-off, codec
pipeline set-up), whatever the size; a loader that reads 30 layers per chunk spends most of
an epoch there. The arrays ia2cache writes have one fixed, documented layout (zarr v3,
``sharding_indexed`` with the index at the end, ``bytes``+``crc32c`` index codecs, inner chunks
``bytes`` little endian, optionally ``blosc``), so for a local store they can be read straight
from the shard files: one ``pread`` per shard span, index checksum checked, blosc decoded by
numcodecs. The result is the same array zarr returns (tested on every dtype and row range).

Anything else (another codec, a remote store, a missing index) makes ``open_reader`` return
None, and callers keep using zarr. The store stays a plain zarr store either way.

Files are opened through :func:`ia2cache._io.open_beneath`: no symlink is followed below the
cache folder and a FIFO, device or folder in place of a shard file is refused at once (an
IA2Error naming it) instead of blocking the read or failing with a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import blosc

from ia2cache._io import open_beneath, read_beneath
from ia2cache.errors import IA2Error

_EMPTY = 2**64 - 1


def _supported(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The sharding configuration when it is the layout ia2cache writes, else None."""
    codecs = meta.get("codecs") or []
    if (meta.get("zarr_format") != 3 or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed"
            or meta.get("chunk_grid", {}).get("name") != "regular"
            or meta.get("chunk_key_encoding", {}).get("name") != "default"):
        return None
    cfg = codecs[0]["configuration"]
    inner = cfg.get("codecs", [])
    index = [c.get("name") for c in cfg.get("index_codecs", [])]
    if cfg.get("index_location", "end") != "end" or index != ["bytes", "crc32c"]:
        return None
    if not inner or inner[0].get("name") != "bytes" or inner[0].get("configuration", {}).get(
            "endian", "little") != "little":
        return None
    if len(inner) > 2 or (len(inner) == 2 and inner[1].get("name") != "blosc"):
        return None
    return cfg


class ShardedArrayReader:
    """Reads rows [a, b) of one local sharded array without zarr-python."""

    def __init__(self, path: Path, meta: dict[str, Any], cfg: dict[str, Any],
                 root: Path | None = None) -> None:
        self.path = path
        self.root = path if root is None else root
        """No link is followed below this folder (the cache's), nor is it one itself."""
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.chunk_shape = tuple(cfg["chunk_shape"])
        self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        if any(s != c for s, c in zip(self.shard_shape[1:], self.chunk_shape[1:], strict=True)) or any(
                s != d for s, d in zip(self.shard_shape[1:], self.shape[1:], strict=True)):
            raise ValueError("only row-wise chunking is read directly")
        self.rows_per_shard, self.rows_per_chunk = self.shard_shape[0], self.chunk_shape[0]
        self.chunks_per_shard = self.rows_per_shard // self.rows_per_chunk
        self.blosc = len(cfg["codecs"]) == 2
        self.chunk_values = int(np.prod(self.chunk_shape))
        self._index: dict[int, tuple[tuple[int, int], np.ndarray]] = {}

    def _shard_file(self, shard: int) -> Path:
        parts = ["c", str(shard)] + ["0"] * (len(self.shape) - 1)
        return self.path / self.sep.join(parts)

    def _read_index(self, fd: int, shard: int) -> np.ndarray:
        st = os.fstat(fd)
        size = st.st_size
        stamp = (st.st_mtime_ns, size)  # a rewritten shard file gets its index re-read
        got = self._index.get(shard)
        if got is not None and got[0] == stamp:
            return got[1]
        n = self.chunks_per_shard * 16
        if size < n + 4:
            raise IA2Error(f"{self._shard_file(shard)}: shard file too short for its index ({size} bytes)")
        raw = os.pread(fd, n + 4, size - n - 4)
        if google_crc32c.value(raw[:n]) != int.from_bytes(raw[n:], "little"):
            raise IA2Error(f"{self._shard_file(shard)}: shard index checksum mismatch")
        index = np.frombuffer(raw[:n], dtype="<u8").reshape(self.chunks_per_shard, 2)
        self._index[shard] = (stamp, index)
        return index

    def read(self, a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, *self.shape[1:]), dtype=self.dtype)
        if b <= a:
            return out
        rs, rc = self.rows_per_shard, self.rows_per_chunk
        for shard in range(a // rs, (b - 1) // rs + 1):
            s0 = shard * rs
            lo, hi = max(a, s0), min(b, s0 + rs)
            first, last = (lo - s0) // rc, (hi - 1 - s0) // rc
            path = self._shard_file(shard)
            try:
                fd = open_beneath(self.root, path, os.O_RDONLY, follow_root=False)
            except FileNotFoundError:
                out[lo - a : hi - a] = self.fill
                continue
            try:
                index = self._read_index(fd, shard)
                spans = [(int(o), int(n)) for o, n in index[first : last + 1]]
                real = [(o, n) for o, n in spans if o != _EMPTY]
                start = min((o for o, _ in real), default=0)
                end = max((o + n for o, n in real), default=0)
                blob = os.pread(fd, end - start, start) if real else b""
            finally:
                os.close(fd)
            for c, (off, nbytes) in enumerate(spans, start=first):
                c0 = s0 + c * rc
                r0, r1 = max(lo, c0), min(hi, c0 + rc)
                if off == _EMPTY:
                    out[r0 - a : r1 - a] = self.fill
                    continue
                data = blob[off - start : off - start + nbytes]
                try:
                    if self.blosc:
                        data = blosc.decompress(data)
                    chunk = np.frombuffer(data, dtype=self.dtype, count=self.chunk_values)
                except (RuntimeError, ValueError) as exc:
                    raise IA2Error(
                        f"{self.path}: rows {c0}-{c0 + rc - 1}: the chunk cannot be decoded ({exc}); "
                        "run `ia2cache verify` on the cache"
                    ) from exc
                out[r0 - a : r1 - a] = chunk.reshape(self.chunk_shape)[r0 - c0 : r1 - c0]
        return out


def open_reader(array_dir: str | Path, root: str | Path | None = None) -> ShardedArrayReader | None:
    """A direct reader for a local array in ia2cache's layout, or None (then use zarr).

    ``root``: the cache folder, below which no link is followed (default: ``array_dir``).
    """
    path = Path(array_dir)
    top = path if root is None else Path(root)
    try:
        meta = json.loads(read_beneath(top, path / "zarr.json", 1 << 20, follow_root=False))
    except (OSError, ValueError, IA2Error):
        return None  # zarr reads it then, and names what is wrong
    try:
        cfg = _supported(meta) if isinstance(meta, dict) else None
    except (AttributeError, TypeError, KeyError, IndexError):
        cfg = None  # not the layout ia2cache writes: zarr reads it, or says what is wrong
    if cfg is None:
        return None
    try:
        return ShardedArrayReader(path, meta, cfg, top)
    except (KeyError, ValueError, TypeError):
        return None
