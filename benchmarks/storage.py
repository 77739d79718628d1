"""Bytes on disk per stored activation value, per stored dtype and codec, on real activations.

Collects real teacher activations on the default model (task antonyms, N=16, T=1, all 30
layers, stored as fp32) into a temp store and reads them back. Then writes those same values
through the store API (``Cache.create_or_open`` + ``write_shard`` + ``finalize``, 32 rows a
shard and 8 a chunk, chunked along layers as collect does, store format 2) as bf16 / fp16 / fp32
/ int8, each with every codec (``none``: collect's choice; ``lz4``: blosc lz4, no shuffle;
``zstd``: blosc zstd level 3, byte shuffle), each into its own temp cache, and reports the bytes
of the activations (files under ``acts/``, and ``scales/`` for int8): the shard files alone
(``data_bytes``, the basis of ``bytes_per_value``) and with each array's ``zarr.json``.

Checked (the script fails otherwise): the bf16 round trip is bit exact, i.e. encode -> store ->
read -> decode equals torch's own bf16 rounding of the fp32 values, bit for bit; fp32 comes
back identical and fp16 equals torch's fp16 rounding; int8 comes back within its bound
(|x - x̂| <= max|x| / 254 of each vector), and its measured errors are reported.

zarr stores every chunk whole, so a last chunk of fewer than 8 rows takes a full chunk's bytes
(padding); N=16 gives 24 rows of train (and 16 dev) rows: 40 rows, five whole chunks.

Launch: ``python -m benchmarks.storage [--n 16]``; writes ``benchmarks/results/storage.json``
and prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.models import load_model
from ia2cache.store import (
    ACT_DTYPES,
    INT8_BOUND,
    Cache,
    cache_arrays,
    cache_key,
    decode_activations,
    dequantize,
    encode_activations,
)

SHARD_ROWS, CHUNK_ROWS = 32, 8
CODECS = ("none", "lz4", "zstd")


def read_fp32(cache: Cache) -> torch.Tensor:
    """The activations of an fp32 cache, whole: (rows, layers, P, hidden)."""
    spec = cache.specs[f"acts/{cache.manifest.site}"]
    assert spec.dtype == "float32"
    return torch.from_numpy(cache.read(spec.path, 0, cache.n_rows))


def sizes(*roots: Path) -> tuple[int, int]:
    """(shard file bytes, all file bytes) under ``roots``."""
    data = total = 0
    for root in roots:
        for d, _dirs, names in os.walk(root):
            for f in names:
                n = os.path.getsize(os.path.join(d, f))
                total += n
                data += 0 if f == "zarr.json" else n
    return data, total


def store_as(acts: torch.Tensor, dtype: str, codec: str, store: Path) -> Cache:
    """Write ``acts`` as ``dtype`` with ``codec`` into a new cache; returns it reopened for reading."""
    n_rows, n_layers, slots, hidden = acts.shape
    specs = cache_arrays(site="attn", n_layers=n_layers, slots=slots, hidden=hidden, dtype=dtype,
                         rows_per_chunk=CHUNK_ROWS, student_len=1, teacher_len=1, t=1, target_len=1, k=1,
                         topk=0)
    specs = [dataclasses.replace(specs[0], codec=codec),
             *(s for s in specs[1:] if s.path.startswith("scales/"))]
    fields = {"benchmark": "storage", "dtype": dtype, "codec": codec}
    manifest = {"key_fields": fields, "dtype": dtype, "site": "attn", "layers": list(range(n_layers))}
    cache = Cache.create_or_open(store, cache_key(fields), manifest, specs, n_rows, SHARD_ROWS, CHUNK_ROWS)
    with cache.lock():
        for shard in range(cache.n_shards):
            a, b = cache.shard_rows(shard)
            enc = encode_activations(acts[a:b], dtype)
            data = {"acts/attn": enc.values} | ({"scales/attn": enc.scales} if enc.scales is not None else {})
            lossy = enc.max_rel_error is not None
            err = {"acts/attn": (enc.max_rel_error, enc.max_rel_l2_error)} if lossy else None
            cache.write_shard(shard, data, err)
        cache.finalize()
    return Cache.open(cache.path)


def check_round_trip(acts: torch.Tensor, cache: Cache, dtype: str) -> dict[str, Any]:
    """Raise unless what comes back equals torch's rounding of the fp32 values, bit for bit (int8:
    within its bound); returns int8's measured errors."""
    got = decode_activations(cache.read("acts/attn", 0, cache.n_rows), cache.specs["acts/attn"].logical_dtype)
    if dtype == "int8":
        back = dequantize(got, torch.from_numpy(cache.read("scales/attn", 0, cache.n_rows)))
        peak = acts.abs().amax(-1, keepdim=True)
        err = (acts - back).abs()
        if not bool((err <= peak * INT8_BOUND * (1 + 1e-5)).all()):
            raise AssertionError("int8 round trip exceeds its bound")
        return cache.lossy_error()["acts/attn"]
    want_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    bits = {"bf16": torch.int16, "fp16": torch.int16, "fp32": torch.int32}[dtype]
    want = acts.to(want_dtype)
    if got.dtype != want_dtype or not torch.equal(got.view(bits), want.view(bits)):
        diff = int((got.view(bits) != want.view(bits)).sum())
        raise AssertionError(f"{dtype} round trip is not bit exact: {diff} values differ")
    return {}


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
        values = acts.numel()
        finite = bool(torch.isfinite(acts).all())
        runs = []
        for dtype in ("bf16", "fp16", "fp32", "int8"):
            for codec in CODECS:
                try:
                    cache = store_as(acts, dtype, codec, root / f"{dtype}-{codec}")
                except IA2Error as e:  # fp16 refuses values beyond its range
                    runs.append({"dtype": dtype, "codec": codec, "refused": str(e)})
                    continue
                errors = check_round_trip(acts, cache, dtype)
                data, total = sizes(cache.path / "acts", cache.path / "scales")
                itemsize = np.dtype(ACT_DTYPES[dtype].stored).itemsize
                runs.append({
                    "dtype": dtype, "codec": codec, "lossy": ACT_DTYPES[dtype].lossy, "data_bytes": data,
                    "bytes_with_metadata": total, "bytes_per_value": round(data / values, 4),
                    "bytes_per_value_with_metadata": round(total / values, 4),
                    "compression_ratio": round(values * itemsize / data, 4),
                    "round_trip": "within bound" if errors else "bit exact", **errors,
                })
                print(runs[-1], flush=True)
    write_result("storage", {
        "model": lm.info.name, "task": args.task, "n": args.n, "rows": res.rows, "shape": list(acts.shape),
        "values": values, "all_finite": finite, "max_abs": float(acts.abs().max()), "store_format": 2,
        "shard_rows": SHARD_ROWS, "chunk_rows": CHUNK_ROWS, "bf16_round_trip_bit_exact": True,
        "int8_bound": INT8_BOUND, "runs": runs,
    })


if __name__ == "__main__":
    main()
