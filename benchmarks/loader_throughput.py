"""CacheLoader throughput against a raw read of the same bytes, on a synthetic cache of >= 1 GB.

The synthetic cache is written through the store API (``Cache.create_or_open`` +
``write_shard`` + ``finalize``) with the arrays and manifest of a real cache of the default
model at T=8: 30 layers ``acts/attn/layer_NNN`` of shape (rows, 8, 576), uint16 holding
bfloat16 bits, uncompressed, 32 rows a shard and 8 a chunk, plus the ``tokens/`` and ``rows/``
arrays collect writes. Every row is a train row (n_dev = 0), so one train epoch reads exactly
the activation bytes on disk.

Timed, both warm (the page cache holds the files; an untimed raw pass comes first), in the
order raw, loader, raw, loader (``--repeats`` pairs), min of each:

- **raw**: ``f.read`` of every shard file of the activation arrays (every file under each
  array's directory except ``zarr.json``), into preallocated memory;
- **loader**: one epoch of ``CacheLoader`` over the train split (batch 32, shuffle on, the
  float32 training dtype that distill uses), opening the loader included.

Reported: GB/s of both (activation bytes as stored / seconds), ratio = loader / raw seconds
(target <= 1.5), and the loader's ``wait_seconds`` (the time its consumer blocked on data).
The synthetic cache is deleted at the end unless ``--keep``.

Launch: ``python -m benchmarks.loader_throughput [--size default|large] [--gb 1.0]``
(``--gb 0.05`` for a smoke test); writes ``benchmarks/results/loader_throughput.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import write_result
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.store import ArraySpec, Cache, cache_key

TARGET = 1.5
LAYERS, T, HIDDEN = 30, 8, 576
SITE = "attn"
SHARD_ROWS, CHUNK_ROWS = 32, 8
STUDENT_LEN, TEACHER_LEN, TARGET_LEN, K = 12, 160, 4, 8
SIZES = {"default": 1.0, "large": 4.0}


def _act_path(layer: int) -> str:
    return f"acts/{SITE}/layer_{layer:03d}"


def specs() -> list[ArraySpec]:
    """The arrays of a real cache (see ``ia2cache.collect._array_specs``), activations uncompressed."""
    out = [ArraySpec(_act_path(i), (T, HIDDEN), "uint16", "bfloat16", stats=True, compress=False)
           for i in range(LAYERS)]
    out += [
        ArraySpec("tokens/student_ids", (STUDENT_LEN,), "int32"),
        ArraySpec("tokens/student_len", (), "int32"),
        ArraySpec("tokens/teacher_ids", (TEACHER_LEN,), "int32"),
        ArraySpec("tokens/teacher_len", (), "int32"),
        ArraySpec("tokens/response_ids", (T,), "int32"),
        ArraySpec("tokens/response_len", (), "int32"),
        ArraySpec("tokens/target_ids", (TARGET_LEN,), "int32"),
        ArraySpec("tokens/target_len", (), "int32"),
        ArraySpec("tokens/teacher_positions", (T,), "int32"),
        ArraySpec("tokens/student_positions", (T,), "int32"),
        ArraySpec("tokens/positions_len", (), "int32"),
        ArraySpec("rows/example_index", (), "int32"),
        ArraySpec("rows/demo_index", (K,), "int32"),
        ArraySpec("rows/split", (), "uint8"),
    ]
    return out


def manifest(n_rows: int) -> dict:
    """What the loader reads (model fingerprints, site, layers, splits, T, slots) and collect writes."""
    key_fields = {"synthetic": "loader_throughput", "rows": n_rows, "layers": list(range(LAYERS)), "t": T}
    return {
        "model": {"name": "synthetic", "fingerprint": "0" * 16, "tokenizer_fingerprint": "0" * 16,
                  "layers_total": LAYERS, "hidden_size": HIDDEN},
        "task": "synthetic", "n": n_rows, "k": K, "seed": 0, "n_train": n_rows, "n_dev": 0,
        "response": "icl", "max_new_tokens": T, "site": SITE, "layers": list(range(LAYERS)),
        "positions": "response", "position_slots": T, "dtype": "bf16", "topk_logits": 0,
        "key_fields": key_fields, "splits": {"0": "train", "1": "dev"}, "pad": -1,
        "about": {"batch_size": 8, "model_spec": "synthetic", "task_spec": "synthetic"},
    }


def _shard_data(rng: np.random.Generator, a: int, b: int) -> dict[str, np.ndarray]:
    n = b - a
    data: dict[str, np.ndarray] = {}
    acts = torch.from_numpy(rng.standard_normal((LAYERS, n, T, HIDDEN), dtype=np.float32))
    bits = acts.to(torch.bfloat16).view(torch.uint16).numpy()
    for i in range(LAYERS):
        data[_act_path(i)] = np.ascontiguousarray(bits[i])
    steps = np.arange(T, dtype=np.int32)
    data["tokens/student_ids"] = rng.integers(1, 49152, (n, STUDENT_LEN), dtype=np.int32)
    data["tokens/student_len"] = np.full(n, STUDENT_LEN, np.int32)
    data["tokens/teacher_ids"] = rng.integers(1, 49152, (n, TEACHER_LEN), dtype=np.int32)
    data["tokens/teacher_len"] = np.full(n, TEACHER_LEN, np.int32)
    data["tokens/response_ids"] = rng.integers(1, 49152, (n, T), dtype=np.int32)
    data["tokens/response_len"] = np.full(n, T, np.int32)
    data["tokens/target_ids"] = rng.integers(1, 49152, (n, TARGET_LEN), dtype=np.int32)
    data["tokens/target_len"] = np.full(n, TARGET_LEN, np.int32)
    data["tokens/teacher_positions"] = np.tile(TEACHER_LEN - 1 + steps, (n, 1))
    data["tokens/student_positions"] = np.tile(STUDENT_LEN - 1 + steps, (n, 1))
    data["tokens/positions_len"] = np.full(n, T, np.int32)
    data["rows/example_index"] = np.arange(a, b, dtype=np.int32)
    data["rows/demo_index"] = rng.integers(0, 1 << 15, (n, K), dtype=np.int32)
    data["rows/split"] = np.zeros(n, np.uint8)
    return data


def write_cache(store: Path, gb: float) -> Cache:
    """A complete synthetic cache whose activation arrays hold at least ``gb`` * 1e9 bytes."""
    row_bytes = LAYERS * T * HIDDEN * 2
    n_rows = math.ceil(gb * 1e9 / row_bytes / SHARD_ROWS) * SHARD_ROWS
    m = manifest(n_rows)
    key = cache_key(m["key_fields"])
    cache = Cache.create_or_open(store, key, m, specs(), n_rows, SHARD_ROWS, CHUNK_ROWS)
    rng = np.random.default_rng(0)
    with cache.lock():
        for shard in range(cache.n_shards):
            cache.write_shard(shard, _shard_data(rng, *cache.shard_rows(shard)))
        cache.finalize()
    return Cache.open(cache.path)


def act_files(cache: Cache) -> list[Path]:
    """Every shard file of the activation arrays (all files under each array dir but zarr.json)."""
    files: list[Path] = []
    for i in range(LAYERS):
        for root, _dirs, names in os.walk(cache.path / _act_path(i)):
            files += [Path(root) / f for f in names if f != "zarr.json"]
    return sorted(files)


def raw_read(files: list[Path], buf: bytearray) -> int:
    """Read every file into ``buf`` (reused); returns the bytes read."""
    view, total = memoryview(buf), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            total += fh.readinto(view)
    return total


def loader_epoch(
    cache: Cache, batch_size: int, read_rows: int | None = None
) -> tuple[float, CacheLoader, int]:
    t0 = time.perf_counter()
    config = LoaderConfig(batch_size=batch_size, shuffle=True, split="train", read_rows=read_rows)
    loader = CacheLoader(cache.path, config)
    rows = 0
    for batch in loader:
        rows += len(batch.rows)
    return time.perf_counter() - t0, loader, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("--gb", type=float, default=None, help="activation GB to write (overrides --size)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="raw/loader pairs; the min of each is kept")
    ap.add_argument("--dir", default=None, help="parent directory of the synthetic cache (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic cache")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    gb = args.gb if args.gb is not None else SIZES[args.size]
    tmp = Path(tempfile.mkdtemp(prefix="ia2-loader-bench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        cache = write_cache(tmp, gb)
        write_s = time.perf_counter() - t0
        files = act_files(cache)
        file_bytes = sum(f.stat().st_size for f in files)
        buf = bytearray(max(f.stat().st_size for f in files))
        raw_read(files, buf)  # warm-up: both timed sides read from the page cache
        raw_s, loader_s, waits, shard_s = [], [], [], []
        bytes_read = rows = 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            raw_read(files, buf)
            raw_s.append(time.perf_counter() - t0)
            s, loader, rows = loader_epoch(cache, args.batch_size)
            loader_s.append(s)
            waits.append(loader.wait_seconds)
            bytes_read = loader.bytes_read
            # The same epoch with whole shards as the read and permutation unit.
            shard_s.append(loader_epoch(cache, args.batch_size, read_rows=SHARD_ROWS)[0])
        raw, ours, ours_shard = min(raw_s), min(loader_s), min(shard_s)
        act_bytes = cache.n_rows * LAYERS * T * HIDDEN * 2
        write_result("loader_throughput", {
            "gb_requested": gb, "rows": cache.n_rows, "rows_per_epoch": rows, "layers": LAYERS, "t": T,
            "hidden": HIDDEN, "shard_rows": SHARD_ROWS, "chunk_rows": CHUNK_ROWS,
            "batch_size": args.batch_size, "loader_dtype": "float32", "shuffle": True,
            "activation_bytes": act_bytes, "activation_file_bytes": file_bytes,
            "loader_bytes_read": bytes_read, "files": len(files), "write_seconds": round(write_s, 2),
            "raw_seconds": [round(x, 4) for x in raw_s], "loader_seconds": [round(x, 4) for x in loader_s],
            "raw_gb_per_s": round(file_bytes / raw / 1e9, 3),
            "loader_gb_per_s": round(bytes_read / ours / 1e9, 3),
            "ratio": round(ours / raw, 3), "target": TARGET, "meets_target": ours / raw <= TARGET,
            "loader_read_rows_shard_seconds": [round(x, 4) for x in shard_s],
            "ratio_read_rows_shard": round(ours_shard / raw, 3),
            "loader_read_rows_shard_gb_per_s": round(bytes_read / ours_shard / 1e9, 3),
            "loader_wait_seconds": [round(x, 4) for x in waits],
            "loader_wait_seconds_of_min": round(waits[loader_s.index(ours)], 4),
            "kept": str(cache.path) if args.keep else None,
        })
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
