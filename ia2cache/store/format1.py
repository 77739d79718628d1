"""``ia2cache migrate KEY``: rewrite a cache of store format 1 as format 2, in place, atomically.

Format 1 kept one array per layer (``acts/<site>/layer_NNN``, shape (rows, P, hidden), blosc-zstd,
no crc32c codec); format 2 keeps one per site (``acts/<site>``, (rows, layers, P, hidden)). The
key does not change (it never depended on the format), so every run record that names the cache
stays valid.

How, under the cache's lock:

1. every finished shard of the format-1 cache is read and checked against its ledger's sha256;
   a damaged shard is left out (the format-2 cache is then partial, and ``ia2cache collect``
   recomputes exactly those shards);
2. the format-2 cache is written beside it, in ``<store>/.<key>.migrating``, shard by shard through
   the ordinary writer (new ledger entries, crc32c on every chunk), with the same manifest fields
   (key fields, model, task, micro-batch size) so that ``collect`` resumes it as its own;
3. it is verified: ``verify`` finds nothing, and every array of every shard equals the format-1
   values bit for bit;
4. the two folders are swapped in one atomic ``renameat2(RENAME_EXCHANGE)``; the format-1 one is
   deleted.

A kill at any point leaves ``<store>/<key>`` holding either the whole format-1 cache, untouched,
or the whole verified format-2 one; a rerun removes what the killed run left beside it and starts
again (or says the cache is already format 2). Object stores cannot swap prefixes atomically:
there migrate refuses, and says how to do it through a local copy.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ia2cache._faults import fault_point
from ia2cache.errors import IA2Error
from ia2cache.store.cache import (
    MAX_LEDGER_BYTES,
    Cache,
    Damage,
    DamagedCacheError,
    read_group_attrs,
)
from ia2cache.store.layout import (
    DEMO_INDEX,
    FORMAT,
    LEDGER_DIR,
    LOCK_FILE,
    RESPONSE_IDS,
    STUDENT_IDS,
    TARGET_IDS,
    TEACHER_IDS,
    TOPK_VALUES,
    act_path,
    cache_arrays,
    how_to_read,
    ledger_name,
    shard_of_entry,
)
from ia2cache.store.ledger import DAMAGE_ERRORS, digest
from ia2cache.store.locations import Location, RemotePath, location
from ia2cache.store.manifest import _digest_of, _key_problems, format_of

__all__ = ["MigrateResult", "migrate"]

log = logging.getLogger(__name__)

_V1_FIELDS_DROPPED = frozenset({"schema", "arrays", "manifest_sha256", "how_to_read", "key", "status",
                                "rows", "rows_per_shard", "rows_per_chunk", "format"})
"""Format-1 manifest fields the format-2 writer sets itself."""


@dataclass(frozen=True)
class MigrateResult:
    """What ``ia2cache migrate`` did."""

    cache: str
    key: str
    migrated: bool
    """False when the cache already had format 2 (nothing was done)."""
    from_format: int
    to_format: int
    status: str
    """The format-2 cache's status: complete, or partial (format-1 shards missing or damaged)."""
    rows: int
    shards_migrated: int
    shards_left: list[int] = field(default_factory=list)
    """Shards a later ``ia2cache collect`` computes: missing in the format-1 cache, or damaged."""
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _v1_problems(raw: dict[str, Any], folder: str) -> list[str]:
    """Why a format-1 manifest cannot be trusted (its key and checksum), ``[]`` if it can."""
    out = []
    for f in ("key", "site", "layers", "dtype", "arrays", "rows", "rows_per_shard", "rows_per_chunk"):
        if f not in raw:
            out.append(f"the format-1 manifest has no field {f}")
    if out:
        return out
    out += _key_problems(raw, folder)
    stored = raw.get("manifest_sha256")
    if stored is not None and stored != _digest_of(raw):
        out.append("the manifest was edited after it was written (its manifest_sha256 does not match)")
    return out


class _Format1:
    """Read access to a format-1 cache: its manifest, ledger and per-layer arrays."""

    def __init__(self, loc: Location, raw: dict[str, Any]) -> None:
        self.loc, self.raw = loc, raw
        self.key: str = raw["key"]
        self.rows: int = int(raw["rows"])
        self.rows_per_shard: int = int(raw["rows_per_shard"])
        self.rows_per_chunk: int = int(raw["rows_per_chunk"])
        self.site: str = raw["site"]
        self.layers: list[int] = [int(i) for i in raw["layers"]]
        self.arrays: dict[str, dict[str, Any]] = raw["arrays"]
        self.group = zarr.open_group(store=loc.zarr_store(read_only=True), mode="r", zarr_format=3)
        self.n_shards = -(-self.rows // self.rows_per_shard)

    def layer_path(self, layer: int) -> str:
        return f"acts/{self.site}/layer_{layer:03d}"

    def done_shards(self) -> list[int]:
        names = self.loc.listdir(LEDGER_DIR)
        return sorted(s for s in map(shard_of_entry, names) if s is not None and s < self.n_shards)

    def shard(self, shard: int) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """Every array's rows of ``shard``, checked against the format-1 ledger; (None, why) when
        the shard is damaged."""
        start = shard * self.rows_per_shard
        stop = min(start + self.rows_per_shard, self.rows)
        try:
            entry = json.loads(self.loc.read(f"{LEDGER_DIR}/{ledger_name(shard)}", MAX_LEDGER_BYTES))
            infos = entry["arrays"]
            if entry.get("rows") != [start, stop]:
                return None, f"its ledger entry says rows {entry.get('rows')!r}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"its ledger entry is unusable ({type(e).__name__}: {e})"
        out: dict[str, np.ndarray] = {}
        for p in self.arrays:
            try:
                a = np.ascontiguousarray(self.group[p][start:stop])
            except OSError:
                raise
            except DAMAGE_ERRORS as e:
                return None, f"array {p} is unreadable ({type(e).__name__}: {e})"
            info = infos.get(p) if isinstance(infos, dict) else None
            chunks = info.get("chunks") if isinstance(info, dict) else None
            ranges = range(0, stop - start, self.rows_per_chunk)
            if not isinstance(chunks, list) or len(chunks) != len(ranges):
                return None, f"the ledger has no chunk checksums of {p}"
            for i, want in zip(ranges, chunks, strict=True):
                if digest(a[i : i + self.rows_per_chunk]) != want:
                    return None, f"array {p} rows {start + i}.. do not match their checksum"
            out[p] = a
        return out, None


def _v2_arrays(old: _Format1) -> list[Any]:
    """The format-2 arrays ``collect`` makes for the same cache (so that it resumes this one)."""

    def width(path: str) -> int:
        return int(old.arrays[path]["shape"][0])

    first = old.arrays[old.layer_path(old.layers[0])]
    slots, hidden = (int(d) for d in first["shape"])
    topk = old.arrays.get(TOPK_VALUES)
    return cache_arrays(site=old.site, n_layers=len(old.layers), slots=slots, hidden=hidden,
                        dtype=old.raw["dtype"], rows_per_chunk=old.rows_per_chunk,
                        student_len=width(STUDENT_IDS), teacher_len=width(TEACHER_IDS), t=width(RESPONSE_IDS),
                        target_len=width(TARGET_IDS), k=width(DEMO_INDEX),
                        topk=int(topk["shape"][1]) if topk else 0)


def _v2_data(old: _Format1, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    acts = [old.layer_path(i) for i in old.layers]
    out = {p: a for p, a in data.items() if p not in acts}
    out[act_path(old.site)] = np.ascontiguousarray(np.stack([data[p] for p in acts], axis=1))
    return out


def _equal_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def migrate(path: str | Path | RemotePath | Location) -> MigrateResult:
    """Rewrite the format-1 cache at ``path`` as format 2, in place (see the module docstring).

    Returns:
        What was done; ``migrated`` is False for a cache that already has format 2.

    Raises:
        IA2Error: not a cache, on an object store, locked by a writer, damaged beyond shards (its
            manifest), or the migrated values would differ (nothing is swapped then).
    """
    t0 = time.perf_counter()
    src = location(path)
    raw = read_group_attrs(src)
    fmt = format_of(raw)
    work = src.parent / f".{src.name}.migrating"
    if fmt == FORMAT:
        cache = Cache.open(src)
        work.remove_tree()  # a killed migrate's copy of the old cache, after the swap
        return MigrateResult(str(src), cache.key, False, FORMAT, FORMAT, cache.status, cache.n_rows, 0)
    if fmt != 1:
        raise IA2Error(f"{src}: store format {fmt!r} is not one `ia2cache migrate` rewrites (format 1)")
    problems = _v1_problems(raw, src.name)
    if problems:
        raise DamagedCacheError(src, [Damage("manifest", (0, 0), p) for p in problems])
    if not src.can_swap:
        src.exchange(work)  # raises, saying how to migrate a remote cache
    with src.lock(LOCK_FILE):
        work.remove_tree()  # what a killed migrate left
        old = _Format1(src, raw)
        before = src.du()
        specs = _v2_arrays(old)
        fields = {k: v for k, v in raw.items() if k not in _V1_FIELDS_DROPPED}
        fields["how_to_read"] = how_to_read(old.site, raw["dtype"], raw.get("split", "train"))
        fields["about"] = {**(raw.get("about") or {}), "migrated_from_format": 1}
        new = Cache.create_at(work, old.key, fields, specs, old.rows, old.rows_per_shard, old.rows_per_chunk)
        done = old.done_shards()
        left = sorted(set(range(old.n_shards)) - set(done))
        moved = []
        for shard in done:
            data, why = old.shard(shard)
            if data is None:
                log.warning("cache %s: shard %d is damaged (%s); left for `ia2cache collect` to recompute",
                            src, shard, why)
                left.append(shard)
                continue
            new.write_shard(shard, _v2_data(old, data))
            moved.append(shard)
            fault_point("migrate.shard")
        left.sort()
        if not left and raw.get("status") == "complete":
            extra = {k: raw[k] for k in ("seconds",) if k in raw}
            new.finalize(extra)
        _check(old, Cache.open(work), moved)
        fault_point("migrate.before_swap")
        src.exchange(work)
        fault_point("migrate.after_swap")
        work.remove_tree()
    cache = Cache.open(src)
    return MigrateResult(str(src), cache.key, True, 1, FORMAT, cache.status, cache.n_rows, len(moved), left,
                         before, cache.bytes_on_disk(), round(time.perf_counter() - t0, 3))


def _check(old: _Format1, new: Cache, shards: list[int]) -> None:
    """Refuse to swap unless the new cache verifies and holds the old values bit for bit."""
    problems = [p for p in new.verify() if p.repair != "resume"]
    if problems:
        raise IA2Error(f"the format-2 copy of {old.loc} does not verify ({problems[0].array} rows "
                       f"{problems[0].rows}: {problems[0].reason}); the format-1 cache is untouched")
    acts = act_path(old.site)
    for shard in shards:
        a, b = new.shard_rows(shard)
        data, _ = old.shard(shard)
        assert data is not None
        for p, want in _v2_data(old, data).items():
            if not _equal_bits(new.read(p, a, b), want):
                raise IA2Error(f"the format-2 copy of {old.loc} differs from it in {p} rows [{a}, {b}); "
                               "the format-1 cache is untouched")
        for j, layer in enumerate(old.layers):  # and each layer where it was
            if not _equal_bits(new.read(acts, a, b, layers=[layer])[:, 0], data[old.layer_path(layer)]):
                raise IA2Error(f"the format-2 copy of {old.loc} differs in layer {layer} (axis {j}); "
                               "the format-1 cache is untouched")
