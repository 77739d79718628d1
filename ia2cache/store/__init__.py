"""The store: one content-addressed, resumable, verifiable zarr v3 group per cache.

Named by noun (DESIGN.md, "Name the parts of the store by noun"), each module small:

- :mod:`~ia2cache.store.layout`: the bytes. Every array path, dtype and codec, in one place
  (``acts/<site>`` is one array (rows, layers, P, hidden)), activation encoding (bf16 bit exact,
  lossy int8 with per-vector scales), and :func:`default_store`;
- :mod:`~ia2cache.store.manifest`: what produced a cache (:class:`Manifest`, frozen), the key
  derivation (:func:`cache_key`) and the checks that make a manifest trusted;
- :mod:`~ia2cache.store.ledger`: what is finished (:class:`LedgerEntry` per shard) and the one
  chunk check (:func:`check_chunk`) that ``verify`` and the loader share;
- :mod:`~ia2cache.store.cache`: the store plus its ledger and manifest (:class:`Cache`: open,
  create or resume, write, finalize, read, verify, repair);
- :mod:`~ia2cache.store.lock`: the writer's lock, local (``fcntl``) and remote (conditional PUT);
- :mod:`~ia2cache.store.locations`: one :class:`Location` type for local folders and fsspec URLs;
- :mod:`~ia2cache.store.format1`: ``ia2cache migrate`` from store format 1.

This package knows nothing about models (``.importlinter``): collect decides what goes in.
"""

from ia2cache.store.cache import (
    Cache,
    Damage,
    DamagedCacheError,
    FormatError,
    Verdict,
    list_caches,
    resolve_cache,
    verify_cache,
)
from ia2cache.store.format1 import MigrateResult, migrate
from ia2cache.store.layout import (
    ACT_DTYPES,
    FORMAT,
    INT8_BOUND,
    ActDtype,
    ArraySpec,
    Encoded,
    act_path,
    cache_arrays,
    decode_activations,
    default_store,
    dequantize,
    encode_activations,
    how_to_read,
    logical_values,
    scale_path,
)
from ia2cache.store.ledger import ArrayRecord, LedgerEntry, Stats, check_chunk, digest
from ia2cache.store.locations import (
    Location,
    RemotePath,
    is_remote_failure,
    is_url,
    location,
    remote_failure_message,
)
from ia2cache.store.manifest import VOLATILE_FIELDS, Manifest, cache_key, manifest_problems

__all__ = [
    "ACT_DTYPES",
    "FORMAT",
    "INT8_BOUND",
    "VOLATILE_FIELDS",
    "ActDtype",
    "ArrayRecord",
    "ArraySpec",
    "Cache",
    "DamagedCacheError",
    "Encoded",
    "FormatError",
    "LedgerEntry",
    "Location",
    "Manifest",
    "MigrateResult",
    "Damage",
    "RemotePath",
    "Stats",
    "Verdict",
    "act_path",
    "cache_arrays",
    "cache_key",
    "check_chunk",
    "decode_activations",
    "default_store",
    "dequantize",
    "digest",
    "encode_activations",
    "how_to_read",
    "is_remote_failure",
    "is_url",
    "list_caches",
    "location",
    "logical_values",
    "manifest_problems",
    "migrate",
    "remote_failure_message",
    "resolve_cache",
    "scale_path",
    "verify_cache",
]
