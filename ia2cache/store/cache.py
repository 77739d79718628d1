"""The cache: the arrays of one key (the store), with its ledger and its manifest.

Writers call :meth:`Cache.create_or_open` (safe to call twice: an existing cache with the same
manifest is opened to resume), write whole shards with :meth:`Cache.write_shard` under
:meth:`Cache.lock`, then :meth:`Cache.finalize`. Readers call :meth:`Cache.open` and
:meth:`Cache.read`. Writers write whole shards only, with one assignment each, because zarr's
sharding codec rewrites the whole shard on any partial write, and two processes writing one
shard lose data (zarr-python issue 3682).

Trust (see docs/reliability.md): a store may be shared, so nothing below the store follows a
symlink or opens a special file (:mod:`ia2cache.store.locations`), and a cache is used only if its
manifest is well formed, produces the key it is filed under and matches its arrays
(:func:`~ia2cache.store.manifest.manifest_problems`, :meth:`Cache.open`); :meth:`Cache.verify`
reports every such problem as damage, and :meth:`Cache.repair` makes ``collect`` recompute
damaged shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from ia2cache._faults import fault_point
from ia2cache.errors import IA2Error
from ia2cache.store.direct import ShardReader
from ia2cache.store.layout import (
    FORMAT,
    LEDGER_DIR,
    LOCK_FILE,
    ArraySpec,
    ledger_name,
    shard_of_entry,
)
from ia2cache.store.ledger import LedgerEntry, Stats, check_chunk, shard_digest
from ia2cache.store.locations import Location, RemotePath, is_url, location
from ia2cache.store.manifest import (
    KEY_RE,
    VOLATILE_FIELDS,
    Manifest,
    ManifestError,
    check_spec_paths,
    format_of,
    lookup,
)

__all__ = [
    "Cache",
    "DamagedCacheError",
    "FormatError",
    "Damage",
    "Verdict",
    "list_caches",
    "resolve_cache",
    "verify_cache",
]

log = logging.getLogger(__name__)

# zarr's LocalStore writes every file as "<name>.<uuid4 hex>.partial" and then renames it; a
# writer killed in between leaves that temp file behind. ia2cache._io.write_json_atomic's:
ZARR_TEMP_RE = re.compile(r".+\.[0-9a-f]{32}\.partial")
JSON_TEMP_RE = re.compile(r"\..+\.json\.[a-z0-9_]{8}\.tmp")
_DEBRIS_RE = re.compile(f"(?:{ZARR_TEMP_RE.pattern})|(?:{JSON_TEMP_RE.pattern})")
# Bounds on what a metadata file or ledger entry may hold before it is read into memory: a
# manifest of a few KB, an entry of ~70 bytes per chunk and array. Far above any real one.
MAX_META_BYTES = 16 << 20
MAX_LEDGER_BYTES = 256 << 20


@dataclass(frozen=True)
class Damage:
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

    def __init__(self, path: object, problems: list[Damage]) -> None:
        self.path = path
        self.problems = problems
        reasons = "; ".join(p.reason for p in problems[:5]) + (" ..." if len(problems) > 5 else "")
        super().__init__(
            f"cache {path} is damaged and was not used: {reasons}. A cache whose manifest or layout "
            f"is wrong cannot be repaired: move it away and collect again (`ia2cache verify {path}` "
            "lists every problem)"
        )


class FormatError(IA2Error):
    """A cache in another store format: format 1 is rewritten by ``ia2cache migrate KEY``."""

    def __init__(self, path: object, key: str, fmt: int, store: object) -> None:
        self.path, self.key, self.format = path, key, fmt
        if fmt == 1:
            msg = (f"cache {path} is in store format 1 (one array per layer), which this ia2cache no "
                   f"longer reads: run `ia2cache migrate {key} --store {store}` to rewrite it as format "
                   f"{FORMAT} (same key, bit-identical values, verified; the format-1 cache stays usable "
                   "until the rewrite is complete)")
        else:
            msg = f"cache {path} has store format {fmt}; this ia2cache reads format {FORMAT}"
        super().__init__(msg)


def _damaged(path: object, reason: str) -> DamagedCacheError:
    return DamagedCacheError(path, [Damage("manifest", (0, 0), reason)])


def read_group_attrs(loc: Location) -> dict[str, Any]:
    """The manifest JSON of the cache at ``loc``, as written, whatever its format.

    Raises:
        IA2Error: not a cache (no ``zarr.json``), or the folder is a link or special file.
        DamagedCacheError: ``zarr.json`` is unreadable, not a zarr group, or holds no manifest.
    """
    loc.check_folder()
    try:
        raw = loc.read("zarr.json", MAX_META_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise IA2Error(f"{loc} is not an ia2cache cache (no zarr group with a manifest)") from None
    except ValueError as exc:
        raise _damaged(loc, str(exc)) from None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(loc, f"{loc / 'zarr.json'} is not valid JSON ({exc}): truncated or "
                            "overwritten") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise _damaged(loc, f"{loc / 'zarr.json'} is not the metadata of a zarr v3 group")
    attrs = meta.get("attributes")
    manifest = attrs.get("manifest") if isinstance(attrs, dict) else None
    if not isinstance(manifest, dict):
        raise _damaged(loc, f"{loc / 'zarr.json'} holds no manifest")
    return manifest


def load_manifest(loc: Location) -> Manifest:
    """The manifest of the cache at ``loc``, once it can be trusted.

    Raises:
        IA2Error: not a cache, or a link.
        FormatError: a cache of another store format (format 1: ``ia2cache migrate``).
        DamagedCacheError: ``zarr.json`` is unreadable or its manifest cannot be trusted.
    """
    raw = read_group_attrs(loc)
    fmt = format_of(raw)
    if fmt is not None and fmt != FORMAT:
        key = raw.get("key") if isinstance(raw.get("key"), str) else loc.name
        raise FormatError(loc, key, fmt, loc.parent)
    try:
        return Manifest.from_json(raw, loc.name)
    except ManifestError as exc:
        raise DamagedCacheError(loc, [Damage("manifest", (0, 0), r) for r in exc.problems]) from None


def _layout_of(meta: Any) -> tuple:
    """(shape, dtype, shard shape, chunk shape, chunk codecs) from an array's ``zarr.json`` (a
    sharded v3 array, as ia2cache writes).

    Raises:
        ValueError, KeyError, TypeError, IndexError: the metadata is not such an array's.
    """
    codec = meta["codecs"][0]
    if codec["name"] != "sharding_indexed" or meta["node_type"] != "array":
        raise ValueError(f"not a sharded array (codec {codec['name']!r})")
    cfg = codec["configuration"]
    return (tuple(int(d) for d in meta["shape"]), np.dtype(meta["data_type"]),
            tuple(int(d) for d in meta["chunk_grid"]["configuration"]["chunk_shape"]),
            tuple(int(d) for d in cfg["chunk_shape"]), tuple(c["name"] for c in cfg["codecs"]))


def _expected_layout(spec: ArraySpec, n_rows: int, rows_per_shard: int, rows_per_chunk: int) -> tuple:
    """What :func:`_layout_of` reads from ``spec``'s array as :meth:`Cache._create_array` makes it."""
    codecs = ("bytes", *(c.to_dict()["name"] for c in spec.compressors()))
    return ((n_rows, *spec.shape), np.dtype(spec.dtype), (rows_per_shard, *spec.shard_trailing),
            (rows_per_chunk, *spec.chunk_trailing), codecs)


# --------------------------------------------------------------------------- cache


class Cache:
    """A cache: zarr arrays (the store) plus a ledger and a manifest.

    Make one with :meth:`create_or_open` (writers) or :meth:`open` (readers).
    """

    def __init__(self, loc: Location, manifest: Manifest, writable: bool) -> None:
        self.location = loc
        self._manifest = manifest
        self._group = zarr.open_group(store=loc.zarr_store(read_only=not writable),
                                      mode="r+" if writable else "r", zarr_format=3)
        self._writable = writable
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads zarr.json
        self._direct: dict[str, ShardReader | None] = {}  # per array: read without zarr's pipeline?
        self._ledger: dict[int, LedgerEntry] = {}
        self._layer_pos = {layer: i for i, layer in enumerate(manifest.layers)}

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, status={self.status!r}, rows={self.n_rows})"

    # ------------------------------------------------------------------ layout

    @property
    def path(self) -> Path | RemotePath:
        """Where the cache lives: a local folder, or a :class:`RemotePath` for an fsspec URL."""
        return self.location.path

    @property
    def manifest(self) -> Manifest:
        """What produced the cache, its layout and status (frozen)."""
        return self._manifest

    @property
    def key(self) -> str:
        return self._manifest.key

    @property
    def n_rows(self) -> int:
        return self._manifest.rows

    @property
    def rows_per_shard(self) -> int:
        return self._manifest.rows_per_shard

    @property
    def rows_per_chunk(self) -> int:
        return self._manifest.rows_per_chunk

    @property
    def specs(self) -> dict[str, ArraySpec]:
        return self._manifest.specs

    @property
    def status(self) -> str:
        """``"partial"`` or ``"complete"``."""
        return self._manifest.status

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_rows / self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """The ``[start, stop)`` rows of ``shard``; the last shard may be short."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} is outside 0..{self.n_shards - 1} of {self.path}")
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n_rows)

    def chunk_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The chunks of rows ``[start, stop)`` (chunk aligned at ``start``)."""
        return [(a, min(a + self.rows_per_chunk, stop)) for a in range(start, stop, self.rows_per_chunk)]

    # ------------------------------------------------------------------ opening

    @classmethod
    def create_or_open(cls, store: str | Path | RemotePath | Location, key: str,
                       manifest: Mapping[str, Any], specs: list[ArraySpec], n_rows: int,
                       rows_per_shard: int, rows_per_chunk: int) -> Cache:
        """Create the cache ``<store>/<key>/``, or open it to resume if it already exists.

        Safe to call twice: an existing cache whose manifest equals the one given (on every
        field given, ignoring :data:`VOLATILE_FIELDS`) is opened as is.

        Args:
            store: the store directory (created if absent) or an fsspec URL (``s3://b/p``).
            key: the cache key, 16 lowercase hex chars (see :func:`~ia2cache.store.cache_key`).
            manifest: what produced the cache, JSON-serialisable; stored in the group
                attributes with the layout fields added.
            specs: the arrays to hold.
            n_rows: rows in every array.
            rows_per_shard: rows per shard, the unit of writing; a multiple of ``rows_per_chunk``.
            rows_per_chunk: rows per chunk, the unit of reading and checksumming.

        Raises:
            IA2Error: the cache exists with a different manifest (a key collision or a
                hand-edited cache), the path exists and is not a cache, or the cache folder or
                anything in it is a symlink or special file.
            FormatError: a cache of another store format sits there.
            DamagedCacheError: the existing cache cannot be trusted (see :meth:`open`).
        """
        return cls.create_at(location(store) / key, key, manifest, specs, n_rows, rows_per_shard,
                             rows_per_chunk)

    @classmethod
    def create_at(cls, loc: Location, key: str, manifest: Mapping[str, Any], specs: list[ArraySpec],
                  n_rows: int, rows_per_shard: int, rows_per_chunk: int) -> Cache:
        """:meth:`create_or_open` at the folder ``loc`` (``ia2cache migrate`` writes a sibling)."""
        if not KEY_RE.fullmatch(key):
            raise ValueError(f"cache key {key!r} must be 16 lowercase hex chars")
        if n_rows < 1 or rows_per_chunk < 1 or rows_per_shard < 1:
            raise ValueError("n_rows, rows_per_shard and rows_per_chunk must be >= 1")
        if rows_per_shard % rows_per_chunk:
            raise ValueError(f"rows_per_shard ({rows_per_shard}) must be a multiple of "
                             f"rows_per_chunk ({rows_per_chunk})")
        check_spec_paths(specs)
        try:
            given = Manifest.new(key, manifest, specs, n_rows, rows_per_shard, rows_per_chunk)
        except ManifestError as exc:
            raise ValueError(f"the manifest of {loc} would not be valid: {exc}") from None
        try:
            loc.check_folder()  # <store>/<key> a symlink: never written through
            if not loc.has("zarr.json"):
                if any(c.name != LOCK_FILE and not ZARR_TEMP_RE.fullmatch(c.name) for c in loc.children()):
                    raise IA2Error(f"{loc} exists and is not an ia2cache cache; move it away")
                loc.mkdir()
                loc.check_folder()
                # If another process created it first, compare below as on any resume.
                with contextlib.suppress(FileExistsError, zarr.errors.ContainsGroupError,
                                         zarr.errors.ContainsArrayError):
                    zarr.create_group(loc.zarr_store(read_only=False), zarr_format=3,
                                      attributes={"manifest": given.to_json()})
            cache = cls._resume(loc, given)
            cache._refuse_special_files()
            cache._ensure_arrays()
        except OSError as exc:  # disk full, quota, permissions: nothing is marked complete
            raise IA2Error(
                f"creating cache {loc} failed ({exc.strerror or exc}); nothing is marked complete: "
                "free space (or fix permissions) and rerun the same command to resume"
            ) from exc
        return cache

    @classmethod
    def _resume(cls, loc: Location, given: Manifest) -> Cache:
        stored = load_manifest(loc)
        differing = stored.diff(given)
        if differing:
            detail = "; ".join(f"{f}: stored {lookup(stored, f)!r}, given {lookup(given, f)!r}"
                               for f in differing[:5])
            raise IA2Error(
                f"cache {loc} exists with a different manifest in field(s) {', '.join(differing)} "
                f"({detail}); a key collision or a hand-edited cache: refusing to overwrite it"
            )
        return cls(loc, stored, writable=True)

    def _create_array(self, spec: ArraySpec) -> zarr.Array:
        return self._group.create_array(
            name=spec.path,
            shape=(self.n_rows, *spec.shape),
            chunks=(self.rows_per_chunk, *spec.chunk_trailing),
            shards=(self.rows_per_shard, *spec.shard_trailing),
            dtype=spec.dtype,
            compressors=spec.compressors(),
            fill_value=0,
            attributes={"logical_dtype": spec.logical_dtype} if spec.logical_dtype else None,
            dimension_names=("rows", *([None] * len(spec.shape))),
        )

    def _ensure_arrays(self) -> None:
        """Create arrays a crashed creation left out; refuse ones that do not match."""
        for spec in self.specs.values():
            try:
                arr = self._group[spec.path]
            except KeyError:
                try:
                    self._create_array(spec)
                    continue
                except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError):
                    # Another process starting on the same key created it first (its metadata
                    # write is exclusive): check what it made like any existing array.
                    arr = self._group[spec.path]
            if not isinstance(arr, zarr.Array):
                raise IA2Error(f"{self.location / spec.path} is a group, the manifest says an array")
            problems = self._array_problems(missing_ok=False, only=spec.path)
            if problems:
                raise IA2Error(f"array {self.location / spec.path} does not match the manifest: "
                               f"{problems[0].reason}")

    @classmethod
    def open(cls, path: str | Path | RemotePath | Location) -> Cache:
        """Open an existing cache for reading (writes reopen it for writing on demand).

        The manifest must pass :func:`~ia2cache.store.manifest_problems` (well formed, unedited,
        producing the key its folder is named by) and every array's metadata must match it (rows,
        dtype, shards, chunks, codecs), so that no caller acts on a misfiled or tampered cache.

        Raises:
            IA2Error: ``path`` is not an ia2cache cache or is a symlink.
            FormatError: the cache has another store format (format 1: ``ia2cache migrate KEY``).
            DamagedCacheError: the manifest or the arrays' metadata cannot be trusted.
        """
        loc = location(path)
        cache = cls(loc, load_manifest(loc), writable=False)
        # A partial cache may lack arrays a crash during its creation left out: collect makes them.
        problems = cache._array_problems(missing_ok=cache.status != "complete")
        if problems:
            raise DamagedCacheError(loc, problems)
        return cache

    def _array_problems(self, missing_ok: bool, only: str | None = None) -> list[Damage]:
        """Arrays whose metadata is unreadable, missing or not what the manifest says (their rows
        above all: nothing may be sized by a manifest's row count the arrays do not have)."""
        out = []
        for p, spec in self.specs.items():
            if only is not None and p != only:
                continue
            try:
                have = _layout_of(json.loads(self.location.read(f"{p}/zarr.json", MAX_META_BYTES)))
            except (FileNotFoundError, NotADirectoryError):
                if not missing_ok:
                    out.append(Damage(p, (0, 0), f"array metadata {p}/zarr.json is missing"))
                continue
            except (ValueError, KeyError, TypeError, IndexError) as e:
                out.append(Damage(p, (0, 0), f"array metadata {p}/zarr.json is unusable ({e})"))
                continue
            want = _expected_layout(spec, self.n_rows, self.rows_per_shard, self.rows_per_chunk)
            if have[0][0] != self.n_rows:
                out.append(Damage(p, (0, 0), f"array {p} holds {have[0][0]} rows, the manifest "
                                              f"says rows {self.n_rows}"))
            elif have != want:
                out.append(Damage(p, (0, 0), f"array {p} has (shape, dtype, shards, chunks, codecs) "
                                              f"{have}, the manifest says {want}"))
        return out

    # ------------------------------------------------------------------ ledger

    def _ledger_names(self) -> list[str]:
        """The names in the ledger folder (locally reached through no link).

        Raises:
            IA2Error: the ledger folder is a symlink or special file.
        """
        return self.location.listdir(LEDGER_DIR)

    def done_shards(self) -> set[int]:
        """Shards with a ledger entry, i.e. finished. Only the names ia2cache writes count: one
        per shard of this cache, so the entries can never overlap nor cover rows it lacks."""
        return {s for s in map(shard_of_entry, self._ledger_names()) if s is not None and s < self.n_shards}

    def missing_shards(self) -> list[int]:
        """Shards still to write, sorted."""
        done = self.done_shards()
        return [s for s in range(self.n_shards) if s not in done]

    def ledger_entry(self, shard: int) -> LedgerEntry:
        """The ledger entry of ``shard`` (read once, then kept: entries are written once).

        Raises:
            OSError: it cannot be read (``FileNotFoundError``: there is none).
            ValueError: it is a link or special file, implausibly large, or malformed.
        """
        if shard not in self._ledger:
            raw = self.location.read(f"{LEDGER_DIR}/{ledger_name(shard)}", MAX_LEDGER_BYTES)
            try:
                parsed = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"ledger entry of shard {shard} is not UTF-8 JSON ({e})") from None
            entry = LedgerEntry.from_json(parsed, shard)
            if entry.rows != self.shard_rows(shard):
                raise ValueError(f"ledger says shard {shard}, rows {list(entry.rows)}")
            self._ledger[shard] = entry
        return self._ledger[shard]

    def _refuse_special_files(self) -> None:
        """Before zarr writes into a local cache: refuse any symlink or special file in it.

        zarr writes by path (see :class:`~ia2cache.store.locations._SafeLocalStore` for the check
        before each write and the race it leaves); this walk refuses a trap at once, before any
        model work, naming it. Damaged shards' files are removed by :meth:`repair` first.

        Raises:
            IA2Error: naming the first such file.
        """
        found = self.location.special_files()
        if found:
            where, kind = found[0]
            raise IA2Error(
                f"{self.location / where} is a {kind}, not a regular file or folder: refusing to write into "
                f"cache {self.path} (ia2cache never follows a link nor opens a special file in a store). "
                "Remove it; if it sits where a shard file or ledger entry belongs, `ia2cache collect "
                "... --repair` recomputes that shard"
            )

    # ------------------------------------------------------------------ writing

    def _writable_group(self) -> zarr.Group:
        if not self._writable:
            self._group = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="r+",
                                          zarr_format=3)
            self._writable = True
            self._arrays, self._direct = {}, {}
        return self._group

    def _writable_array(self, path: str) -> zarr.Array:
        self._writable_group()
        # write_empty_chunks: an all-zero shard must still exist on disk, so that a
        # deleted shard file is told apart from a shard of zeros.
        return self.array(path).with_config({"write_empty_chunks": True})

    def write_shard(self, shard: int, data: Mapping[str, np.ndarray],
                    errors: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Write one whole shard of every array, then its ledger entry.

        Each array's shard region is written with one assignment (a partial shard write
        would rewrite the shard anyway). The ledger entry is written last and atomically,
        so a shard counts as done only once all of its bytes are in place.

        Args:
            shard: the shard index; its rows are :meth:`shard_rows`.
            data: every spec path -> array of shape ``(stop - start, *spec.shape)`` and the
                spec's stored dtype.
            errors: per lossy array, its (max relative error, max relative L2 error) against the
                teacher's values (see :class:`~ia2cache.store.layout.Encoded`), kept in the ledger.

        Raises:
            ValueError: ``data`` misses an array, has an extra one, or a wrong shape/dtype.
            IA2Error: the cache is already complete.
        """
        start, stop = self.shard_rows(shard)
        if self.status == "complete":
            raise IA2Error(f"cache {self.path} is complete; refusing to rewrite shard {shard}")
        missing, extra = sorted(set(self.specs) - set(data)), sorted(set(data) - set(self.specs))
        if missing or extra:
            raise ValueError(f"shard {shard} of {self.path}: missing arrays {missing}, unknown arrays "
                             f"{extra}")
        for p, spec in self.specs.items():
            a = data[p]
            want = (stop - start, *spec.shape)
            if a.shape != want or a.dtype != np.dtype(spec.dtype):
                raise ValueError(f"shard {shard}, array {p}: got shape {a.shape} dtype {a.dtype}, "
                                 f"expected shape {want} dtype {spec.dtype}")
        entry = LedgerEntry.build(shard, (start, stop), data, self.specs, self.rows_per_chunk, errors)
        for p in self.specs:
            self._writable_array(p)[start:stop] = np.ascontiguousarray(data[p])
            fault_point("store.mid_shard")
        fault_point("store.before_ledger")
        # Local: temp file + rename, through no link. Remote: one PUT of the whole object.
        self.location.write_json(f"{LEDGER_DIR}/{ledger_name(shard)}", entry.to_json())
        self._ledger[shard] = entry

    def finalize(self, extra: Mapping[str, Any] | None = None) -> None:
        """Mark the cache complete, adding ``extra`` (e.g. seconds, bytes) to the manifest.

        Raises:
            IA2Error: some shards are still missing.
        """
        missing = self.missing_shards()
        if missing:
            raise IA2Error(f"cache {self.path} has {len(missing)} of {self.n_shards} shards missing "
                           f"(first: {missing[:5]}); run collect again to resume")
        extra = json.loads(json.dumps(dict(extra or {})))
        clash = sorted(k for k in extra if k in self._manifest and k not in VOLATILE_FIELDS
                       and self._manifest[k] != extra[k])
        if clash:
            raise ValueError(f"finalize may not change manifest fields {clash}")
        for path in self.location.remove_debris(_DEBRIS_RE):  # under the lock: no write in flight
            log.info("removed %s, left by a writer that was killed", path)
        fault_point("store.before_finalize")
        try:
            self._write_manifest(self._manifest.updated(**extra, status="complete"))
        except OSError as exc:
            raise IA2Error(
                f"marking cache {self.path} complete failed ({exc.strerror or exc}); every shard is "
                "written, so rerunning the same command (after freeing space) only marks it complete"
            ) from exc

    def _write_manifest(self, manifest: Manifest) -> None:
        """Store ``manifest`` (sealed with its digest): one atomic zarr.json write."""
        self._writable_group().attrs["manifest"] = manifest.to_json()
        self._manifest = manifest

    # ------------------------------------------------------------------ repair

    def damaged_shards(self) -> list[int]:
        """The shards :meth:`verify` finds damaged in a way recomputing them fixes (a checksum
        mismatch, an unreadable, missing or special shard file, a missing or unusable ledger
        entry), sorted. Reads the whole cache once."""
        return self._shards_to_recompute(self.verify())

    def _shards_to_recompute(self, problems: list[Damage]) -> list[int]:
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
            self._write_manifest(self._manifest.updated(status="partial"))
            for s in shards:
                self._drop_shard(s)
            return shards

    def _drop_shard(self, shard: int) -> None:
        """Delete the ledger entry of ``shard``, then its file in every array (never following a
        link: a link or special file in their place is removed itself)."""
        self.location.remove(f"{LEDGER_DIR}/{ledger_name(shard)}")
        self._ledger.pop(shard, None)
        for p in self.specs:
            # c/<shard> holds this shard's file only (one shard along every other dimension)
            self.location.remove(f"{p}/c/{shard}")

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold an exclusive lock on the cache while writing it (:mod:`ia2cache.store.lock`).

        Raises:
            IA2Error: another process holds the lock.
        """
        return self.location.lock(LOCK_FILE)

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

    def layer_positions(self, layers: Sequence[int]) -> list[int]:
        """Where each model layer of ``layers`` sits on the activations' layer axis.

        Raises:
            IA2Error: a layer the cache does not hold.
        """
        absent = [i for i in layers if i not in self._layer_pos]
        if absent:
            raise IA2Error(f"--layers {','.join(map(str, layers))}: layer(s) {absent} not in cache "
                           f"{self.path}, which holds layers {list(self._layer_pos)}")
        return [self._layer_pos[i] for i in layers]

    def _selection(self, path: str, start: int, stop: int,
                   layers: Sequence[int] | None) -> tuple[tuple[slice, ...], list[int] | None]:
        """The zarr selection of rows ``[start, stop)`` (and ``layers`` on a layer axis), and the
        positions to take from its result when the layers are not one contiguous run."""
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.n_rows}) of {self.path}")
        if path not in self.specs:
            self.array(path)  # raises KeyError naming the arrays there are
        spec = self.specs[path]
        if layers is None or not self._has_layer_axis(spec):
            return (slice(start, stop),), None
        pos = self.layer_positions(layers)
        if not pos:
            raise ValueError("layers: at least one layer")
        lo, hi = min(pos), max(pos) + 1
        sel = (slice(start, stop), slice(lo, hi))
        return sel, (None if pos == list(range(lo, hi)) else [p - lo for p in pos])

    def _has_layer_axis(self, spec: ArraySpec) -> bool:
        """Activations and their scales: the first trailing axis runs over the manifest's layers."""
        scales = {s.scales for s in self.specs.values()}
        return bool(self._layer_pos) and (spec.stats or spec.path in scales)

    def read(self, path: str, start: int, stop: int, layers: Sequence[int] | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the array at ``path``, in its stored dtype: one read (by
        :mod:`~ia2cache.store.direct` where it can, else zarr), which checks the crc32c of every
        chunk it touches.

        Args:
            layers: for the activations (and their scales): the model layers to read, in this
                order (still one read: the smallest run of layers covering them).

        Performance: zarr decodes whole chunks (``rows_per_chunk`` rows, a group of layers), so
        reading row by row decodes each chunk many times. Read chunk-aligned row ranges (or whole
        shards) and slice in memory; :meth:`read_many` reads several ranges in one call.

        Raises:
            IA2Error: a shard file is missing or not a regular file; ValueError: a chunk's crc32c
                does not match (damage: :meth:`verify` names it).
        """
        sel, take = self._selection(path, start, stop, layers)
        out = self._read_direct(path, sel)
        if out is None:
            out = np.asarray(self.array(path)[sel])
        return out if take is None else out[:, take]

    def _read_direct(self, path: str, sel: tuple[slice, ...],
                     alloc: Callable[..., np.ndarray] = np.empty) -> np.ndarray | None:
        """``sel`` of ``path`` read by :mod:`~ia2cache.store.direct` (the same checks, several times
        zarr's speed), or None when the array is not in the layout it reads (then zarr reads it)."""
        if path not in self._direct:
            self._direct[path] = ShardReader.of(self.array(path))
        reader = self._direct[path]
        if reader is None:
            return None
        return reader.read(sel, alloc)

    def read_many(self, requests: Sequence[tuple[str, int, int]], layers: Sequence[int] | None = None,
                  alloc: Callable[..., np.ndarray] = np.empty) -> list[np.ndarray]:
        """:meth:`read` of each ``(path, start, stop)``: those :mod:`~ia2cache.store.direct` reads
        (uncompressed arrays of a local cache: the activations), then the rest in one call on zarr's
        event loop.

        zarr's cost per call (a hand-off to its event-loop thread and back, the codec pipeline's
        set-up) is paid once for all of them, and their chunks are fetched concurrently: a loader
        reading shuffled chunks of rows gets near the speed of one large read. Uses
        ``zarr.core.sync.sync``, zarr's own bridge from threads to its loop (zarr is pinned <3.2).

        ``alloc(shape, dtype)`` gives the memory of the direct reads (the loader's pool of reused
        buffers); zarr's reads allocate their own.

        Raises:
            as :meth:`read`: the first failure among the reads.
        """
        from zarr.core.sync import sync

        plan, done = [], {}
        for i, (path, start, stop) in enumerate(requests):
            sel, take = self._selection(path, start, stop, layers)
            got = self._read_direct(path, sel, alloc)
            if got is None:
                plan.append((i, self.array(path).async_array, sel, take))
            else:
                done[i] = got if take is None else got[:, take]

        async def gather() -> list[Any]:
            reads = (arr.getitem(sel) for _, arr, sel, _ in plan)
            return await asyncio.gather(*reads, return_exceptions=True)

        results = sync(gather()) if plan else []
        for (i, _, _, take), got in zip(plan, results, strict=True):
            if isinstance(got, BaseException):
                raise got
            a = np.asarray(got)
            done[i] = a if take is None else a[:, take]
        return [done[i] for i in range(len(requests))]

    def stats(self, path: str, layer: int | None = None) -> dict[str, float | int]:
        """Stats of the array at ``path`` (of one model ``layer`` of the activations) pooled over
        the finished shards: ``mean``, ``var`` and ``std`` (population, over finite values),
        ``max_abs``, ``nan_count``, ``inf_count``, ``count`` (finite values), ``shards``.

        Raises:
            ValueError: the array keeps no stats, or ``layer`` is missing/not in the cache.
            IA2Error: the ledger's stats are unusable.
        """
        spec = self.specs.get(path)
        if spec is None or not spec.stats:
            raise ValueError(f"{self.path}: array {path!r} has no stats")
        if self._has_layer_axis(spec):
            if layer is None:
                raise ValueError(f"{self.path}: array {path!r} keeps stats per layer; name the layer")
            index = self.layer_positions([layer])[0]
        else:
            index = 0
        try:
            parts = [self.ledger_entry(s).arrays[path].stats[index] for s in sorted(self.done_shards())]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise IA2Error(f"cache {self.path}: the ledger's stats of {path} are unusable "
                           f"({type(e).__name__}: {e}); run `ia2cache verify {self.path}`") from None
        if not parts:
            raise IA2Error(f"{self.path}: no finished shard holds stats for {path}")
        return Stats.pool(parts)

    def lossy_error(self) -> dict[str, dict[str, float]]:
        """Per lossy array (``--dtype int8``): the largest relative errors of its stored values
        against the teacher's, over the finished shards, from the ledger:
        ``{"max_rel_error": max|x - x̂| / max|x| (bound 1/254), "max_rel_l2_error": ||x - x̂|| / ||x||}``."""
        out: dict[str, dict[str, float]] = {}
        lossy = [p for p, s in self.specs.items() if s.logical_dtype == "int8_absmax"]
        for s in sorted(self.done_shards()):
            try:
                entry = self.ledger_entry(s)
            except (OSError, ValueError):
                continue  # verify reports it
            for p in lossy:
                rec = entry.arrays.get(p)
                if rec is None or rec.max_rel_error is None:
                    continue
                cur = out.setdefault(p, {"max_rel_error": 0.0, "max_rel_l2_error": 0.0})
                cur["max_rel_error"] = max(cur["max_rel_error"], rec.max_rel_error)
                cur["max_rel_l2_error"] = max(cur["max_rel_l2_error"], rec.max_rel_l2_error or 0.0)
        return out

    def bytes_on_disk(self) -> int:
        """Bytes of every file under the cache directory (arrays, ledger, metadata)."""
        return self.location.du()

    # ------------------------------------------------------------------ verify

    def verify(self) -> list[Damage]:
        """Check the cache as it is on disk; name the array and rows of any damage.

        Reads every byte of the cache once, in stages, each only once the ones before hold (a
        manifest or layout that cannot be trusted says nothing about rows, so nothing is sized by
        it): (1) the manifest, still the one this cache was opened with; (2) every array's
        metadata against it, rows above all; (3) the ledger holds one entry per finished shard,
        named as ia2cache names them, and nothing else, and (locally) no symlink or special file
        sits anywhere in the cache; (4) every finished shard of every array against its ledger
        entry (every chunk's sha256, read through zarr's crc32c). An intact complete cache returns
        ``[]``; a partial cache reports its missing shards. NaN/Inf values recorded in the ledger
        stats are reported too, since they poison training. Each problem says how ``collect``
        fixes it (:attr:`Damage.repair`).
        """
        try:
            fresh = load_manifest(self.location)
        except DamagedCacheError as exc:
            return exc.problems
        except IA2Error as exc:  # the folder became a link, or is no cache any more
            if is_url(self.location):
                raise  # the remote store failing is no damage
            return [Damage("manifest", (0, 0), str(exc))]
        if fresh.digest != self._manifest.digest:
            return [Damage("manifest", (0, 0), "the manifest changed on disk since this cache was "
                                                "opened: open it again")]
        problems = self._array_problems(missing_ok=False)
        if problems:
            return problems
        try:
            names = sorted(self._ledger_names())
        except IA2Error as e:
            if is_url(self.location):
                raise
            return [Damage("ledger", (0, 0), f"the ledger folder is unusable: {e}")]
        done = set()
        for name in names:
            shard = shard_of_entry(name)
            if shard is not None and shard < self.n_shards:
                done.add(shard)
            elif not JSON_TEMP_RE.fullmatch(name):  # a killed writer's temp file is no damage
                what = (f"shard {shard} lies beyond the cache's {self.n_rows} rows" if shard is not None
                        else "a name ia2cache never writes there")
                problems.append(Damage("ledger", (0, 0), f"{LEDGER_DIR}/{name} is not a ledger entry "
                                                          f"of this cache: {what}"))
        problems += self._special_file_problems(done)
        self._ledger.clear()  # read every entry afresh
        for shard in range(self.n_shards):
            problems += self._verify_shard(shard, done)
        if self.status != "complete" and not self.missing_shards():
            problems.append(Damage("*", (0, self.n_rows), "every shard is written but the cache is "
                                    "not marked complete: run the same collect again to finish it",
                                    "resume"))
        return problems

    def _verify_shard(self, shard: int, done: set[int]) -> list[Damage]:
        rows = self.shard_rows(shard)
        if shard not in done:
            if self.status == "complete":
                return [Damage("*", rows, "shard not in ledger", "recompute")]
            return [Damage("*", rows, "missing (partial cache)", "resume")]
        try:
            entry = self.ledger_entry(shard)
        except (OSError, ValueError) as e:
            return [Damage("*", rows, f"ledger entry unreadable: {e}", "recompute")]
        out = []
        for p in self.specs:
            record = entry.arrays.get(p)
            if record is None:
                out.append(Damage(p, rows, "array not in the shard's ledger entry", "recompute"))
                continue
            out += self._verify_shard_array(shard, p, record)
        return out

    def _verify_shard_array(self, shard: int, path: str, record: Any) -> list[Damage]:
        start, stop = rows = self.shard_rows(shard)
        spec = self.specs[path]
        bad_file = self.location.file_problem(self._shard_key(spec, shard))
        if bad_file is not None:
            return [Damage(path, rows, bad_file, "recompute")]
        ranges = self.chunk_ranges(start, stop)
        if len(record.chunks) != len(ranges):
            return [Damage(path, rows, "ledger entry has the wrong number of chunk checksums", "recompute")]
        problems: list[Damage] = []
        whole = check_chunk(lambda: self.read(path, start, stop), None)  # one read; narrowed below
        for (a, b), want in zip(ranges, record.chunks, strict=True):
            got = (check_chunk(lambda a=a, b=b: whole.data[a - start : b - start], want)
                   if whole.reason is None else check_chunk(lambda a=a, b=b: self.read(path, a, b), want))
            if got.reason is not None:
                problems.append(Damage(path, (a, b), got.reason if got.reason == "checksum mismatch"
                                        else f"chunk {got.reason}", "recompute"))
        if not problems and shard_digest(record.chunks) != record.sha256:
            problems.append(Damage(path, rows, "shard checksum does not match the ledger", "recompute"))
        layers = self._manifest.layers if self._has_layer_axis(spec) else ()
        for i, st in enumerate(record.stats):
            where = f" at layer {layers[i]}" if i < len(layers) else ""
            for count, what in ((st.nan_count, "NaN"), (st.inf_count, "Inf")):
                if count:
                    reason = f"{count} {what} values written by the teacher{where}"
                    problems.append(Damage(path, rows, reason))
        return problems

    @staticmethod
    def _shard_key(spec: ArraySpec, shard: int) -> str:
        """The path of ``shard``'s file inside the cache (zarr's default chunk key encoding)."""
        return "/".join([spec.path, "c", str(shard), *(["0"] * len(spec.shape))])

    def _special_file_problems(self, done: set[int]) -> list[Damage]:
        """Symlinks and special files in a local cache. One on the way to a finished shard's file
        is left to that shard's check (which names it); one elsewhere in a shard's folder
        ``<array>/c/<shard>`` makes that shard to recompute; anywhere else it is damage that
        only its removal fixes."""
        out = []
        for rel, kind in self.location.special_files():
            array, shard = self._shard_position(rel)
            if shard is None:
                out.append(Damage("files", (0, 0), f"{rel} is a {kind}, not a regular file or folder"))
                continue
            if array is None:
                continue  # a ledger entry: its shard is done, and its check reads it
            own = self._shard_key(self.specs[array], shard)
            if shard in done and (own == rel or own.startswith(rel + "/")):
                continue
            out.append(Damage(array, self.shard_rows(shard), f"{rel} is a {kind}", "recompute"))
        return out

    def _shard_position(self, rel: str) -> tuple[str | None, int | None]:
        """(array, shard) when ``rel`` lies in a shard's folder ``<array>/c/<shard>``, (None, shard)
        for a ledger entry, else (None, None)."""
        if rel.startswith(f"{LEDGER_DIR}/") and rel.count("/") == 1:
            shard = shard_of_entry(rel.split("/", 1)[1])
            return None, shard if shard is not None and shard < self.n_shards else None
        for p in self.specs:
            if rel.startswith(f"{p}/c/"):
                first = rel[len(p) + 3 :].split("/", 1)[0]
                if first.isdigit() and int(first) < self.n_shards:
                    return p, int(first)
        return None, None

    def check_rows(self, path: str, start: int, stop: int, *,
                   sha256: bool = True) -> list[tuple[int, int, str]]:
        """The damaged chunks of rows ``[start, stop)`` of ``path``, each as (first row, stop, why):
        a read failing its crc32c or its file, or (``sha256``) a checksum unlike the ledger's.
        Chunk by chunk, so that damage is named to the chunk (the loader, after a read failed)."""
        out = []
        rpc = self.rows_per_chunk
        lo, hi = start // rpc * rpc, min(-(-stop // rpc) * rpc, self.n_rows)  # whole chunks
        for a, b in self.chunk_ranges(lo, hi):
            shard = a // self.rows_per_shard
            want = None
            try:
                if sha256:
                    s0 = self.shard_rows(shard)[0]
                    want = self.ledger_entry(shard).arrays[path].chunks[(a - s0) // self.rows_per_chunk]
            except (OSError, ValueError, KeyError, IndexError) as e:
                out.append((a, b, f"the ledger entry of shard {shard} is unusable ({type(e).__name__}: {e})"))
                continue
            got = check_chunk(lambda a=a, b=b: self.read(path, a, b), want)
            if got.reason is not None:
                out.append((a, b, got.reason))
        return out


# ----------------------------------------------------------------- resolving and listing


def resolve_cache(store: str | Path | RemotePath | Location, cache: str) -> Path | RemotePath:
    """The folder of the cache named ``cache``: a key, a name under ``store``, or a path.

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
        loc = location(cache).resolve()
        if not loc.has("zarr.json"):
            raise IA2Error(f"{cache} is not an ia2cache cache (no zarr group with a manifest)")
        return loc.path
    return location(store).cache_folder(cache, is_key=bool(KEY_RE.fullmatch(cache))).path


def _is_work_folder(name: str) -> bool:
    """Folders ia2cache keeps beside caches (``ia2cache migrate``'s ``.<key>.migrating``)."""
    return name.startswith(".")


def list_caches(store: str | Path | RemotePath | Location) -> list[dict[str, Any]]:
    """The manifest of each cache under ``store``, oldest first, each with its ``"path"``.

    A cache that cannot be trusted (see :meth:`Cache.open`: a truncated or edited manifest, a
    cache filed under another key, a symlink planted as a cache folder) is listed too, as
    ``{"key": <folder name>, "status": "damaged", "path", "problems": [reason, ...]}``; a cache of
    store format 1 with its manifest and ``"format": 1`` (``ia2cache migrate`` rewrites it).
    """
    root = location(store)
    if not root.is_dir():
        return []
    out = []
    for child in root.children():
        if _is_work_folder(child.name):
            continue
        if child.is_link():
            if child.has("zarr.json"):
                out.append(_damaged_entry(child, [str(IA2Error(f"{child} is a symbolic link"))]))
            continue
        if not child.is_dir() or not child.has("zarr.json"):
            log.debug("skipping %s: not a cache", child)
            continue
        try:
            manifest = load_manifest(child)
        except DamagedCacheError as exc:
            out.append(_damaged_entry(child, [p.reason for p in exc.problems]))
            continue
        except FormatError as exc:
            raw = read_group_attrs(child)
            out.append({**raw, "format": exc.format, "path": str(child)})
            continue
        except IA2Error as exc:  # gone meanwhile
            log.debug("skipping %s: %s", child, exc)
            continue
        out.append({**manifest.to_json(), "path": str(child)})
    return sorted(out, key=lambda m: (str(m.get("created", "")), str(m.get("key", ""))))


def _damaged_entry(loc: Location, problems: list[str]) -> dict[str, Any]:
    return {"key": loc.name, "status": "damaged", "path": str(loc), "problems": problems}


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify_cache` found."""

    path: object
    status: str
    """``"partial"``, ``"complete"``, or ``"damaged"`` when the manifest or the arrays' metadata
    cannot be trusted (then nothing past them was checked)."""
    shards: int
    """Shards of the cache (0 when damaged)."""
    problems: list[Damage]
    lossy: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per lossy array, its largest relative errors against the teacher (see
    :meth:`Cache.lossy_error`); empty for bf16, fp16 and fp32 caches."""


def verify_cache(path: str | Path | RemotePath | Location) -> Verdict:
    """:meth:`Cache.verify` of the cache at ``path``, also when :meth:`Cache.open` refuses it as
    damaged: then its problems are the verdict (``ia2cache verify`` exits 1), not an error.

    Raises:
        IA2Error: ``path`` is no cache at all or is a symlink; FormatError: another store format.
    """
    try:
        cache = Cache.open(path)
    except DamagedCacheError as exc:
        return Verdict(exc.path, "damaged", 0, exc.problems)
    problems = cache.verify()
    return Verdict(cache.path, cache.status, cache.n_shards, problems, cache.lossy_error())

