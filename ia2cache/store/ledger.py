"""The ledger: what is finished. One small JSON per finished shard, ``ledger/shard_NNNNNN.json``.

A shard counts as done once its entry exists; the entry is written after every array of the
shard, atomically (a temp file and a rename locally, one PUT on S3). It holds the shard's row
range and, per array, the sha256 of the shard's rows and of each chunk of rows, per-layer stats
of the activations (mean, std, max |x|, NaN and Inf counts: ``distill --normalize`` divides by
the variance; NaN/Inf poison training), and for a lossy dtype the largest relative error of the
stored values against the teacher's.

Reads are checked twice over, at two prices: every chunk's crc32c on every read (zarr's codec,
or :mod:`~ia2cache.store.direct` checking the same bytes; the loader relies on it, ~10 GB/s),
and :func:`check_chunk` compares a chunk's sha256 with the ledger (``verify``, ``collect
--repair``, ``distill --skip-damaged``'s scan, and the loader when a read failed and it must name
the damaged rows). sha256 also catches what a crc cannot: a whole
shard file swapped for another cache's.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ia2cache.errors import IA2Error
from ia2cache.store.layout import ArraySpec, logical_values

__all__ = ["DAMAGE_ERRORS", "ArrayRecord", "ChunkCheck", "LedgerEntry", "Stats", "check_chunk", "digest",
           "shard_digest"]

DAMAGE_ERRORS: tuple[type[BaseException], ...] = (
    IA2Error, ValueError, RuntimeError, EOFError, zlib.error, lzma.LZMAError,
)
"""What reading damaged bytes raises: ia2cache's refusals (a FIFO, a missing or empty shard file), zarr
and :mod:`~ia2cache.store.direct` (a crc32c mismatch, a damaged shard index and undecodable
metadata are ValueErrors), the codecs (blosc: RuntimeError).
An ``OSError`` is the file system failing, not damage; anything else is a bug."""


def digest(rows: np.ndarray) -> str:
    """The sha256 a ledger keeps for a shard or chunk of an array: over its C-order bytes. The one
    definition for writing, ``verify`` and the loader's checks."""
    return hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest()


def shard_digest(chunks: Sequence[str]) -> str:
    """The sha256 a ledger keeps for a whole shard of an array: over its chunks' hex digests, in
    order (so the bytes are hashed once, by their chunks)."""
    return hashlib.sha256("".join(chunks).encode("ascii")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Stats:
    """Stats of one layer of one shard, over its finite values (accumulated in float64)."""

    count: int
    mean: float
    std: float
    max_abs: float
    nan_count: int
    inf_count: int

    @classmethod
    def of(cls, x: np.ndarray, finite: bool = False) -> Stats:
        """Stats of ``x``; ``finite``: the caller knows every value is finite (skips that pass).

        Sums run in float64 (numpy's pairwise summation: the same result on every machine and
        thread count), the squares around a float32 mean; max |x| in the values' own precision
        (exact)."""
        nan_count = inf_count = 0
        if not finite and np.issubdtype(x.dtype, np.inexact):
            ok = np.isfinite(x)
            if not ok.all():
                nan_count = int(np.isnan(x).sum())
                inf_count = int(x.size - ok.sum()) - nan_count
                x = x[ok]
        if x.size == 0:
            return cls(0, 0.0, 0.0, 0.0, nan_count, inf_count)
        mean = float(x.sum(dtype=np.float64)) / x.size
        d = np.subtract(x, np.asarray(mean, dtype=x.dtype) if np.issubdtype(x.dtype, np.inexact) else mean)
        np.square(d, out=d)
        var = float(d.sum(dtype=np.float64)) / x.size
        return cls(int(x.size), mean, math.sqrt(max(var, 0.0)), float(max(x.max(), -x.min())),
                   nan_count, inf_count)

    @classmethod
    def from_json(cls, d: Any) -> Stats:
        """Raises ValueError, TypeError, KeyError: not such a record."""
        if not isinstance(d, dict):
            raise TypeError("stats are not a JSON object")
        out = cls(int(d["count"]), float(d["mean"]), float(d["std"]), float(d["max_abs"]),
                  int(d["nan_count"]), int(d["inf_count"]))
        if min(out.count, out.nan_count, out.inf_count) < 0:
            raise ValueError("negative counts")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "std": self.std, "max_abs": self.max_abs,
                "nan_count": self.nan_count, "inf_count": self.inf_count}

    @staticmethod
    def pool(parts: Sequence[Stats]) -> dict[str, float | int]:
        """Stats pooled over shards: ``mean``, ``var``, ``std`` (population, exact from each part's
        mean, std and count), ``max_abs``, ``nan_count``, ``inf_count``, ``count``, ``shards``."""
        n = sum(p.count for p in parts)
        mean = sum(p.count * p.mean for p in parts) / n if n else 0.0
        var = sum(p.count * (p.std**2 + (p.mean - mean) ** 2) for p in parts) / n if n else 0.0
        return {"mean": mean, "var": var, "std": math.sqrt(var),
                "max_abs": max((p.max_abs for p in parts), default=0.0),
                "nan_count": sum(p.nan_count for p in parts), "inf_count": sum(p.inf_count for p in parts),
                "count": n, "shards": len(parts)}


@dataclass(frozen=True)
class ArrayRecord:
    """What the ledger keeps of one array in one shard."""

    sha256: str
    """Of the shard: over its chunks' digests (:func:`shard_digest`)."""
    chunks: tuple[str, ...]
    """Of each chunk of rows, in order."""
    stats: tuple[Stats, ...] = ()
    """Per index of the first trailing dimension (per layer), for arrays with stats."""
    max_rel_error: float | None = None
    """Lossy dtypes: max over vectors of max|x - x̂| / max|x| against the teacher's values."""
    max_rel_l2_error: float | None = None
    """Lossy dtypes: max over vectors of ||x - x̂|| / ||x||."""

    @classmethod
    def from_json(cls, d: Any) -> ArrayRecord:
        """Raises ValueError, TypeError, KeyError: not such a record."""
        if not isinstance(d, dict) or not isinstance(d.get("sha256"), str):
            raise ValueError("no sha256")
        chunks = d.get("chunks")
        if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
            raise ValueError("chunk checksums are not a list of strings")
        stats = d.get("stats", [])
        if not isinstance(stats, list):
            raise TypeError("stats are not a list (one per layer)")
        err, err2 = d.get("max_rel_error"), d.get("max_rel_l2_error")
        return cls(d["sha256"], tuple(chunks), tuple(Stats.from_json(s) for s in stats),
                   None if err is None else float(err), None if err2 is None else float(err2))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "chunks": list(self.chunks)}
        if self.stats:
            out["stats"] = [s.to_json() for s in self.stats]
        if self.max_rel_error is not None:
            out["max_rel_error"] = self.max_rel_error
            out["max_rel_l2_error"] = self.max_rel_l2_error
        return out


@dataclass(frozen=True)
class LedgerEntry:
    """The ledger entry of one finished shard."""

    shard: int
    rows: tuple[int, int]
    """``[start, stop)``."""
    arrays: Mapping[str, ArrayRecord] = field(hash=False)
    written: str = field(default="", compare=False)

    @classmethod
    def build(cls, shard: int, rows: tuple[int, int], data: Mapping[str, np.ndarray],
              specs: Mapping[str, ArraySpec], rows_per_chunk: int,
              errors: Mapping[str, tuple[float, float]] | None = None) -> LedgerEntry:
        """The entry of shard ``shard`` holding ``data`` (every array's rows ``rows``).

        Args:
            errors: per lossy array, (max relative error, max relative L2 error) of its values.
        """
        start, stop = rows
        ranges = [(a - start, min(a + rows_per_chunk, stop) - start)
                  for a in range(start, stop, rows_per_chunk)]
        errors = errors or {}
        records = {}
        for p, spec in specs.items():
            a = np.ascontiguousarray(data[p])
            stats: tuple[Stats, ...] = ()
            if spec.stats:
                scales = data[spec.scales] if spec.scales else None
                x = logical_values(a, spec.logical_dtype, scales)
                finite = not np.issubdtype(x.dtype, np.inexact) or bool(np.isfinite(x).all())
                stats = tuple(Stats.of(x[:, i], finite) for i in range(x.shape[1])) if x.ndim > 1 \
                    else (Stats.of(x, finite),)
            err = errors.get(p)
            chunks = tuple(digest(a[i:j]) for i, j in ranges)
            records[p] = ArrayRecord(shard_digest(chunks), chunks, stats,
                                     None if err is None else err[0], None if err is None else err[1])
        return cls(shard, (start, stop), records, _now())

    @classmethod
    def from_json(cls, raw: Any, shard: int) -> LedgerEntry:
        """The entry read from ``ledger/shard_NNNNNN.json`` of ``shard``.

        Raises:
            ValueError: not a well-formed entry of that shard (naming what is wrong).
        """
        if not isinstance(raw, dict):
            raise ValueError(f"ledger entry of shard {shard} is not a JSON object")
        rows = raw.get("rows")
        if raw.get("shard") != shard or not (isinstance(rows, list) and len(rows) == 2
                                             and all(type(r) is int for r in rows)):
            raise ValueError(f"ledger says shard {raw.get('shard')!r}, rows {rows!r}")
        arrays = raw.get("arrays")
        if not isinstance(arrays, dict):
            raise ValueError(f"ledger entry of shard {shard} has no arrays")
        records = {}
        for p, d in arrays.items():
            try:
                records[p] = ArrayRecord.from_json(d)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"ledger entry of shard {shard}, array {p}: {e}") from None
        return cls(shard, (rows[0], rows[1]), records, str(raw.get("written", "")))

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "rows": list(self.rows), "written": self.written,
                "arrays": {p: r.to_json() for p, r in self.arrays.items()}}


@dataclass(frozen=True)
class ChunkCheck:
    """The outcome of :func:`check_chunk`."""

    data: np.ndarray | None
    """The chunk's rows, when they were read (intact or not)."""
    reason: str | None
    """Why the chunk is damaged; None if it is intact."""


def check_chunk(read: Callable[[], np.ndarray], want: str | None) -> ChunkCheck:
    """Read one chunk of rows of one array and say whether it is intact.

    Args:
        read: reads the chunk's rows (a store read, which checks the chunk's crc32c).
        want: the chunk's sha256 from the ledger, to compare with; None: the read alone decides.

    Raises:
        OSError: the file system failed (no damage: never skipped).
    """
    try:
        data = np.ascontiguousarray(read())
    except OSError:
        raise
    except DAMAGE_ERRORS as e:  # damage; any other exception is a bug and propagates
        return ChunkCheck(None, f"unreadable ({type(e).__name__}: {e})")
    if want is not None and digest(data) != want:
        return ChunkCheck(data, "checksum mismatch")
    return ChunkCheck(data, None)
