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

Trust (see docs/reliability.md): a store may be shared, so nothing below the store follows a
symlink or opens a special file (:mod:`ia2cache._io`, :class:`_SafeLocalStore`), and a cache is
used only if its manifest is well formed, produces the key it is filed under and matches its
arrays (:func:`manifest_problems`, :meth:`Cache.open`); :meth:`Cache.verify` reports every
such problem as damage, and :meth:`Cache.repair` makes ``collect`` recompute damaged shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.errors
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from ia2cache._faults import fault_point
from ia2cache._fs import Location, RemotePath, is_url, location, remote_lock, write_json
from ia2cache._io import (
    check_beneath,
    ensure_dir_beneath,
    file_kind,
    listdir_beneath,
    open_beneath,
    pread_all,
    read_beneath,
    refusal,
    remove_beneath,
    special_files,
)
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
    "DamagedCacheError",
    "Problem",
    "Verdict",
    "cache_key",
    "decode_activations",
    "encode_activations",
    "list_caches",
    "manifest_problems",
    "resolve_cache",
    "verify_cache",
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
_DIGEST_FIELD = "manifest_sha256"
"""Manifest field holding a sha256 over its other non-volatile fields: a hand edit shows."""
# Bounds on what a metadata file or ledger entry may hold before it is read into memory: a
# manifest of a few KB, an entry of ~70 bytes per chunk and array. Far above any real one.
_MAX_META_BYTES = 16 << 20
_MAX_LEDGER_BYTES = 256 << 20


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
    """The array path, ``"*"`` for the whole shard, ``"manifest"``, ``"ledger"`` or ``"files"``
    for damage outside the arrays."""
    rows: tuple[int, int]
    """The damaged ``[start, stop)`` row range; ``(0, 0)`` where no rows can be named."""
    reason: str
    repair: str | None = field(default=None, compare=False)
    """How ``collect`` fixes it: ``"recompute"`` (``--repair`` recomputes the shard holding
    ``rows``), ``"resume"`` (a plain rerun finishes a partial cache), or None (it cannot: move the
    cache away and collect again)."""

    def to_dict(self) -> dict[str, Any]:
        return {"array": self.array, "rows": list(self.rows), "reason": self.reason}


class DamagedCacheError(IA2Error):
    """A cache that cannot be trusted: a malformed manifest, one that does not produce the key it
    is filed under, or arrays that contradict it. :meth:`Cache.open` refuses it (exit 2);
    :func:`verify_cache` reports its :attr:`problems` (exit 1)."""

    def __init__(self, path: Location, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        reasons = "; ".join(p.reason for p in problems[:5]) + (" ..." if len(problems) > 5 else "")
        super().__init__(
            f"cache {path} is damaged and was not used: {reasons}. A cache whose manifest or layout "
            f"is wrong cannot be repaired: move it away and collect again (`ia2cache verify {path}` "
            "lists every problem)"
        )


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


class _SafeLocalStore(LocalStore):
    """zarr's LocalStore for one cache folder, never following a link nor opening a special file.

    Reads open each file through :func:`~ia2cache._io.open_beneath` (``O_NOFOLLOW`` folder by
    folder, ``O_NONBLOCK``, regular files only), so a FIFO in place of a shard file is refused at
    once instead of blocking, and a symlink is never read through; the refusal names the file.

    Writes stay zarr's own (a temp file under a random name, then a rename: the rename never
    follows a link at the destination, and the crash tests' fault points sit inside it). Before
    each one the folder is checked to be the same real folder as when this store was made (device
    and inode) and every part of the path below it is checked with ``lstat``. That leaves a race:
    a co-user who can write into the cache folder and swaps a sub-folder for a symlink between
    this check and zarr's write redirects that one write. Closing it would mean reimplementing
    zarr's writes on directory fds; the folders ia2cache writes itself (lock, ledger) have no gap.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._identity = _dir_identity(self.root)

    def _check_write(self, key: str) -> None:
        ident = _dir_identity(self.root)  # refuses a link or special file at the cache folder
        if self._identity is None:
            self._identity = ident
        elif ident is not None and ident != self._identity:
            raise IA2Error(
                f"cache folder {self.root} was replaced by another folder while it was being "
                "written; refusing to go on"
            )
        check_beneath(self.root, self.root / key)

    def _read(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer | None:
        try:
            fd = open_beneath(self.root, self.root / key, os.O_RDONLY, follow_root=False)
        except FileNotFoundError:
            return None  # as zarr's: a missing chunk reads as the fill value
        try:
            size = os.fstat(fd).st_size
            start, stop = _byte_span(byte_range, size)
            data = pread_all(fd, stop - start, start) if stop > start else b""
        finally:
            os.close(fd)
        return prototype.buffer.from_bytes(data)

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        self._ensure_open_sync()
        return self._read(key, prototype or default_buffer_prototype(), byte_range)

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(self._read, key, prototype or default_buffer_prototype(),
                                       byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_write(key)
        super().set_sync(key, value)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        self._check_write(key)
        await super()._set(key, value, exclusive=exclusive)

    async def delete(self, key: str) -> None:
        self._check_write(key)
        await super().delete(key)


def _dir_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the real folder ``path``, None if it does not exist.

    Raises:
        IA2Error: ``path`` is a symlink or not a folder.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise refusal(path, file_kind(st.st_mode), "directory")
    return st.st_dev, st.st_ino


def _byte_span(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    """``[start, stop)`` of a zarr byte request in a file of ``size`` bytes (as zarr's LocalStore)."""
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"Unexpected byte_range, got {byte_range}.")


def _zarr_store(path: Location, read_only: bool) -> Any:
    """The one place a zarr store object is made: a LocalStore that follows no link, or an
    FsspecStore for URLs (object stores have no links)."""
    if isinstance(path, RemotePath):
        return path.zarr_store(read_only)
    return _SafeLocalStore(str(path), read_only=read_only)


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


def _read_file(path: Location, rel: str, limit: int) -> bytes:
    """The bytes of the file ``rel`` of the cache at ``path``: locally a regular file reached
    through no link (the cache folder included) and at most ``limit`` bytes, remotely one GET.

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: a link or special file, or too large: damage, like a malformed file.
        IA2Error: the remote store failed (credentials, network): no damage.
    """
    if isinstance(path, RemotePath):
        return (path / rel).read_bytes()
    try:
        return read_beneath(path, path / rel, limit, follow_root=False)
    except IA2Error as exc:
        raise ValueError(str(exc)) from None


def _looks_like_cache(path: Location) -> bool:
    """True where ``path`` holds a ``zarr.json``, whatever state it is in (a damaged cache is
    still a cache: verify reports it, ``ls`` lists it)."""
    if isinstance(path, RemotePath):
        return (path / "zarr.json").exists()
    try:
        os.lstat(path / "zarr.json")
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


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


# ------------------------------------------------------------------ manifest checks
#
# What makes a manifest trustworthy, checked without reading any array data (so they stay cheap
# enough for every open and every `ls`): its layout fields are well formed, it produces the key it
# is filed under, its readable fields agree with its key fields, and it is unedited since written.

_KEY_FIELD_TWINS: dict[str, str] = {
    "model.tokenizer": "model.tokenizer_fingerprint",
    "task.content": "task_info.content_hash",
    "task.template": "task_info.template",
    "task.separator": "task_info.separator",
    "stop": "task_info.stop",
}
"""Key fields whose readable twin in the manifest has another name (collect's). Every other key
field is compared with the manifest field of the same dotted name, where both exist."""


def _digest_of(manifest: dict) -> str:
    """sha256 over canonical JSON of the manifest's non-volatile fields (the digest field aside)."""
    body = {k: v for k, v in manifest.items() if k not in VOLATILE_FIELDS and k != _DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _sealed(manifest: dict) -> dict:
    """``manifest`` with its digest (re)computed: what every manifest write stores."""
    return {**manifest, _DIGEST_FIELD: _digest_of(manifest)}


def _find(d: Any, dotted: str) -> tuple[bool, Any]:
    """(True, value) at a dotted field name, or (False, None) where absent."""
    cur = d
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return False, None
        cur = cur[k]
    return True, cur


def _leaves(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k in sorted(d):
        v = d[k]
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _layout_problems(m: dict) -> list[str]:
    """The fields the store itself reads: present and of the right type and range."""
    out = []
    if not isinstance(m.get("key"), str) or not _KEY_RE.fullmatch(m["key"]):
        out.append(f"manifest field key is {m.get('key')!r}, not 16 lowercase hex chars")
    if m.get("status") not in ("partial", "complete"):
        out.append(f"manifest field status is {m.get('status')!r}, not 'partial' or 'complete'")
    for f in ("rows", "rows_per_shard", "rows_per_chunk"):
        if not _is_count(m.get(f)):
            out.append(f"manifest field {f} is {m.get(f)!r}, not a positive integer")
    if not out and m["rows_per_shard"] % m["rows_per_chunk"]:
        out.append(f"manifest: rows_per_shard {m['rows_per_shard']} is not a multiple of "
                   f"rows_per_chunk {m['rows_per_chunk']}")
    arrays = m.get("arrays")
    if not isinstance(arrays, dict) or not arrays:
        out.append("manifest field arrays is missing or empty")
        return out
    try:
        specs = [ArraySpec.from_dict(p, d) for p, d in arrays.items()]
        _check_spec_paths(specs)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        out.append(f"manifest field arrays is malformed ({type(e).__name__}: {e})")
    return out


def _key_problems(m: dict, folder: str | None) -> list[str]:
    """The key: the folder's name (where it is a key), the key fields' hash, and the readable
    fields that repeat a key field."""
    key = m.get("key")
    out = []
    if folder is not None and _KEY_RE.fullmatch(folder) and folder != key:
        out.append(f"the folder is named {folder} but holds the cache of key {key} (a cache copied "
                   "or moved into another key's folder, or an edited key)")
    if "key_fields" not in m:
        return out  # caches made through the store API by other callers name no key fields
    fields = m["key_fields"]
    if not isinstance(fields, dict):
        return [*out, "manifest field key_fields is not a JSON object"]
    produced = cache_key(fields)
    if produced != key:
        out.append(f"its key_fields produce key {produced}, not its key {key} (edited key fields, "
                   "or a cache filed under the wrong key)")
    for name, want in _leaves(fields):
        twin = _KEY_FIELD_TWINS.get(name, name)
        present, have = _find(m, twin)
        if present and not isinstance(have, dict) and _jsonable(have) != want:
            out.append(f"manifest field {twin} is {have!r} but key_fields.{name} is {want!r}")
    return out


def manifest_problems(manifest: Any, folder: str | None = None) -> list[str]:
    """Why ``manifest`` cannot be trusted, one line each; ``[]`` if it can.

    Checks, without reading array data: the layout fields (key, status, rows, rows per shard and
    chunk, arrays) are well formed; a ``folder`` named like a key is the manifest's key; the
    ``key_fields`` (where present) hash to the key and agree with every readable field that repeats
    one; the manifest's checksum (:data:`_DIGEST_FIELD`, in caches written since it exists)
    matches its non-volatile fields, so an edit of any of them (task or model name, rows) shows.
    """
    if not isinstance(manifest, dict):
        return ["the manifest is not a JSON object"]
    out = _layout_problems(manifest) + _key_problems(manifest, folder)
    stored = manifest.get(_DIGEST_FIELD)
    if stored is not None and stored != _digest_of(manifest):
        out.append(f"the manifest was edited after it was written (its {_DIGEST_FIELD} does not "
                   "match its fields)")
    return out


def _check_cache_folder(path: Location) -> None:
    """Refuse a cache path that is a symlink or special file: a store's caches are real folders,
    so a link planted as ``<store>/<key>`` is never followed (written to, or trusted).

    Raises:
        IA2Error: naming ``path`` and what it is.
    """
    if not isinstance(path, RemotePath):
        _dir_identity(Path(path))


def _load_manifest(path: Location) -> dict:
    """The manifest of the cache at ``path``, once :func:`manifest_problems` finds nothing.

    Raises:
        IA2Error: ``path`` is not a cache (no ``zarr.json``), is a symlink, or has another schema.
        DamagedCacheError: ``zarr.json`` is unreadable, not a zarr group, holds no manifest or
            one that cannot be trusted.
    """
    _check_cache_folder(path)

    def damaged(reason: str) -> DamagedCacheError:
        return DamagedCacheError(path, [Problem("manifest", (0, 0), reason)])

    try:
        raw = _read_file(path, "zarr.json", _MAX_META_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise IA2Error(f"{path} is not an ia2cache cache (no zarr group with a manifest)") from None
    except ValueError as exc:
        raise damaged(str(exc)) from None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged(f"{path / 'zarr.json'} is not valid JSON ({exc}): truncated or overwritten") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise damaged(f"{path / 'zarr.json'} is not the metadata of a zarr v3 group")
    attrs = meta.get("attributes")
    manifest = attrs.get("manifest") if isinstance(attrs, dict) else None
    if not isinstance(manifest, dict):
        raise damaged(f"{path / 'zarr.json'} holds no manifest")
    schema = manifest.get("schema")
    if isinstance(schema, int) and not isinstance(schema, bool) and schema != SCHEMA_VERSION:
        raise IA2Error(f"cache {path} has store schema {schema!r}; this ia2cache reads schema "
                       f"{SCHEMA_VERSION}")
    problems = manifest_problems(manifest, path.name)
    if schema != SCHEMA_VERSION:
        problems.insert(0, f"manifest field schema is {schema!r}, not {SCHEMA_VERSION}")
    if problems:
        raise DamagedCacheError(path, [Problem("manifest", (0, 0), r) for r in problems])
    return manifest


def _expected_layout(spec: ArraySpec, n_rows: int, rows_per_shard: int, rows_per_chunk: int) -> tuple:
    """(shape, dtype, shard shape, chunk shape) that :func:`_create_array` gives ``spec``'s array."""
    return ((n_rows, *spec.shape), np.dtype(spec.dtype), (rows_per_shard, *spec.shape),
            (rows_per_chunk, *spec.shape))


def _layout_of(meta: Any) -> tuple:
    """The same tuple read from an array's ``zarr.json`` (a sharded v3 array, as ia2cache writes).

    Raises:
        ValueError, KeyError, TypeError, IndexError: the metadata is not such an array's.
    """
    codec = meta["codecs"][0]
    if codec["name"] != "sharding_indexed" or meta["node_type"] != "array":
        raise ValueError(f"not a sharded array (codec {codec['name']!r})")
    return (tuple(int(d) for d in meta["shape"]), np.dtype(meta["data_type"]),
            tuple(int(d) for d in meta["chunk_grid"]["configuration"]["chunk_shape"]),
            tuple(int(d) for d in codec["configuration"]["chunk_shape"]))


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
                hand-edited cache), the path exists and is not a cache, or the cache folder or
                anything in it is a symlink or special file.
            DamagedCacheError: the existing cache cannot be trusted (see :meth:`open`).
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
            _check_cache_folder(path)  # <store>/<key> a symlink: never written through
            if not _looks_like_cache(path):
                if path.exists() and any(
                    p.name != _LOCK_FILE and not _ZARR_TEMP_RE.fullmatch(p.name) for p in path.iterdir()
                ):
                    raise IA2Error(f"{path} exists and is not an ia2cache cache; move it away")
                path.mkdir(parents=True, exist_ok=True)
                _check_cache_folder(path)
                # If another process created it first, compare below as on any resume.
                with contextlib.suppress(
                    FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError
                ):
                    zarr.create_group(
                        _zarr_store(path, read_only=False), zarr_format=3,
                        attributes={"manifest": _sealed(full)},
                    )
            cache = cls._resume(path, full)
            cache._refuse_special_files()
            cache._ensure_arrays()
        except OSError as exc:  # disk full, quota, permissions: nothing is marked complete
            raise IA2Error(
                f"creating cache {path} failed ({exc.strerror or exc}); nothing is marked complete: "
                "free space (or fix permissions) and rerun the same command to resume"
            ) from exc
        return cache

    @classmethod
    def _resume(cls, path: Location, given: dict) -> Cache:
        stored = _load_manifest(path)
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
            want = _expected_layout(spec, self.n_rows, self.rows_per_shard, self.rows_per_chunk)
            have = (arr.shape, arr.dtype, arr.shards, arr.chunks)
            if have != want:
                raise IA2Error(
                    f"array {self.path / spec.path} does not match the manifest "
                    f"(shape, dtype, shards, chunks: have {have}, manifest says {want})"
                )

    @classmethod
    def open(cls, path: str | Location) -> Cache:
        """Open an existing cache for reading (writes reopen it for writing on demand).

        The manifest must pass :func:`manifest_problems` (well formed, unedited, producing the key
        its folder is named by) and every array's metadata must match it (rows, dtype, shards,
        chunks), so that no caller acts on a misfiled or tampered cache.

        Raises:
            IA2Error: ``path`` is not an ia2cache cache, is a symlink, or has another schema version.
            DamagedCacheError: the manifest or the arrays' metadata cannot be trusted.
        """
        path = location(path)
        cache = cls(path, _load_manifest(path), writable=False)
        # A partial cache may lack arrays a crash during its creation left out: collect makes them.
        problems = cache._array_problems(missing_ok=cache.status != "complete")
        if problems:
            raise DamagedCacheError(path, problems)
        return cache

    def _array_problems(self, missing_ok: bool) -> list[Problem]:
        """Arrays whose metadata is unreadable, missing or not what the manifest says (their rows
        above all: nothing may be sized by a manifest's row count the arrays do not have)."""
        out = []
        for p, spec in self.specs.items():
            try:
                have = _layout_of(json.loads(_read_file(self.path, f"{p}/zarr.json", _MAX_META_BYTES)))
            except (FileNotFoundError, NotADirectoryError):
                if not missing_ok:
                    out.append(Problem(p, (0, 0), f"array metadata {p}/zarr.json is missing"))
                continue
            except (ValueError, KeyError, TypeError, IndexError) as e:
                out.append(Problem(p, (0, 0), f"array metadata {p}/zarr.json is unusable ({e})"))
                continue
            want = _expected_layout(spec, self.n_rows, self.rows_per_shard, self.rows_per_chunk)
            if have[0][0] != self.n_rows:
                out.append(Problem(p, (0, 0), f"array {p} holds {have[0][0]} rows, the manifest "
                                              f"says rows {self.n_rows}"))
            elif have != want:
                out.append(Problem(p, (0, 0), f"array {p} has (shape, dtype, shards, chunks) {have}, "
                                              f"the manifest says {want}"))
        return out

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
        return self._ledger_dir / _ledger_name(shard)

    def _ledger_names(self) -> list[str]:
        """The names in the ledger folder (locally reached through no link).

        Raises:
            IA2Error: the ledger folder is a symlink or special file.
        """
        if isinstance(self._ledger_dir, RemotePath):
            return [p.name for p in self._ledger_dir.iterdir()] if self._ledger_dir.is_dir() else []
        return listdir_beneath(self.path, self._ledger_dir, follow_root=False)

    def done_shards(self) -> set[int]:
        """Shards with a ledger entry, i.e. finished. Only the names ia2cache writes count: one
        per shard of this cache, so the entries can never overlap nor cover rows it lacks."""
        return {s for s in map(_shard_of_entry, self._ledger_names()) if s is not None and s < self.n_shards}

    def missing_shards(self) -> list[int]:
        """Shards still to write, sorted."""
        done = self.done_shards()
        return [s for s in range(self.n_shards) if s not in done]

    def _ledger_entry(self, shard: int) -> dict:
        """The ledger entry of ``shard``.

        Raises:
            OSError: it cannot be read (``FileNotFoundError``: there is none).
            ValueError: it is a link or special file, implausibly large, or no JSON object.
        """
        raw = _read_file(self.path, f"{_LEDGER_DIR}/{_ledger_name(shard)}", _MAX_LEDGER_BYTES)
        entry = json.loads(raw.decode("utf-8"))
        if not isinstance(entry, dict):
            raise ValueError(f"ledger entry of shard {shard} is not a JSON object")
        return entry

    def _refuse_special_files(self) -> None:
        """Before zarr writes into a local cache: refuse any symlink or special file in it.

        zarr writes by path (see :class:`_SafeLocalStore` for the check before each write and the
        race it leaves); this walk refuses a trap at once, before any model work, naming it.
        Damaged shards' files are removed by :meth:`repair` first.

        Raises:
            IA2Error: naming the first such file.
        """
        if isinstance(self.path, RemotePath):
            return
        found = special_files(Path(self.path))
        if found:
            where, kind = found[0]
            raise IA2Error(
                f"{where} is a {kind}, not a regular file or folder: refusing to write into cache "
                f"{self.path} (ia2cache never follows a link nor opens a special file in a store). "
                "Remove it; if it sits where a shard file or ledger entry belongs, `ia2cache collect "
                "... --repair` recomputes that shard"
            )

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
        if isinstance(self._ledger_dir, RemotePath):
            self._ledger_dir.mkdir(exist_ok=True)
        else:  # the ledger folder made through no link; no link or special file at the entry
            ensure_dir_beneath(self.path, self._ledger_dir, follow_root=False)
            check_beneath(self.path, self._ledger_path(shard))
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
            self._write_manifest(manifest)
        except OSError as exc:
            raise IA2Error(
                f"marking cache {self.path} complete failed ({exc.strerror or exc}); every shard is "
                "written, so rerunning the same command (after freeing space) only marks it complete"
            ) from exc

    def _write_manifest(self, manifest: dict) -> None:
        """Store ``manifest`` (sealed with its digest): one atomic zarr.json write."""
        manifest = _sealed(manifest)
        self._writable_group().attrs["manifest"] = manifest
        self._manifest = manifest

    # ------------------------------------------------------------------ repair

    def damaged_shards(self) -> list[int]:
        """The shards :meth:`verify` finds damaged in a way recomputing them fixes (a checksum
        mismatch, an unreadable, missing or special shard file, a missing or unusable ledger
        entry), sorted. Reads the whole cache once."""
        return self._shards_to_recompute(self.verify())

    def _shards_to_recompute(self, problems: list[Problem]) -> list[int]:
        return sorted({p.rows[0] // self.rows_per_shard for p in problems if p.repair == "recompute"})

    def repair(self) -> list[int]:
        """Make the next ``collect`` recompute exactly the damaged shards; returns them.

        Under the cache's lock: :meth:`verify`; the status goes back to ``partial``; then each
        damaged shard loses its ledger entry first and its files (whatever they are) next. Each
        step is durable on its own: a crash at any point leaves a partial cache whose resume
        recomputes at least those shards (rerun ``--repair`` if the crash came before the ledger
        entries went), so the resumed cache equals a clean run byte for byte.

        Raises:
            IA2Error: the cache holds damage that recomputing shards cannot fix (a manifest,
                array metadata or stray files, NaN/Inf the teacher wrote), or is locked.
        """
        with self.lock():
            problems = self.verify()
            fatal = [p for p in problems if p.repair is None]
            if fatal:
                reasons = "; ".join(f"{p.array} rows {p.rows[0]}-{p.rows[1]}: {p.reason}" for p in fatal[:5])
                raise IA2Error(
                    f"cache {self.path} cannot be repaired by recomputing shards: {reasons}"
                    f"{' ...' if len(fatal) > 5 else ''}. Move it away and collect again"
                )
            shards = self._shards_to_recompute(problems)
            if not shards:
                return []
            log.warning("cache %s: recomputing damaged shards %s", self.path, shards)
            self._write_manifest({**self._manifest, "status": "partial"})
            for s in shards:
                self._drop_shard(s)
            return shards

    def _drop_shard(self, shard: int) -> None:
        """Delete the ledger entry of ``shard``, then its file in every array (never following a
        link: a link or special file in their place is removed itself)."""
        keys = [f"{p}/{_shard_key(spec, shard)}" for p, spec in self.specs.items()]
        if isinstance(self.path, RemotePath):
            self._ledger_path(shard).unlink(missing_ok=True)
            for k in keys:
                (self.path / k).unlink(missing_ok=True)
            return
        remove_beneath(self.path, self._ledger_path(shard), follow_root=False)
        for p in self.specs:
            # c/<shard> holds this shard's file only (one chunk along every other dimension)
            remove_beneath(self.path, self.path / p / "c" / str(shard), follow_root=False)

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
        # Never through a link (a planted one would get the pid written over its target), never a
        # FIFO (the open would block) or a device: a regular file in the real cache folder only.
        fd = open_beneath(self.path, lock_path, os.O_RDWR | os.O_CREAT, 0o666, follow_root=False)
        f = os.fdopen(fd, "r+", encoding="utf-8")
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
        """The zarr array at ``path``, for direct zarr access.

        Raises:
            KeyError: the manifest names no such array.
            IA2Error: its metadata is gone (a partial cache whose creation was cut short).
        """
        if path not in self.specs:
            raise KeyError(f"{self.path} has no array {path!r}; it has {sorted(self.specs)}")
        if path not in self._arrays:
            try:
                self._arrays[path] = self._group[path]
            except KeyError:
                raise IA2Error(f"cache {self.path}: array {path} has no metadata ({path}/zarr.json); "
                               f"run `ia2cache verify {self.path}`") from None
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
            self._direct_readers[path] = open_reader(self.path / path, root=self.path) if local else None
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
        try:
            parts = [self._ledger_entry(s)["arrays"][path]["stats"] for s in sorted(self.done_shards())]
            for p in parts:
                for k in ("count", "mean", "std", "max_abs", "nan_count", "inf_count"):
                    float(p[k])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IA2Error(f"cache {self.path}: the ledger's stats of {path} are unusable "
                           f"({type(e).__name__}: {e}); run `ia2cache verify {self.path}`") from None
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
        """Check the cache as it is on disk; name the array and rows of any damage.

        Reads every byte of the cache once, in stages, each only once the ones before hold (a
        manifest or layout that cannot be trusted says nothing about rows, so nothing is sized by
        it): (1) the manifest (:func:`manifest_problems`), still the one this cache was opened
        with; (2) every array's metadata against it, rows above all; (3) the ledger holds one
        entry per finished shard, named as ia2cache names them, and nothing else, and (locally) no
        symlink or special file sits anywhere in the cache; (4) every finished shard of every
        array against its ledger entry. An intact complete cache returns ``[]``; a partial cache
        reports its missing shards. NaN/Inf values recorded in the ledger stats are reported too,
        since they poison training. Each problem says how ``collect`` fixes it
        (:attr:`Problem.repair`).
        """
        try:
            fresh = _load_manifest(self.path)
        except DamagedCacheError as exc:
            return exc.problems
        except IA2Error as exc:  # the folder became a link, or is no cache any more
            if isinstance(self.path, RemotePath):
                raise  # the remote store failing is no damage
            return [Problem("manifest", (0, 0), str(exc))]
        if _digest_of(fresh) != _digest_of(self._manifest):
            return [Problem("manifest", (0, 0), "the manifest changed on disk since this cache was "
                                                "opened: open it again")]
        problems = self._array_problems(missing_ok=False)
        if problems:
            return problems
        try:
            names = sorted(self._ledger_names())
        except IA2Error as e:
            if isinstance(self.path, RemotePath):
                raise
            return [Problem("ledger", (0, 0), f"the ledger folder is unusable: {e}")]
        done = set()
        for name in names:
            shard = _shard_of_entry(name)
            if shard is not None and shard < self.n_shards:
                done.add(shard)
            elif not _JSON_TEMP_RE.fullmatch(name):  # a killed writer's temp file is no damage
                what = (f"shard {shard} lies beyond the cache's {self.n_rows} rows" if shard is not None
                        else "a name ia2cache never writes there")
                problems.append(Problem("ledger", (0, 0), f"{_LEDGER_DIR}/{name} is not a ledger entry "
                                                          f"of this cache: {what}"))
        problems += self._special_file_problems(done)
        arrays: dict[str, zarr.Array] = {}
        for p in self.specs:
            try:
                arrays[p] = self._group[p]
            except Exception as e:  # any failure here is damage to report
                problems.append(Problem(p, (0, self.n_rows), f"array unreadable: {e}"))
        for shard in range(self.n_shards):
            rows = self.shard_rows(shard)
            if shard not in done:
                if self.status == "complete":
                    problems.append(Problem("*", rows, "shard not in ledger", "recompute"))
                else:
                    problems.append(Problem("*", rows, "missing (partial cache)", "resume"))
                continue
            try:
                entry = self._ledger_entry(shard)
            except (OSError, ValueError) as e:
                problems.append(Problem("*", rows, f"ledger entry unreadable: {e}", "recompute"))
                continue
            if entry.get("rows") != list(rows) or entry.get("shard") != shard:
                problems.append(Problem("*", rows, f"ledger says shard {entry.get('shard')!r}, rows "
                                                   f"{entry.get('rows')!r}", "recompute"))
                continue
            infos = entry.get("arrays")
            for p, arr in arrays.items():
                info = infos.get(p) if isinstance(infos, dict) else None
                if not isinstance(info, dict):
                    problems.append(Problem(p, rows, "array not in the shard's ledger entry", "recompute"))
                    continue
                problems.extend(self._verify_shard_array(shard, p, arr, info))
        if self.status != "complete" and not self.missing_shards():
            problems.append(Problem("*", (0, self.n_rows), "every shard is written but the cache is "
                                    "not marked complete: run the same collect again to finish it",
                                    "resume"))
        return problems

    def _special_file_problems(self, done: set[int]) -> list[Problem]:
        """Symlinks and special files in a local cache. One on the way to a finished shard's file
        is left to that shard's check (which names it); one elsewhere in a shard's folder
        ``<array>/c/<shard>`` makes that shard to recompute; anywhere else it is damage that
        only its removal fixes."""
        if isinstance(self.path, RemotePath):
            return []
        out = []
        for where, kind in special_files(Path(self.path)):
            rel = where.relative_to(self.path).as_posix()
            array, shard = self._shard_position(rel)
            if shard is None:
                out.append(Problem("files", (0, 0), f"{rel} is a {kind}, not a regular file or folder"))
                continue
            if array is None:
                continue  # a ledger entry: its shard is done, and its check reads it
            own = f"{array}/{_shard_key(self.specs[array], shard)}"
            if shard in done and (own == rel or own.startswith(rel + "/")):
                continue
            out.append(Problem(array, self.shard_rows(shard), f"{rel} is a {kind}", "recompute"))
        return out

    def _shard_position(self, rel: str) -> tuple[str | None, int | None]:
        """(array, shard) when ``rel`` lies in a shard's folder ``<array>/c/<shard>``, (None, shard)
        for a ledger entry, else (None, None)."""
        if rel.startswith(f"{_LEDGER_DIR}/") and rel.count("/") == 1:
            shard = _shard_of_entry(rel.split("/", 1)[1])
            return None, shard if shard is not None and shard < self.n_shards else None
        for p in self.specs:
            if rel.startswith(f"{p}/c/"):
                first = rel[len(p) + 3 :].split("/", 1)[0]
                if first.isdigit() and int(first) < self.n_shards:
                    return p, int(first)
        return None, None

    def _shard_file_problem(self, key: str) -> str | None:
        """Why the shard file ``key`` (relative to the cache) cannot be read, or None."""
        if isinstance(self.path, RemotePath):
            return None if (self.path / key).is_file() else f"shard file {key} is missing (deleted?)"
        try:
            check_beneath(self.path, self.path / key)
        except IA2Error as e:
            return f"shard file {key}: {e}"
        if not os.path.lexists(self.path / key):
            return f"shard file {key} is missing (deleted?)"
        return None

    def _verify_shard_array(
        self, shard: int, path: str, arr: zarr.Array, info: dict
    ) -> list[Problem]:
        start, stop = self.shard_rows(shard)
        rows = (start, stop)
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"
        bad_file = self._shard_file_problem(key)
        if bad_file is not None:
            return [Problem(path, rows, bad_file, "recompute")]
        problems: list[Problem] = []
        ranges = self._chunk_ranges(start, stop)
        chunks = info.get("chunks")
        if not isinstance(chunks, list) or len(chunks) != len(ranges):
            return [Problem(path, rows, "ledger entry has the wrong number of chunk checksums", "recompute")]
        try:
            whole: np.ndarray | None = np.ascontiguousarray(arr[start:stop])
        except Exception:  # narrow it down chunk by chunk below
            whole = None
        for (a, b), want in zip(ranges, chunks, strict=True):
            if whole is not None:
                chunk = whole[a - start : b - start]
            else:
                try:
                    chunk = np.ascontiguousarray(arr[a:b])
                except Exception as e:
                    problems.append(Problem(path, (a, b), f"chunk unreadable: {e}", "recompute"))
                    continue
            if digest(chunk) != want:
                problems.append(Problem(path, (a, b), "checksum mismatch", "recompute"))
        if (
            not problems
            and whole is not None
            and digest(whole) != info.get("sha256")
        ):
            problems.append(Problem(path, rows, "shard checksum does not match the ledger", "recompute"))
        st = info.get("stats") if isinstance(info.get("stats"), dict) else {}
        if st.get("nan_count"):
            problems.append(
                Problem(path, rows, f"{st['nan_count']} NaN values written by the teacher")
            )
        if st.get("inf_count"):
            problems.append(
                Problem(path, rows, f"{st['inf_count']} Inf values written by the teacher")
            )
        return problems


def _ledger_name(shard: int) -> str:
    """The file name of ``shard``'s ledger entry: the one name it may have."""
    return f"shard_{shard:06d}.json"


def _shard_of_entry(name: str) -> int | None:
    """The shard a ledger file name is the entry of, None for any name :func:`_ledger_name` does
    not give (``shard_0000001.json`` would otherwise be a second entry of shard 1)."""
    m = _LEDGER_RE.fullmatch(name)
    return int(m.group(1)) if m and name == _ledger_name(int(m.group(1))) else None


def _shard_key(spec: ArraySpec, shard: int) -> str:
    """The path of ``shard``'s file inside its array (zarr's default chunk key encoding)."""
    return "/".join(["c", str(shard), *(["0"] * len(spec.shape))])


def _remove_write_debris(path: Path) -> None:
    """Delete the temp files of writes a killed writer never renamed into place.

    Called under the writer's lock, when no other write can be in flight, so that a cache
    resumed after a crash holds the same files as one that never crashed.
    """
    if isinstance(path, RemotePath):
        return  # object stores: every zarr chunk and ledger entry is one PUT, no temp objects
    for root, _dirs, files in os.walk(path):  # never into a linked folder
        for name in files:  # a link or FIFO of such a name is removed itself, never followed
            if _ZARR_TEMP_RE.fullmatch(name) or _JSON_TEMP_RE.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    log.info("removed %s, left by a writer that was killed", os.path.join(root, name))


def _lookup(d: dict, dotted: str) -> Any:
    """The value at a dotted field name from :func:`_diff` (``None`` where absent)."""
    return _find(d, dotted)[1]


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

    A cache under the store is never reached through a symlink below the store (the store
    itself may be one): ``<store>/<key>`` planted as a link is refused, wherever it points.

    Raises:
        IA2Error: the name leaves the store, is not a key nor an existing directory, or an
            absolute path that is not a cache, or a symlink below the store.
    """
    if is_url(cache):
        p = location(cache).resolve()
        if not _looks_like_cache(p):
            raise IA2Error(f"{cache} is not an ia2cache cache (no zarr group with a manifest)")
        return p
    store_loc = location(store)
    if isinstance(store_loc, RemotePath):
        return _resolve_remote(store_loc, cache)
    store_dir = Path(store_loc).resolve()
    given = Path(cache).expanduser()
    if not _KEY_RE.fullmatch(cache) and not given.is_absolute() and _looks_like_cache(given):
        return given.resolve()  # an explicit path to a cache, relative to the working directory
    if given.is_absolute():
        p = given.resolve()
        if not _looks_like_cache(p):
            raise IA2Error(f"{cache} is not an ia2cache cache (no zarr group with a manifest)")
        return p
    p = (store_dir / given).resolve()
    if p == store_dir or not p.is_relative_to(store_dir):
        raise IA2Error(f"refusing a cache path outside the store: {cache!r} (store {store_dir})")
    named = Path(os.path.normpath(store_dir / given))
    if named.is_relative_to(store_dir):
        check_beneath(store_dir, named, "directory")  # a link below the store, even to inside it
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
    if not _KEY_RE.fullmatch(cache) and _looks_like_cache(given):
        return given.resolve()  # an explicit local cache path still works with a remote --store
    root = store.resolve()
    if given.is_absolute() or cache.startswith("/") or "\\" in cache:
        raise IA2Error(f"refusing a cache path outside the store: {cache!r} (store {root})")
    p = (root / cache).resolve()
    if p == root or not p.is_relative_to(root):
        raise IA2Error(f"refusing a cache path outside the store: {cache!r} (store {root})")
    if not _KEY_RE.fullmatch(cache) and not _looks_like_cache(p):
        raise IA2Error(
            f"no cache {cache!r} in store {root}: give a 16-hex-char key or an existing cache "
            f"name (see `ia2cache ls --store {root}`)"
        )
    return p


def list_caches(store: str | Location) -> list[dict]:
    """The manifest of each cache under ``store``, oldest first, each with its ``"path"``.

    A cache that cannot be trusted (see :meth:`Cache.open`: a truncated or edited manifest, a
    cache filed under another key, a symlink planted as a cache folder) is listed too, as
    ``{"key": <folder name>, "status": "damaged", "path", "problems": [reason, ...]}``.
    """
    store_dir = location(store)
    if not store_dir.is_dir():
        return []
    out = []
    for child in store_dir.iterdir():
        if not isinstance(child, RemotePath) and child.is_symlink():
            if _looks_like_cache(child):
                out.append(_damaged_entry(child, [str(refusal(child, "symbolic link", "directory"))]))
            continue
        if not child.is_dir() or not _looks_like_cache(child):
            log.debug("skipping %s: not a cache", child)
            continue
        try:
            manifest = _load_manifest(child)
        except DamagedCacheError as exc:
            out.append(_damaged_entry(child, [p.reason for p in exc.problems]))
            continue
        except IA2Error as exc:  # another schema, or gone meanwhile
            log.debug("skipping %s: %s", child, exc)
            continue
        out.append({**manifest, "path": str(child)})
    return sorted(out, key=lambda m: (str(m.get("created", "")), str(m.get("key", ""))))


def _damaged_entry(path: Location, problems: list[str]) -> dict:
    return {"key": path.name, "status": "damaged", "path": str(path), "problems": problems}


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify_cache` found."""

    path: Location
    status: str
    """``"partial"``, ``"complete"``, or ``"damaged"`` when the manifest or the arrays' metadata
    cannot be trusted (then nothing past them was checked)."""
    shards: int
    """Shards of the cache (0 when damaged)."""
    problems: list[Problem]


def verify_cache(path: str | Location) -> Verdict:
    """:meth:`Cache.verify` of the cache at ``path``, also when :meth:`Cache.open` refuses it as
    damaged: then its problems are the verdict (``ia2cache verify`` exits 1), not an error.

    Raises:
        IA2Error: ``path`` is no cache at all, is a symlink, or has another schema version.
    """
    try:
        cache = Cache.open(path)
    except DamagedCacheError as exc:
        return Verdict(exc.path, "damaged", 0, exc.problems)
    return Verdict(cache.path, cache.status, cache.n_shards, cache.verify())
