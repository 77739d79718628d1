"""Bytes on disk per stored activation value, per stored dtype and compression, on real activations.

Collects real teacher activations on the default model (task antonyms, N=16, T=1, all 30
layers, stored as fp32) into a temp store and reads them back. Then writes those same values
through the store API (``Cache.create_or_open`` + ``write_shard`` + ``finalize``, 32 rows a
shard and 8 a chunk, as collect does) as bf16 / fp16 / fp32, each with ``compress`` True (Blosc
zstd level 3, byte shuffle) and False, each into its own temp cache, and reports the bytes of
the activation arrays (files under ``acts/``): the shard files alone (``data_bytes``, the
basis of ``bytes_per_value``) and with each array's ``zarr.json`` (``bytes_with_metadata``).

Checked (the script fails otherwise): the bf16 round trip is bit exact, i.e. encode -> store ->
read -> decode equals torch's own bf16 rounding of the fp32 values, bit for bit; fp32 comes
back identical and fp16 equals torch's fp16 rounding.

zarr stores every chunk whole, so a last chunk of fewer than 8 rows takes a full chunk's bytes
(padding); N=16 gives 24 rows, three whole chunks, and no padding.

For reference (README): ~2 bytes a value in bf16, and activations barely compress.

Launch: ``python -m benchmarks.storage [--n 16]``; writes ``benchmarks/results/storage.json``
and prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.models import load_model
from ia2cache.store import (
    ACTIVATION_DTYPES,
    ArraySpec,
    Cache,
    cache_key,
    decode_activations,
    encode_activations,
)

SHARD_ROWS, CHUNK_ROWS = 32, 8


def read_fp32(cache: Cache) -> dict[str, torch.Tensor]:
    """Every activation array of an fp32 cache, whole."""
    out = {}
    for path, spec in cache.specs.items():
        if path.startswith("acts/"):
            assert spec.dtype == "float32"
            out[path] = torch.from_numpy(cache.read(path, 0, cache.n_rows))
    return out


def sizes(root: Path) -> tuple[int, int]:
    """(shard file bytes, all file bytes) under ``root``."""
    data = total = 0
    for d, _dirs, names in os.walk(root):
        for f in names:
            n = os.path.getsize(os.path.join(d, f))
            total += n
            data += 0 if f == "zarr.json" else n
    return data, total


def store_as(acts: dict[str, torch.Tensor], dtype: str, compress: bool, store: Path) -> Cache:
    """Write ``acts`` as ``dtype`` into a new cache; returns it reopened for reading."""
    stored, logical = ACTIVATION_DTYPES[dtype]
    n_rows = next(iter(acts.values())).shape[0]
    specs = [ArraySpec(p, tuple(a.shape[1:]), stored, logical, stats=True, compress=compress)
             for p, a in acts.items()]
    fields = {"benchmark": "storage", "dtype": dtype, "compress": compress}
    manifest = {"dtype": dtype, "compress": compress, "n_train": n_rows, "n_dev": 0}
    cache = Cache.create_or_open(store, cache_key(fields), manifest, specs, n_rows, SHARD_ROWS, CHUNK_ROWS)
    with cache.lock():
        for shard in range(cache.n_shards):
            a, b = cache.shard_rows(shard)
            cache.write_shard(shard, {p: encode_activations(x[a:b], dtype) for p, x in acts.items()})
        cache.finalize()
    return Cache.open(cache.path)


def check_round_trip(acts: dict[str, torch.Tensor], cache: Cache, dtype: str) -> None:
    """Raise unless what comes back equals torch's rounding of the fp32 values, bit for bit."""
    want_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    bits = {"bf16": torch.int16, "fp16": torch.int16, "fp32": torch.int32}[dtype]
    for p, x in acts.items():
        got = decode_activations(cache.read(p, 0, cache.n_rows), cache.specs[p].logical_dtype)
        want = x.to(want_dtype)
        if got.dtype != want_dtype or not torch.equal(got.view(bits), want.view(bits)):
            diff = int((got.view(bits) != want.view(bits)).sum())
            raise AssertionError(f"{dtype} round trip of {p} is not bit exact: {diff} values differ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    lm = load_model("default")
    with tempfile.TemporaryDirectory(prefix="ia2-storage-") as tmp:
        root = Path(tmp)
        res = collect(CollectConfig(task=args.task, n=args.n, max_new_tokens=1, dtype="fp32",
                                    store=str(root / "fp32-source")), lm)
        acts = read_fp32(Cache.open(res.cache))
        values = sum(x.numel() for x in acts.values())
        shape = list(next(iter(acts.values())).shape)
        finite = all(bool(torch.isfinite(x).all()) for x in acts.values())
        max_abs = max(float(x.abs().max()) for x in acts.values())
        runs = []
        for dtype in ("bf16", "fp16", "fp32"):
            for compress in (True, False):
                try:
                    cache = store_as(acts, dtype, compress, root / f"{dtype}-{int(compress)}")
                except IA2Error as e:  # fp16 refuses values beyond its range
                    runs.append({"dtype": dtype, "compress": compress, "refused": str(e)})
                    continue
                check_round_trip(acts, cache, dtype)
                data, total = sizes(cache.path / "acts")
                itemsize = np.dtype(ACTIVATION_DTYPES[dtype][0]).itemsize
                runs.append({
                    "dtype": dtype, "compress": compress, "data_bytes": data, "bytes_with_metadata": total,
                    "bytes_per_value": round(data / values, 4),
                    "bytes_per_value_with_metadata": round(total / values, 4),
                    "compression_ratio": round(values * itemsize / data, 4),
                    "round_trip": "bit exact",
                })
                print(runs[-1], flush=True)
    write_result("storage", {
        "model": lm.info.name, "task": args.task, "n": args.n, "rows": res.rows, "arrays": len(acts),
        "array_shape": shape, "values": values, "all_finite": finite, "max_abs": max_abs,
        "shard_rows": SHARD_ROWS, "chunk_rows": CHUNK_ROWS, "bf16_round_trip_bit_exact": True, "runs": runs,
    })


if __name__ == "__main__":
    main()
