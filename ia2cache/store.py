"""The store: one content-addressed, resumable, verifiable zarr v3 group per cache.

A cache lives at ``<store>/<key>/`` and holds three parts (see DESIGN.md, "The store"):

- the *store*: zarr arrays of shape ``(rows, *trailing)``, chunked along rows and sharded
  so that one shard is one writer batch;
- the *ledger*: ``ledger/shard_NNNNNN.json``, one small JSON per finished shard with its
  row range, per-chunk sha256 checksums and optional per-shard stats;
- the *manifest*: the group attribute ``"manifest"``, saying what produced the cache.

This module knows nothing about models: the caller decides which arrays exist through a
list of :class:`ArraySpec`. Writers write whole shards only, with one assignment each,
because zarr's sharding codec rewrites the whole shard on any partial write, and two
processes writing one shard lose data (zarr-python issue 3682).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.storage import LocalStore

from ia2cache._faults import fault_point
from ia2cache._fs import Location, RemotePath, is_url, location, remote_lock, write_json
from ia2cache._io import write_json_atomic as _write_json_atomic
from ia2cache.errors import IA2Error
from ia2cache.fastread import ShardedArrayReader, open_reader

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACTIVATION_DTYPES",
    "SCHEMA_VERSION",
    "VOLATILE_FIELDS",
    "ArraySpec",
    "Cache",
    "Problem",
    "cache_key",
    "decode_activations",
    "encode_activations",
    "list_caches",
    "resolve_cache",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: int = 1
"""Version of the on-disk layout. Part of every cache key."""

VOLATILE_FIELDS: frozenset[str] = frozenset({"created", "status", "versions", "seconds", "about"})
"""Manifest fields that may differ between two runs producing the same cache."""

ACTIVATION_DTYPES: dict[str, tuple[str, str | None]] = {
    "bf16": ("uint16", "bfloat16"),
    "fp16": ("float16", None),
    "fp32": ("float32", None),
}
"""``--dtype`` value -> (stored numpy dtype, logical dtype) for activation arrays."""

_FP16_MAX = 65504.0
_KEY_RE = re.compile(r"[0-9a-f]{16}")
_LEDGER_DIR = "ledger"
_LOCK_FILE = ".lock"
_LEDGER_RE = re.compile(r"shard_(\d{6,})\.json")
_RESERVED_TOP = frozenset({_LEDGER_DIR, _LOCK_FILE, "zarr.json"})
# zarr's LocalStore writes every file as "<name>.<uuid4 hex>.partial" and then renames it; a
# writer killed in between leaves that temp file behind.
_ZARR_TEMP_RE = re.compile(r".+\.[0-9a-f]{32}\.partial")
_JSON_TEMP_RE = re.compile(r"\..+\.json\.[a-z0-9_]{8}\.tmp")  # ia2cache._io.write_json_atomic's
_LOGICAL_DTYPES = frozenset({"bfloat16"})


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ArraySpec:
    """One row-major array of a cache. Its first dimension, ``rows``, is implied."""

    path: str
    """Path inside the group, e.g. ``"acts/attn/layer_003"``; relative, no ``..``."""
    shape: tuple[int, ...]
    """Trailing shape without rows, e.g. ``(T, hidden)``, or ``()`` for a per-row scalar."""
    dtype: str
    """Numpy dtype as stored: ``"uint16"``, ``"float16"``, ``"float32"``, ``"int32"``, ..."""
    logical_dtype: str | None = None
    """What the stored bits mean when it is not ``dtype``: ``"bfloat16"`` over ``uint16``."""
    stats: bool = False
    """Keep per-shard stats (mean, std, max |x|, NaN and Inf counts) in the ledger."""
    compress: bool = True
    """Blosc zstd with byte shuffle if True, no compressor otherwise."""

    def __post_init__(self) -> None:
        parts = self.path.split("/")
        if (
            not self.path
            or self.path.startswith("/")
            or "\\" in self.path
            or any(p in ("", ".", "..") for p in parts)
            or parts[0] in _RESERVED_TOP
        ):
            raise ValueError(
                f"array path {self.path!r} must be relative, without '..', '.', empty parts "
                f"or a reserved first part ({', '.join(sorted(_RESERVED_TOP))})"
            )
        shape = tuple(int(d) for d in self.shape)
        if any(d < 1 for d in shape):
            raise ValueError(f"array {self.path!r}: every trailing dimension must be >= 1: {shape}")
        object.__setattr__(self, "shape", shape)
        try:
            np.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"array {self.path!r}: unknown dtype {self.dtype!r}") from e
        if self.logical_dtype is not None:
            if self.logical_dtype not in _LOGICAL_DTYPES:
                raise ValueError(
                    f"array {self.path!r}: unknown logical dtype {self.logical_dtype!r}"
                )
            if np.dtype(self.dtype) != np.uint16:
                raise ValueError(f"array {self.path!r}: logical bfloat16 needs dtype uint16")

    def to_dict(self) -> dict[str, Any]:
        """The spec as it is written into the manifest (without its path, the dict key)."""
        d = asdict(self)
        d.pop("path")
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, path: str, d: dict[str, Any]) -> ArraySpec:
        """Inverse of :meth:`to_dict`."""
        return cls(path=path, **{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class Problem:
    """One piece of damage found by :meth:`Cache.verify`."""

    array: str
    """The array path, or ``"*"`` for the whole shard."""
    rows: tuple[int, int]
    """The damaged ``[start, stop)`` row range."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"array": self.array, "rows": list(self.rows), "reason": self.reason}


# ----------------------------------------------------------------------- key, dtypes


def digest(rows: np.ndarray) -> str:
    """The sha256 a ledger keeps for a shard or chunk of an array: over its C-order bytes. The one
    definition for writing, ``verify`` and the loader's checks."""
    return hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest()


def cache_key(fields: dict) -> str:
    """The cache key: the first 16 hex chars of sha256 over canonical JSON of ``fields``.

    The store schema version is added as ``"schema"``, so a layout change changes every key.
    """
    payload = {**fields, "schema": SCHEMA_VERSION}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def encode_activations(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Turn a tensor of activations into the contiguous numpy array the store keeps.

    Args:
        t: activations, any float dtype, any device.
        dtype: ``"bf16"`` (kept bit-exact as uint16), ``"fp16"`` or ``"fp32"``.

    Raises:
        IA2Error: ``dtype`` is unknown, or ``"fp16"`` and a finite value exceeds 65504.
    """
    import torch

    if dtype not in ACTIVATION_DTYPES:
        raise IA2Error(f"--dtype {dtype!r} is not one of {', '.join(ACTIVATION_DTYPES)}")
    t = t.detach()
    if dtype == "bf16":
        out = t.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.uint16).numpy()
    elif dtype == "fp16":
        if t.numel():
            a = t.abs()
            a = a[torch.isfinite(a)]
            peak = float(a.max()) if a.numel() else 0.0
            if peak > _FP16_MAX:
                raise IA2Error(
                    f"--dtype fp16 cannot hold these activations: max |x| found is {peak:.6g}, "
                    f"above the fp16 limit {_FP16_MAX:g}; use --dtype bf16 or --dtype fp32"
                )
        out = t.to(device="cpu", dtype=torch.float16).numpy()
    else:
        out = t.to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(out)


def decode_activations(a: np.ndarray, logical_dtype: str | None) -> torch.Tensor:
    """Inverse of :func:`encode_activations`: uint16 + ``"bfloat16"`` -> torch.bfloat16."""
    import torch

    if logical_dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a.astype(np.uint16, copy=False))).view(
            torch.bfloat16
        )
    if logical_dtype is not None:
        raise ValueError(f"unknown logical dtype {logical_dtype!r}")
    return torch.from_numpy(np.ascontiguousarray(a))


def _logical_values(a: np.ndarray, logical_dtype: str | None) -> np.ndarray:
    """The values the stored bits mean, as numpy (bf16 widened exactly to float32)."""
    if logical_dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _shard_stats(a: np.ndarray, logical_dtype: str | None) -> dict[str, float | int]:
    """mean, std, max |x| over the finite values (accumulated in float64), NaN/Inf counts."""
    x = _logical_values(a, logical_dtype)
    nan_count = inf_count = 0
    if np.issubdtype(x.dtype, np.inexact):
        finite = np.isfinite(x)
        if not finite.all():
            nan_count = int(np.isnan(x).sum())
            inf_count = int(x.size - finite.sum()) - nan_count
            x = x[finite]
    count = int(x.size)
    if count == 0:
        return {
            "count": 0,
            "mean": 0.0,
            "std": 0.0,
            "max_abs": 0.0,
            "nan_count": nan_count,
            "inf_count": inf_count,
        }
    return {
        "count": count,
        "mean": float(np.mean(x, dtype=np.float64)),
        "std": float(np.std(x, dtype=np.float64)),
        "max_abs": float(np.max(np.abs(x.astype(np.float64, copy=False)))),
        "nan_count": nan_count,
        "inf_count": inf_count,
    }


# ---------------------------------------------------------------------- zarr access


def _zarr_store(path: Location, read_only: bool) -> Any:
    """The one place a zarr store object is made: a LocalStore, or an FsspecStore for URLs."""
    if isinstance(path, RemotePath):
        return path.zarr_store(read_only)
    return LocalStore(str(path), read_only=read_only)


def _open_group(path: Location, writable: bool) -> zarr.Group:
    return zarr.open_group(
        store=_zarr_store(path, read_only=not writable),
        mode="r+" if writable else "r",
        zarr_format=3,
    )


def _create_array(
    group: zarr.Group, spec: ArraySpec, n_rows: int, rows_per_shard: int, rows_per_chunk: int
) -> zarr.Array:
    compressors = (
        BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle) if spec.compress else None
    )
    return group.create_array(
        name=spec.path,
        shape=(n_rows, *spec.shape),
        chunks=(rows_per_chunk, *spec.shape),
        shards=(rows_per_shard, *spec.shape),
        dtype=spec.dtype,
        compressors=compressors,
        fill_value=0,
        attributes={"logical_dtype": spec.logical_dtype} if spec.logical_dtype else None,
        dimension_names=("rows", *([None] * len(spec.shape))),
    )


def _read_manifest(path: Location) -> dict | None:
    """The manifest of the cache at ``path``, or None if it is not a cache."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        group = _open_group(path, writable=False)
    except (zarr.errors.BaseZarrError, FileNotFoundError, ValueError, json.JSONDecodeError):
        return None
    manifest = group.attrs.get("manifest")
    return dict(manifest) if isinstance(manifest, dict) else None


def _jsonable(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(x))


def _diff(stored: Any, given: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields in ``given`` whose value differs in ``stored``."""
    if isinstance(stored, dict) and isinstance(given, dict):
        out: list[str] = []
        for k in sorted(given):
            if not prefix and k in VOLATILE_FIELDS:
                continue
            name = f"{prefix}{k}"
            if k not in stored:
                out.append(name)
            else:
                out.extend(_diff(stored[k], given[k], f"{name}."))
        return out
    return [] if stored == given else [prefix.rstrip(".")]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- cache


class Cache:
    """A cache: zarr arrays (the store) plus a ledger and a manifest.

    Make one with :meth:`create_or_open` (writers) or :meth:`open` (readers).
    """

    path: Location
    """A local directory, or a :class:`~ia2cache._fs.RemotePath` for an fsspec URL."""
    key: str
    n_rows: int
    rows_per_shard: int
    rows_per_chunk: int
    specs: dict[str, ArraySpec]

    def __init__(self, path: Location, manifest: dict, writable: bool) -> None:
        self.path = path
        self._manifest = manifest
        self.key = manifest["key"]
        self.n_rows = int(manifest["rows"])
        self.rows_per_shard = int(manifest["rows_per_shard"])
        self.rows_per_chunk = int(manifest["rows_per_chunk"])
        self.specs = {p: ArraySpec.from_dict(p, d) for p, d in manifest["arrays"].items()}
        self._group = _open_group(path, writable=writable)
        self._writable = writable
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads zarr.json
        self._direct_readers: dict[str, ShardedArrayReader | None] = {}

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, status={self.status!r}, rows={self.n_rows})"

    # ------------------------------------------------------------------ opening

    @classmethod
    def create_or_open(
        cls,
        store: str | Location,
        key: str,
        manifest: dict,
        specs: list[ArraySpec],
        n_rows: int,
        rows_per_shard: int,
        rows_per_chunk: int,
    ) -> Cache:
        """Create the cache ``<store>/<key>/``, or open it to resume if it already exists.

        Safe to call twice: an existing cache whose manifest equals the one given (on every
        field given, ignoring :data:`VOLATILE_FIELDS`) is opened as is.

        Args:
            store: the store directory (created if absent) or an fsspec URL (``s3://b/p``).
            key: the cache key, 16 lowercase hex chars (see :func:`cache_key`).
            manifest: what produced the cache, JSON-serialisable; stored in the group
                attributes with the layout fields added.
            specs: the arrays to hold.
            n_rows: rows in every array.
            rows_per_shard: rows per shard, the unit of writing; a multiple of
                ``rows_per_chunk``.
            rows_per_chunk: rows per chunk, the unit of reading and checksumming.

        Raises:
            IA2Error: the cache exists with a different manifest (a key collision or a
                hand-edited cache), or the path exists and is not a cache.
        """
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"cache key {key!r} must be 16 lowercase hex chars")
        if n_rows < 1 or rows_per_chunk < 1 or rows_per_shard < 1:
            raise ValueError("n_rows, rows_per_shard and rows_per_chunk must be >= 1")
        if rows_per_shard % rows_per_chunk:
            raise ValueError(
                f"rows_per_shard ({rows_per_shard}) must be a multiple of "
                f"rows_per_chunk ({rows_per_chunk})"
            )
        _check_spec_paths(specs)
        path = location(store) / key
        full = _jsonable(
            {
                **manifest,
                "key": key,
                "schema": SCHEMA_VERSION,
                "status": "partial",
                "rows": n_rows,
                "rows_per_shard": rows_per_shard,
                "rows_per_chunk": rows_per_chunk,
                "arrays": {s.path: s.to_dict() for s in specs},
                "created": _now(),
            }
        )
        try:
            if not (path / "zarr.json").exists():
                if path.exists() and any(
                    p.name != _LOCK_FILE and not _ZARR_TEMP_RE.fullmatch(p.name) for p in path.iterdir()
                ):
                    raise IA2Error(f"{path} exists and is not an ia2cache cache; move it away")
                path.mkdir(parents=True, exist_ok=True)
                # If another process created it first, compare below as on any resume.
                with contextlib.suppress(
                    FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError
                ):
                    zarr.create_group(
                        _zarr_store(path, read_only=False), zarr_format=3, attributes={"manifest": full}
                    )
            cache = cls._resume(path, full)
            cache._ensure_arrays()
        except OSError as exc:  # disk full, quota, permissions: nothing is marked complete
            raise IA2Error(
                f"creating cache {path} failed ({exc.strerror or exc}); nothing is marked complete: "
                "free space (or fix permissions) and rerun the same command to resume"
            ) from exc
        return cache

    @classmethod
    def _resume(cls, path: Location, given: dict) -> Cache:
        stored = _read_manifest(path)
        if stored is None:
            raise IA2Error(f"{path} exists and is not an ia2cache cache; move it away")
        differing = _diff(stored, given)
        if differing:
            detail = "; ".join(
                f"{f}: stored {_lookup(stored, f)!r}, given {_lookup(given, f)!r}"
                for f in differing[:5]
            )
            raise IA2Error(
                f"cache {path} exists with a different manifest in field(s) "
                f"{', '.join(differing)} ({detail}); a key collision or a hand-edited cache: "
                f"refusing to overwrite it"
            )
        return cls(path, stored, writable=True)

    def _ensure_arrays(self) -> None:
        """Create arrays a crashed creation left out; refuse ones that do not match."""
        for spec in self.specs.values():
            try:
                arr = self._group[spec.path]
            except KeyError:
                try:
                    _create_array(
                        self._group, spec, self.n_rows, self.rows_per_shard, self.rows_per_chunk
                    )
                    continue
                except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError):
                    # Another process starting on the same key created it first (its metadata
                    # write is exclusive): check what it made like any existing array.
                    arr = self._group[spec.path]
            if not isinstance(arr, zarr.Array):
                raise IA2Error(f"{self.path / spec.path} is a group, the manifest says an array")
            want = (
                (self.n_rows, *spec.shape),
                np.dtype(spec.dtype),
                (self.rows_per_shard, *spec.shape),
                (self.rows_per_chunk, *spec.shape),
            )
            have = (arr.shape, arr.dtype, arr.shards, arr.chunks)
            if have != want:
                raise IA2Error(
                    f"array {self.path / spec.path} does not match the manifest "
                    f"(shape, dtype, shards, chunks: have {have}, manifest says {want})"
                )

    @classmethod
    def open(cls, path: str | Location) -> Cache:
        """Open an existing cache for reading (writes reopen it for writing on demand).

        Raises:
            IA2Error: ``path`` is not an ia2cache cache, or has another schema version.
        """
        path = location(path)
        manifest = _read_manifest(path)
        if manifest is None or "key" not in manifest or "arrays" not in manifest:
            raise IA2Error(f"{path} is not an ia2cache cache (no zarr group with a manifest)")
        if manifest.get("schema") != SCHEMA_VERSION:
            raise IA2Error(
                f"cache {path} has store schema {manifest.get('schema')!r}; this ia2cache "
                f"reads schema {SCHEMA_VERSION}"
            )
        return cls(path, manifest, writable=False)

    # ------------------------------------------------------------------ layout

    @property
    def manifest(self) -> dict:
        """The manifest (a copy): what produced the cache, plus its layout and status."""
        return copy.deepcopy(self._manifest)

    @property
    def status(self) -> str:
        """``"partial"`` or ``"complete"``."""
        return str(self._manifest["status"])

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_rows / self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """The ``[start, stop)`` rows of ``shard``; the last shard may be short."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} is outside 0..{self.n_shards - 1} of {self.path}")
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n_rows)

    def _chunk_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        return [
            (a, min(a + self.rows_per_chunk, stop)) for a in range(start, stop, self.rows_per_chunk)
        ]

    # ------------------------------------------------------------------ ledger

    @property
    def _ledger_dir(self) -> Location:
        return self.path / _LEDGER_DIR

    def _ledger_path(self, shard: int) -> Location:
        return self._ledger_dir / f"shard_{shard:06d}.json"

    def done_shards(self) -> set[int]:
        """Shards with a ledger entry, i.e. finished."""
        if not self._ledger_dir.is_dir():
            return set()
        done = set()
        for p in self._ledger_dir.iterdir():
            m = _LEDGER_RE.fullmatch(p.name)
            if m and int(m.group(1)) < self.n_shards:
                done.add(int(m.group(1)))
        return done

    def missing_shards(self) -> list[int]:
        """Shards still to write, sorted."""
        done = self.done_shards()
        return [s for s in range(self.n_shards) if s not in done]

    def _ledger_entry(self, shard: int) -> dict:
        return json.loads(self._ledger_path(shard).read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ writing

    def _writable_group(self) -> zarr.Group:
        if not self._writable:
            self._group = _open_group(self.path, writable=True)
            self._writable = True
            self._arrays = {}
        return self._group

    def _writable_array(self, path: str) -> zarr.Array:
        self._writable_group()
        # write_empty_chunks: an all-zero shard must still exist on disk, so that a
        # deleted shard file is told apart from a shard of zeros.
        return self.array(path).with_config({"write_empty_chunks": True})

    def write_shard(self, shard: int, data: dict[str, np.ndarray]) -> None:
        """Write one whole shard of every array, then its ledger entry.

        Each array's shard region is written with one assignment (a partial shard write
        would rewrite the shard anyway). The ledger entry is written last and atomically,
        so a shard counts as done only once all of its bytes are in place.

        Args:
            shard: the shard index; its rows are :meth:`shard_rows`.
            data: every spec path -> array of shape ``(stop - start, *spec.shape)`` and the
                spec's stored dtype.

        Raises:
            ValueError: ``data`` misses an array, has an extra one, or a wrong shape/dtype.
            IA2Error: the cache is already complete.
        """
        start, stop = self.shard_rows(shard)
        if self.status == "complete":
            raise IA2Error(f"cache {self.path} is complete; refusing to rewrite shard {shard}")
        missing = sorted(set(self.specs) - set(data))
        extra = sorted(set(data) - set(self.specs))
        if missing or extra:
            raise ValueError(
                f"shard {shard} of {self.path}: missing arrays {missing}, unknown arrays {extra}"
            )
        for p, spec in self.specs.items():
            a = data[p]
            want = (stop - start, *spec.shape)
            if a.shape != want or a.dtype != np.dtype(spec.dtype):
                raise ValueError(
                    f"shard {shard}, array {p}: got shape {a.shape} dtype {a.dtype}, "
                    f"expected shape {want} dtype {spec.dtype}"
                )
        entry: dict[str, Any] = {
            "shard": shard,
            "rows": [start, stop],
            "arrays": {},
            "written": _now(),
        }
        for p, spec in self.specs.items():
            a = np.ascontiguousarray(data[p])
            self._writable_array(p)[start:stop] = a
            info: dict[str, Any] = {
                "sha256": digest(a),
                "chunks": [
                    digest(a[i - start : j - start])
                    for i, j in self._chunk_ranges(start, stop)
                ],
            }
            if spec.stats:
                info["stats"] = _shard_stats(a, spec.logical_dtype)
            entry["arrays"][p] = info
            fault_point("store.mid_shard")
        fault_point("store.before_ledger")
        self._ledger_dir.mkdir(exist_ok=True)
        # Local: temp file + rename. Remote: one PUT of the whole object, atomic on S3.
        write_json(self._ledger_path(shard), entry, _write_json_atomic)

    def finalize(self, extra: dict | None = None) -> None:
        """Mark the cache complete, adding ``extra`` (e.g. seconds, bytes) to the manifest.

        Raises:
            IA2Error: some shards are still missing.
        """
        missing = self.missing_shards()
        if missing:
            raise IA2Error(
                f"cache {self.path} has {len(missing)} of {self.n_shards} shards missing "
                f"(first: {missing[:5]}); run collect again to resume"
            )
        extra = _jsonable(extra or {})
        clash = sorted(
            k
            for k in extra
            if k in self._manifest and k not in VOLATILE_FIELDS and self._manifest[k] != extra[k]
        )
        if clash:
            raise ValueError(f"finalize may not change manifest fields {clash}")
        manifest = {**self._manifest, **extra, "status": "complete"}
        _remove_write_debris(self.path)
        fault_point("store.before_finalize")
        try:
            self._writable_group().attrs["manifest"] = manifest  # one atomic zarr.json write
        except OSError as exc:
            raise IA2Error(
                f"marking cache {self.path} complete failed ({exc.strerror or exc}); every shard is "
                "written, so rerunning the same command (after freeing space) only marks it complete"
            ) from exc
        self._manifest = manifest

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold an exclusive lock on the cache while writing it.

        Local caches use an ``fcntl`` lock on ``<cache>/.lock``; remote ones a lock object made
        with a conditional PUT (see :mod:`ia2cache._fs`). Under torchrun only rank 0 takes it,
        for the whole job (:mod:`ia2cache.distributed`).

        Raises:
            IA2Error: another process holds the lock.
        """
        if isinstance(self.path, RemotePath):
            return remote_lock(self.path)
        return self._lock()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        lock_path = self.path / _LOCK_FILE
        f = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 (closed in finally)
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise IA2Error(
                    f"another ia2cache process is writing {self.path} (lock file {lock_path}, "
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

    # ------------------------------------------------------------------ reading

    def array(self, path: str) -> zarr.Array:
        """The zarr array at ``path``, for direct zarr access."""
        if path not in self.specs:
            raise KeyError(f"{self.path} has no array {path!r}; it has {sorted(self.specs)}")
        if path not in self._arrays:
            self._arrays[path] = self._group[path]
        return self._arrays[path]

    def read(self, path: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the array at ``path``, in its stored dtype.

        Performance: zarr decodes whole chunks of ``rows_per_chunk`` rows, so reading row by
        row decodes each chunk many times. Read chunk-aligned row ranges (or whole shards)
        and slice in memory.
        """
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.n_rows}) of {self.path}")
        direct = self._direct_reader(path)
        if direct is not None:
            return direct.read(start, stop)
        return np.asarray(self.array(path)[start:stop])

    def _direct_reader(self, path: str) -> ShardedArrayReader | None:
        """A reader that bypasses zarr-python's per-call cost (~15x less on small reads, same
        values; see ``ia2cache.fastread``) for a local array in ia2cache's own layout, else None."""
        if path not in self._direct_readers:
            local = isinstance(self.path, Path)
            self._direct_readers[path] = open_reader(self.path / path) if local else None
        return self._direct_readers[path]

    def stats(self, path: str) -> dict[str, float | int]:
        """Stats of the array at ``path`` pooled over the finished shards.

        Returns ``mean``, ``var`` and ``std`` (population, over finite values, exact from
        the per-shard mean, std and count), ``max_abs``, ``nan_count``, ``inf_count``,
        ``count`` (finite values) and ``shards`` (how many shards were pooled).
        """
        spec = self.specs.get(path)
        if spec is None or not spec.stats:
            raise ValueError(f"{self.path}: array {path!r} has no stats")
        parts = [self._ledger_entry(s)["arrays"][path]["stats"] for s in sorted(self.done_shards())]
        if not parts:
            raise IA2Error(f"{self.path}: no finished shard holds stats for {path}")
        n = sum(p["count"] for p in parts)
        mean = sum(p["count"] * p["mean"] for p in parts) / n if n else 0.0
        var = (
            sum(p["count"] * (p["std"] ** 2 + (p["mean"] - mean) ** 2) for p in parts) / n
            if n
            else 0.0
        )
        return {
            "mean": mean,
            "var": var,
            "std": math.sqrt(var),
            "max_abs": max(p["max_abs"] for p in parts),
            "nan_count": sum(p["nan_count"] for p in parts),
            "inf_count": sum(p["inf_count"] for p in parts),
            "count": n,
            "shards": len(parts),
        }

    def bytes_on_disk(self) -> int:
        """Bytes of every file under the cache directory (arrays, ledger, metadata)."""
        if isinstance(self.path, RemotePath):
            return self.path.du()
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    # ------------------------------------------------------------------ verify

    def verify(self) -> list[Problem]:
        """Check every shard against its ledger entry; name the array and rows of damage.

        Reads every byte of the cache once. An intact complete cache returns ``[]``; a
        partial cache reports its missing shards. NaN/Inf values recorded in the ledger
        stats are reported too, since they poison training.
        """
        problems: list[Problem] = []
        done = self.done_shards()
        arrays: dict[str, zarr.Array] = {}
        for p in self.specs:
            try:
                arrays[p] = self._group[p]
            except Exception as e:  # any failure here is damage to report
                problems.append(Problem(p, (0, self.n_rows), f"array unreadable: {e}"))
        for shard in range(self.n_shards):
            rows = self.shard_rows(shard)
            if shard not in done:
                reason = (
                    "shard not in ledger"
                    if self.status == "complete"
                    else "missing (partial cache)"
                )
                problems.append(Problem("*", rows, reason))
                continue
            try:
                entry = self._ledger_entry(shard)
            except (OSError, ValueError) as e:
                problems.append(Problem("*", rows, f"ledger entry unreadable: {e}"))
                continue
            if entry.get("rows") != list(rows):
                problems.append(Problem("*", rows, f"ledger says rows {entry.get('rows')}"))
                continue
            for p, arr in arrays.items():
                info = entry.get("arrays", {}).get(p)
                if info is None:
                    problems.append(Problem(p, rows, "array not in the shard's ledger entry"))
                    continue
                problems.extend(self._verify_shard_array(shard, p, arr, info))
        if self.status != "complete" and not self.missing_shards():
            problems.append(Problem("*", (0, self.n_rows), "every shard is written but the cache is "
                                    "not marked complete: run the same collect again to finish it"))
        return problems

    def _verify_shard_array(
        self, shard: int, path: str, arr: zarr.Array, info: dict
    ) -> list[Problem]:
        start, stop = self.shard_rows(shard)
        rows = (start, stop)
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"
        if not (self.path / key).is_file():
            return [Problem(path, rows, f"shard file {key} is missing (deleted?)")]
        problems: list[Problem] = []
        ranges = self._chunk_ranges(start, stop)
        if len(info.get("chunks", [])) != len(ranges):
            return [Problem(path, rows, "ledger entry has the wrong number of chunk checksums")]
        try:
            whole: np.ndarray | None = np.ascontiguousarray(arr[start:stop])
        except Exception:  # narrow it down chunk by chunk below
            whole = None
        for (a, b), want in zip(ranges, info["chunks"], strict=True):
            if whole is not None:
                chunk = whole[a - start : b - start]
            else:
                try:
                    chunk = np.ascontiguousarray(arr[a:b])
                except Exception as e:
                    problems.append(Problem(path, (a, b), f"chunk unreadable: {e}"))
                    continue
            if digest(chunk) != want:
                problems.append(Problem(path, (a, b), "checksum mismatch"))
        if (
            not problems
            and whole is not None
            and digest(whole) != info.get("sha256")
        ):
            problems.append(Problem(path, rows, "shard checksum does not match the ledger"))
        st = info.get("stats") or {}
        if st.get("nan_count"):
            problems.append(
                Problem(path, rows, f"{st['nan_count']} NaN values written by the teacher")
            )
        if st.get("inf_count"):
            problems.append(
                Problem(path, rows, f"{st['inf_count']} Inf values written by the teacher")
            )
        return problems


def _remove_write_debris(path: Path) -> None:
    """Delete the temp files of writes a killed writer never renamed into place.

    Called under the writer's lock, when no other write can be in flight, so that a cache
    resumed after a crash holds the same files as one that never crashed.
    """
    if isinstance(path, RemotePath):
        return  # object stores: every zarr chunk and ledger entry is one PUT, no temp objects
    for root, _dirs, files in os.walk(path):
        for name in files:
            if _ZARR_TEMP_RE.fullmatch(name) or _JSON_TEMP_RE.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    log.info("removed %s, left by a writer that was killed", os.path.join(root, name))


def _lookup(d: dict, dotted: str) -> Any:
    """The value at a dotted field name from :func:`_diff` (``None`` where absent)."""
    cur: Any = d
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _check_spec_paths(specs: list[ArraySpec]) -> None:
    paths = [s.path for s in specs]
    if not paths:
        raise ValueError("a cache needs at least one array")
    if len(set(paths)) != len(paths):
        raise ValueError(f"duplicate array paths in {sorted(paths)}")
    for p in paths:
        for q in paths:
            if q.startswith(p + "/"):
                raise ValueError(f"array {p!r} cannot also be the group of {q!r}")


# ----------------------------------------------------------------- resolving caches


def resolve_cache(store: str | Location, cache: str) -> Location:
    """The directory of the cache named ``cache``: a key, a name under ``store``, or a path.

    A path (absolute, or relative to the working directory) to an existing cache is accepted
    as is, and so is a full fsspec URL (``s3://bucket/prefix/<key>``) to one. Otherwise a key
    or relative name resolves under ``store`` (a directory or an fsspec URL) and must stay
    inside it (symlinks included; ``..`` is collapsed before the check on remote stores).

    Raises:
        IA2Error: the name leaves the store, is not a key nor an existing directory, or an
            absolute path that is not a cache.
    """
    if is_url(cache):
        p = location(cache).resolve()
        if _read_manifest(p) is None:
            raise IA2Error(f"{cache} is not an ia2cache cache (no zarr group with a manifest)")
        return p
    store_loc = location(store)
    if isinstance(store_loc, RemotePath):
        return _resolve_remote(store_loc, cache)
    store_dir = Path(store_loc).resolve()
    given = Path(cache).expanduser()
    if not _KEY_RE.fullmatch(cache) and not given.is_absolute() and _read_manifest(given) is not None:
        return given.resolve()  # an explicit path to a cache, relative to the working directory
    if given.is_absolute():
        p = given.resolve()
        if _read_manifest(p) is None:
            raise IA2Error(f"{cache} is not an ia2cache cache (no zarr group with a manifest)")
        return p
    p = (store_dir / given).resolve()
    if p == store_dir or not p.is_relative_to(store_dir):
        raise IA2Error(f"refusing a cache path outside the store: {cache!r} (store {store_dir})")
    if not _KEY_RE.fullmatch(cache) and not p.is_dir():
        raise IA2Error(
            f"no cache {cache!r} in store {store_dir}: give a 16-hex-char key or an existing "
            f"cache directory (see `ia2cache ls`)"
        )
    return p


def _resolve_remote(store: RemotePath, cache: str) -> Location:
    """:func:`resolve_cache` for a remote store: a local cache path as is, else a key or a
    relative name under the store prefix, which it may not leave."""
    given = Path(cache).expanduser()
    if not _KEY_RE.fullmatch(cache) and _read_manifest(given) is not None:
        return given.resolve()  # an explicit local cache path still works with a remote --store
    root = store.resolve()
    if given.is_absolute() or cache.startswith("/") or "\\" in cache:
        raise IA2Error(f"refusing a cache path outside the store: {cache!r} (store {root})")
    p = (root / cache).resolve()
    if p == root or not p.is_relative_to(root):
        raise IA2Error(f"refusing a cache path outside the store: {cache!r} (store {root})")
    if not _KEY_RE.fullmatch(cache) and _read_manifest(p) is None:
        raise IA2Error(
            f"no cache {cache!r} in store {root}: give a 16-hex-char key or an existing cache "
            f"name (see `ia2cache ls --store {root}`)"
        )
    return p


def list_caches(store: str | Location) -> list[dict]:
    """The manifest of each cache under ``store``, oldest first, each with its ``"path"``."""
    store_dir = location(store)
    if not store_dir.is_dir():
        return []
    out = []
    for child in store_dir.iterdir():
        if child.is_dir():
            manifest = _read_manifest(child)
            if manifest is None:
                log.debug("skipping %s: not a cache", child)
                continue
            out.append({**manifest, "path": str(child)})
    return sorted(out, key=lambda m: (str(m.get("created", "")), str(m.get("key", ""))))
