"""The manifest: what produced a cache, its layout and its status. Frozen; two compare by a diff.

A manifest is the JSON object in the cache group's attribute ``"manifest"``. :class:`Manifest`
types the fields the store and the loader read (key, format, status, rows, shard and chunk
rows, arrays; the site, layers and dtype of the activations; the splits) and keeps the rest as
written (the model, the task, collect's settings), readable by name like a mapping.

Trust: a manifest is used only if :func:`manifest_problems` finds nothing: its layout fields are
well formed, it produces the key it is filed under (its ``key_fields`` hash to it), its readable
fields agree with its key fields, and its ``manifest_sha256`` (a checksum of its non-volatile
fields, written with every manifest) matches, so that an edit shows.

The key (:func:`cache_key`) is a hash of ``key_fields``: what determines the values (model, task,
N, k, seed, response, T, site, layers, positions, dtype, top-k, ...). The store *format* is not
part of it: the values are the same in every format, so a cache keeps its key when
``ia2cache migrate`` rewrites it, and every run record that names the key stays valid.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ia2cache.store.layout import FORMAT, ArraySpec

__all__ = [
    "VOLATILE_FIELDS",
    "Manifest",
    "ManifestError",
    "cache_key",
    "diff",
    "format_of",
    "manifest_problems",
]

VOLATILE_FIELDS: frozenset[str] = frozenset({"created", "status", "versions", "seconds", "about"})
"""Manifest fields that may differ between two runs producing the same cache."""

_KEY_SCHEMA = 1
"""Hashed into every key as ``"schema"``: the version of the key *derivation* (not of the store
format, which keys do not depend on). Changing it changes every key."""
KEY_RE = re.compile(r"[0-9a-f]{16}")
_DIGEST_FIELD = "manifest_sha256"
"""Manifest field holding a sha256 over its other non-volatile fields: a hand edit shows."""
_STATUSES = ("partial", "complete")

_KEY_FIELD_TWINS: dict[str, str] = {
    "model.tokenizer": "model.tokenizer_fingerprint",
    "task.content": "task_info.content_hash",
    "task.template": "task_info.template",
    "task.separator": "task_info.separator",
    "stop": "task_info.stop",
}
"""Key fields whose readable twin in the manifest has another name (collect's). Every other key
field is compared with the manifest field of the same dotted name, where both exist."""


def cache_key(fields: Mapping[str, Any]) -> str:
    """The cache key: the first 16 hex chars of sha256 over canonical JSON of ``fields``.

    ``fields`` is what determines the cached values (collect's ``key_fields``); the key
    derivation's version is added as ``"schema"``.
    """
    payload = {**fields, "schema": _KEY_SCHEMA}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def format_of(raw: Mapping[str, Any]) -> int | None:
    """The store format a manifest says its cache has: ``format``, or 1 for the manifests of
    format 1, which had ``"schema": 1`` and no ``format``; None when it says neither."""
    fmt = raw.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool):
        return fmt
    if "format" not in raw and raw.get("schema") == 1:
        return 1
    return None


def _jsonable(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(x))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest_of(manifest: Mapping[str, Any]) -> str:
    """sha256 over canonical JSON of the manifest's non-volatile fields (the digest field aside)."""
    body = {k: v for k, v in manifest.items() if k not in VOLATILE_FIELDS and k != _DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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


def diff(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Dotted names of the fields in ``given`` whose value differs in ``stored`` (a field absent
    from ``stored`` differs), :data:`VOLATILE_FIELDS` and the checksum aside."""

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            out: list[str] = []
            for k in sorted(b):
                if not prefix and (k in VOLATILE_FIELDS or k == _DIGEST_FIELD):
                    continue
                name = f"{prefix}{k}"
                out.extend([name] if k not in a else walk(a[k], b[k], f"{name}."))
            return out
        return [] if a == b else [prefix.rstrip(".")]

    return walk(_jsonable(dict(stored)), _jsonable(dict(given)), "")


def lookup(d: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted field name from :func:`diff` (``None`` where absent)."""
    return _find(dict(d), dotted)[1]


# --------------------------------------------------------------------------- checks


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _parse_arrays(arrays: Any) -> tuple[ArraySpec, ...]:
    """The array specs of a manifest's ``arrays`` field.

    Raises:
        ValueError, TypeError, KeyError, AttributeError: malformed.
    """
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError("manifest field arrays is missing or empty")
    specs = tuple(ArraySpec.from_dict(p, d) for p, d in arrays.items())
    check_spec_paths(specs)
    return specs


def check_spec_paths(specs: tuple[ArraySpec, ...] | list[ArraySpec]) -> None:
    """No duplicate path, and no array that is also the group of another.

    Raises:
        ValueError: naming the paths.
    """
    paths = [s.path for s in specs]
    if not paths:
        raise ValueError("a cache needs at least one array")
    if len(set(paths)) != len(paths):
        raise ValueError(f"duplicate array paths in {sorted(paths)}")
    for p in paths:
        for q in paths:
            if q.startswith(p + "/"):
                raise ValueError(f"array {p!r} cannot also be the group of {q!r}")
    for s in specs:
        if s.scales is not None and s.scales not in paths:
            raise ValueError(f"array {s.path!r} names scales {s.scales!r}, which is not an array")


def _layout_problems(m: Mapping[str, Any]) -> list[str]:
    """The fields the store itself reads: present and of the right type and range."""
    out = []
    if not isinstance(m.get("key"), str) or not KEY_RE.fullmatch(m["key"]):
        out.append(f"manifest field key is {m.get('key')!r}, not 16 lowercase hex chars")
    if m.get("status") not in _STATUSES:
        out.append(f"manifest field status is {m.get('status')!r}, not 'partial' or 'complete'")
    if m.get("format") != FORMAT:
        out.append(f"manifest field format is {m.get('format')!r}, not {FORMAT}")
    for f in ("rows", "rows_per_shard", "rows_per_chunk"):
        if not _is_count(m.get(f)):
            out.append(f"manifest field {f} is {m.get(f)!r}, not a positive integer")
    if not out and m["rows_per_shard"] % m["rows_per_chunk"]:
        out.append(f"manifest: rows_per_shard {m['rows_per_shard']} is not a multiple of "
                   f"rows_per_chunk {m['rows_per_chunk']}")
    try:
        _parse_arrays(m.get("arrays"))
    except ValueError as e:
        if "missing or empty" in str(e):
            out.append(str(e))
        else:
            out.append(f"manifest field arrays is malformed (ValueError: {e})")
    except (TypeError, KeyError, AttributeError) as e:
        out.append(f"manifest field arrays is malformed ({type(e).__name__}: {e})")
    layers = m.get("layers")
    if "layers" in m and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        out.append(f"manifest field layers is {layers!r}, not a list of layer numbers")
    if "site" in m and not isinstance(m.get("site"), str):
        out.append(f"manifest field site is {m.get('site')!r}, not a site name")
    return out


def _key_problems(m: Mapping[str, Any], folder: str | None) -> list[str]:
    """The key: the folder's name (where it is a key), the key fields' hash, and the readable
    fields that repeat a key field."""
    key = m.get("key")
    out = []
    if folder is not None and KEY_RE.fullmatch(folder) and folder != key:
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
        present, have = _find(dict(m), twin)
        if present and not isinstance(have, dict) and _jsonable(have) != want:
            out.append(f"manifest field {twin} is {have!r} but key_fields.{name} is {want!r}")
    return out


def manifest_problems(manifest: Any, folder: str | None = None) -> list[str]:
    """Why the manifest JSON ``manifest`` cannot be trusted, one line each; ``[]`` if it can.

    Checks, without reading array data: the layout fields (key, format, status, rows, rows per
    shard and chunk, arrays) are well formed; a ``folder`` named like a key is the manifest's key;
    the ``key_fields`` (where present) hash to the key and agree with every readable field that
    repeats one; the manifest's checksum matches its non-volatile fields, so an edit of any of them
    (task or model name, rows) shows.
    """
    if not isinstance(manifest, dict):
        return ["the manifest is not a JSON object"]
    out = _layout_problems(manifest) + _key_problems(manifest, folder)
    stored = manifest.get(_DIGEST_FIELD)
    if stored is not None and stored != _digest_of(manifest):
        out.append(f"the manifest was edited after it was written (its {_DIGEST_FIELD} does not "
                   "match its fields)")
    return out


class ManifestError(ValueError):
    """A manifest that :func:`manifest_problems` refuses; ``problems`` says why."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Manifest(Mapping[str, Any]):
    """A cache's manifest: the typed fields the store reads, and every field by name.

    Build one with :meth:`new` (a new cache) or :meth:`from_json` (one read from disk); change
    the status or add fields with :meth:`updated`, which returns a new manifest.
    """

    key: str
    format: int
    status: str
    """``"partial"`` or ``"complete"``."""
    rows: int
    rows_per_shard: int
    rows_per_chunk: int
    arrays: tuple[ArraySpec, ...]
    created: str
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)
    """Every field as written (JSON), the ones above included."""

    # ------------------------------------------------------------------ making

    @classmethod
    def new(cls, key: str, fields: Mapping[str, Any], specs: list[ArraySpec], rows: int,
            rows_per_shard: int, rows_per_chunk: int) -> Manifest:
        """The manifest of a new (partial) cache: ``fields`` (what produced it) plus the layout.

        Raises:
            ManifestError: the result would not pass :func:`manifest_problems`.
        """
        raw = _jsonable({
            **fields, "key": key, "format": FORMAT, "status": "partial", "rows": rows,
            "rows_per_shard": rows_per_shard, "rows_per_chunk": rows_per_chunk,
            "arrays": {s.path: s.to_dict() for s in specs}, "created": fields.get("created") or _now(),
        })
        raw.pop("schema", None)
        return cls.from_json(raw, seal=True)

    @classmethod
    def from_json(cls, raw: Any, folder: str | None = None, *, seal: bool = False) -> Manifest:
        """A manifest from its JSON, once :func:`manifest_problems` finds nothing.

        Args:
            raw: the JSON object.
            folder: the name of the folder it was read from (must be its key, if named like one).
            seal: (re)compute its checksum first (a manifest being written, not read).

        Raises:
            ManifestError: naming every problem.
        """
        if isinstance(raw, dict) and seal:
            raw = {**raw, _DIGEST_FIELD: _digest_of(raw)}
        problems = manifest_problems(raw, folder)
        if problems:
            raise ManifestError(problems)
        raw = _jsonable(raw)
        return cls(key=raw["key"], format=raw["format"], status=raw["status"], rows=raw["rows"],
                   rows_per_shard=raw["rows_per_shard"], rows_per_chunk=raw["rows_per_chunk"],
                   arrays=_parse_arrays(raw["arrays"]), created=str(raw.get("created", "")), raw=raw)

    def updated(self, **fields: Any) -> Manifest:
        """A copy with ``fields`` set (``status="complete"``, ``seconds=...``), sealed anew."""
        raw = {**copy.deepcopy(dict(self.raw)), **_jsonable(fields)}
        return self.from_json(raw, seal=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk (a copy), checksum included."""
        return copy.deepcopy(dict(self.raw))

    # ------------------------------------------------------------------ reading

    def __getitem__(self, name: str) -> Any:
        value = self.raw[name]
        return copy.deepcopy(value) if isinstance(value, dict | list) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def specs(self) -> dict[str, ArraySpec]:
        """The arrays by path."""
        return {s.path: s for s in self.arrays}

    @property
    def digest(self) -> str:
        """The checksum of the non-volatile fields."""
        return _digest_of(self.raw)

    @property
    def site(self) -> str | None:
        """The activation site (``attn``, ``resid``, ...); None in a cache with no activations."""
        site = self.raw.get("site")
        return site if isinstance(site, str) else None

    @property
    def layers(self) -> tuple[int, ...]:
        """The model layers stored, in the order of the activations' layer axis."""
        return tuple(self.raw.get("layers") or ())

    @property
    def dtype(self) -> str | None:
        """The activations' ``--dtype`` (``bf16``, ``fp16``, ``fp32``, ``int8``)."""
        d = self.raw.get("dtype")
        return d if isinstance(d, str) else None

    @property
    def split(self) -> str:
        """``train`` (train, dev and unlabelled rows, for distill) or ``eval`` (for analyze)."""
        return str(self.raw.get("split", "train"))

    def count(self, name: str) -> int | None:
        """An integer field such as ``n_train`` or ``n_dev``; None where absent or not an int."""
        x = self.raw.get(name)
        return x if isinstance(x, int) and not isinstance(x, bool) else None

    def diff(self, other: Mapping[str, Any]) -> list[str]:
        """The fields of ``other`` whose value differs here (see :func:`diff`)."""
        return diff(self.raw, other)
