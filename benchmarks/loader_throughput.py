"""CacheLoader throughput against a raw read of the same bytes, on a synthetic cache of >= 1 GB.

The synthetic cache is written through the store API (``Cache.create_or_open`` + ``write_shard``
+ ``finalize``) with the arrays and manifest ``collect`` makes for the default model at T=8 (store
format 2: one activation array ``acts/attn`` of shape (rows, 30, 8, 576), bf16 bits as uint16,
32 rows a shard and 8 a chunk, the codec and layer chunking of ``ia2cache.store.layout``, plus
the ``tokens/`` and ``rows/`` arrays). Every row is a train row (n_dev = 0), so one train epoch
reads exactly the activation bytes on disk.

Timed, warm (the page cache holds the files; an untimed raw pass comes first), in rounds of
raw, loader, a later epoch of one loader, loader with a quarter of the layers (and spread),
``Cache.read_many`` of every chunk for all and for a quarter of the layers (``--repeats`` rounds),
min of each:

- **raw**: ``f.read`` of every shard file of the activation array into one reused buffer (the
  issue's baseline: at 9 MB, the CPU's caches hold it, so this is the speed of a copy that never
  reaches memory);
- **raw_to_memory**: the same reads, each file into its own place in one touched array of all
  the bytes: where bytes that a batch is made of must go (the second ratio, ``ratio_to_memory``);
- **loader**: one epoch of ``CacheLoader`` over the train split (batch 32, shuffle on, activations
  as stored: the training step converts them on its device), opening the loader included; every
  chunk's crc32c is checked (by ``ia2cache.store.direct``, or zarr's codec for compressed layouts);
- **loader_next**: a later epoch of one loader (its token arrays read, its buffer pool filled):
  what each epoch after the first costs in a training run;
- **layers 1/4**: the same epoch for layers 0-7 (contiguous) and for every 4th layer (spread);
- **read**: the chunks in a shuffled order, 4 per ``read_many`` call, for all layers and for
  layers 0-7: the store's part of the cost, without the loader's batch assembly.

Both wall seconds and this process's CPU seconds are kept (the machine may be busy: CPU seconds
say what the work costs on a free core). Reported: GB/s (activation bytes as stored / seconds),
ratio = loader / raw seconds (target <= 5), GB/s target >= 1.0, the quarter-layer read / full
read (target <= 0.5), the loader's ``wait_seconds``, and the load average.
``--codec`` / ``--chunk-layers`` override the layout (the layout measurements in the README).
The synthetic cache is deleted at the end unless ``--keep``.

Launch: ``python -m benchmarks.loader_throughput [--size default|large] [--gb 1.0]``
(``--gb 0.05`` for a smoke test); writes ``benchmarks/results/loader_throughput.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import write_result
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.store import ArraySpec, Cache, act_path, cache_arrays, cache_key

TARGET_RATIO, TARGET_GBPS, TARGET_SUBSET = 5.0, 1.0, 0.5
LAYERS, T, HIDDEN = 30, 8, 576
SITE = "attn"
SHARD_ROWS, CHUNK_ROWS = 32, 8
STUDENT_LEN, TEACHER_LEN, TARGET_LEN, K = 12, 160, 4, 8
SIZES = {"default": 1.0, "large": 4.0}
QUARTER = list(range(LAYERS // 4 + 1))  # layers 0-7: a contiguous quarter
SPREAD = list(range(0, LAYERS, 4))  # 8 layers spread over the model


def specs(codec: str | None = None, chunk_layers: int | None = None) -> list[ArraySpec]:
    """The arrays of a real cache (``ia2cache.store.cache_arrays``), the layout optionally changed."""
    out = cache_arrays(site=SITE, n_layers=LAYERS, slots=T, hidden=HIDDEN, dtype="bf16",
                       rows_per_chunk=CHUNK_ROWS, student_len=STUDENT_LEN, teacher_len=TEACHER_LEN, t=T,
                       target_len=TARGET_LEN, k=K, topk=0)
    act = out[0]
    if codec is not None:
        act = dataclasses.replace(act, codec=codec)
    if chunk_layers is not None:
        act = dataclasses.replace(act, chunk=(chunk_layers, T, HIDDEN))
    return [act, *out[1:]]


def manifest(n_rows: int, tag: str = "") -> dict:
    """What the loader reads (model fingerprints, site, layers, splits, T, slots) and collect writes."""
    key_fields = {"synthetic": "loader_throughput" + tag, "rows": n_rows, "layers": list(range(LAYERS)),
                  "t": T}
    return {
        "model": {"name": "synthetic", "fingerprint": "0" * 16, "tokenizer_fingerprint": "0" * 16,
                  "layers_total": LAYERS, "hidden_size": HIDDEN},
        "task": "synthetic", "n": n_rows, "k": K, "seed": 0, "n_train": n_rows, "n_dev": 0,
        "response": "icl", "max_new_tokens": T, "site": SITE, "layers": list(range(LAYERS)),
        "positions": "response", "position_slots": T, "dtype": "bf16", "topk_logits": 0,
        "key_fields": key_fields, "splits": {"0": "train", "1": "dev"}, "pad": -1,
        "about": {"batch_size": 8, "model_spec": "synthetic", "task_spec": "synthetic"},
    }


def shard_data(rng: np.random.Generator, a: int, b: int) -> dict[str, np.ndarray]:
    """One shard's arrays: activations of bf16 Gaussians (as random as real ones, for a codec),
    token and row arrays shaped as collect writes them."""
    n = b - a
    data: dict[str, np.ndarray] = {}
    acts = torch.from_numpy(rng.standard_normal((n, LAYERS, T, HIDDEN), dtype=np.float32))
    data[act_path(SITE)] = acts.to(torch.bfloat16).view(torch.uint16).numpy()
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


def n_rows_for(gb: float) -> int:
    row_bytes = LAYERS * T * HIDDEN * 2
    return math.ceil(gb * 1e9 / row_bytes / SHARD_ROWS) * SHARD_ROWS


def write_cache(store: Path, gb: float, codec: str | None = None, chunk_layers: int | None = None) -> Cache:
    """A complete synthetic cache whose activation array holds at least ``gb`` * 1e9 bytes."""
    n_rows = n_rows_for(gb)
    m = manifest(n_rows, f"-{codec}-{chunk_layers}")
    cache = Cache.create_or_open(store, cache_key(m["key_fields"]), m, specs(codec, chunk_layers), n_rows,
                                 SHARD_ROWS, CHUNK_ROWS)
    rng = np.random.default_rng(0)
    with cache.lock():
        for shard in range(cache.n_shards):
            cache.write_shard(shard, shard_data(rng, *cache.shard_rows(shard)))
        cache.finalize()
    return Cache.open(cache.path)


def act_files(cache: Cache) -> list[Path]:
    """Every shard file of the activation array (all files under its folder but zarr.json)."""
    files: list[Path] = []
    for root, _dirs, names in os.walk(Path(cache.path) / act_path(SITE)):
        files += [Path(root) / f for f in names if f != "zarr.json"]
    return sorted(files)


def raw_read(files: list[Path], buf: bytearray) -> int:
    """Read every file into ``buf`` (reused); returns the bytes read."""
    view, total = memoryview(buf), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            total += fh.readinto(view)
    return total


def raw_to_memory(files: list[Path], mem: np.ndarray) -> int:
    """Read every file into its own place in ``mem`` (allocated and touched before): the bytes end
    in memory as a batch's must, not in one small buffer the CPU's caches hold."""
    view, total = memoryview(mem), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            total += fh.readinto(view[total:])
    return total


def loader_epoch(cache: Cache, batch_size: int, **kw: Any) -> tuple[CacheLoader, int]:
    loader = CacheLoader(cache.path, LoaderConfig(batch_size=batch_size, shuffle=True, split="train", **kw))
    rows = 0
    for batch in loader:
        rows += len(batch.rows)
    return loader, rows


def store_reads(cache: Cache, layers: list[int] | None, group: int = 4) -> None:
    """Every chunk, in a shuffled order, ``group`` per call: the store's part of an epoch."""
    chunks = cache.chunk_ranges(0, cache.n_rows)
    order = np.random.default_rng(0).permutation(len(chunks))
    path = act_path(SITE)
    for g in range(0, len(order), group):
        cache.read_many([(path, *chunks[i]) for i in order[g : g + group]], layers=layers)


def timed(fn: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def measure(cache: Cache, batch_size: int, repeats: int) -> dict[str, Any]:
    """Every timing of the module docstring, ``repeats`` interleaved rounds, min of each."""
    files = act_files(cache)
    file_bytes = sum(f.stat().st_size for f in files)
    buf = bytearray(max(f.stat().st_size for f in files))
    mem = np.ones(file_bytes, dtype=np.uint8)  # touched: no page faults in the timed reads
    raw_read(files, buf)  # warm-up: both timed sides read from the page cache
    warm, _ = loader_epoch(cache, batch_size)  # its later epochs: a training run's steady state
    act_bytes = cache.n_rows * LAYERS * T * HIDDEN * 2
    runs: dict[str, list[tuple[float, float]]] = {}
    extra: dict[str, Any] = {}
    cases = {
        "raw": lambda: raw_read(files, buf),
        "raw_to_memory": lambda: raw_to_memory(files, mem),
        "loader": lambda: loader_epoch(cache, batch_size),
        "loader_next": lambda: sum(len(b.rows) for b in warm),
        "loader_quarter": lambda: loader_epoch(cache, batch_size, layers=tuple(QUARTER)),
        "loader_spread": lambda: loader_epoch(cache, batch_size, layers=tuple(SPREAD)),
        "read_all": lambda: store_reads(cache, None),
        "read_quarter": lambda: store_reads(cache, QUARTER),
        "read_spread": lambda: store_reads(cache, SPREAD),
    }
    for _ in range(repeats):
        for name, fn in cases.items():
            w, c, out = timed(fn)
            runs.setdefault(name, []).append((w, c))
            if name == "loader":
                extra.setdefault("wait", []).append(out[0].wait_seconds)
                extra["rows_per_epoch"], extra["bytes_read"] = out[1], out[0].bytes_read
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in runs.items()}
    share = {k: len(QUARTER if "quarter" in k else SPREAD) / LAYERS
             for k in best if "quarter" in k or "spread" in k}
    gbps = {k: round(act_bytes * share.get(k, 1.0) / w / 1e9, 3) for k, (w, _) in best.items()}
    gbps["raw"] = round(file_bytes / best["raw"][0] / 1e9, 3)
    gbps["raw_to_memory"] = round(file_bytes / best["raw_to_memory"][0] / 1e9, 3)
    loader_w = best["loader"][0]
    return {
        "activation_bytes": act_bytes, "activation_file_bytes": file_bytes,
        "size_ratio": round(file_bytes / act_bytes, 3), "files": len(files),
        "rows_per_epoch": extra["rows_per_epoch"], "loader_bytes_read": extra["bytes_read"],
        "seconds": {k: [round(w, 4) for w, _ in v] for k, v in runs.items()},
        "cpu_seconds": {k: [round(c, 4) for _, c in v] for k, v in runs.items()},
        "gb_per_s": gbps,
        "cpu_gb_per_s": {"raw": round(file_bytes / best["raw"][1] / 1e9, 3),
                         "loader": round(act_bytes / best["loader"][1] / 1e9, 3),
                         "read_all": round(act_bytes / best["read_all"][1] / 1e9, 3)},
        "ratio": round(loader_w / best["raw"][0], 3),
        "ratio_next": round(best["loader_next"][0] / best["raw"][0], 3),
        "ratio_to_memory": round(loader_w / best["raw_to_memory"][0], 3),
        "ratio_next_to_memory": round(best["loader_next"][0] / best["raw_to_memory"][0], 3),
        "cpu_ratio": round(best["loader"][1] / best["raw"][1], 3),
        "quarter_over_full_read": round(best["read_quarter"][0] / best["read_all"][0], 3),
        "spread_over_full_read": round(best["read_spread"][0] / best["read_all"][0], 3),
        "quarter_over_full_loader": round(best["loader_quarter"][0] / loader_w, 3),
        "spread_over_full_loader": round(best["loader_spread"][0] / loader_w, 3),
        "loader_wait_seconds": [round(x, 4) for x in extra["wait"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("--gb", type=float, default=None, help="activation GB to write (overrides --size)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the min of each is kept")
    ap.add_argument("--codec", choices=["none", "lz4", "zstd"], default=None,
                    help="override the layout's codec")
    ap.add_argument("--chunk-layers", type=int, default=None, help="override the layers per chunk")
    ap.add_argument("--dir", default=None, help="parent directory of the synthetic cache (default /tmp)")
    ap.add_argument("--name", default="loader_throughput", help="result file name")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic cache")
    args = ap.parse_args()
    gb = args.gb if args.gb is not None else SIZES[args.size]
    tmp = Path(tempfile.mkdtemp(prefix="ia2-loader-bench-", dir=args.dir))
    try:
        load_before = os.getloadavg()
        w, c, cache = timed(lambda: write_cache(tmp, gb, args.codec, args.chunk_layers))
        act = cache.specs[act_path(SITE)]
        out = measure(cache, args.batch_size, args.repeats)
        write_result(args.name, {
            "gb_requested": gb, "rows": cache.n_rows, "layers": LAYERS, "t": T, "hidden": HIDDEN,
            "shard_rows": SHARD_ROWS, "chunk_rows": CHUNK_ROWS, "chunk_layers": act.chunk_trailing[0],
            "codec": act.codec, "batch_size": args.batch_size, "loader_dtype": "as stored (bf16)",
            "shuffle": True, "write_seconds": round(w, 2), "write_cpu_seconds": round(c, 2),
            "write_gb_per_s": round(out["activation_bytes"] / w / 1e9, 3), **out,
            "targets": {"gb_per_s": TARGET_GBPS, "ratio": TARGET_RATIO,
                        "quarter_over_full_read": TARGET_SUBSET},
            "meets_ratio": out["ratio"] <= TARGET_RATIO,
            "meets_gb_per_s": out["gb_per_s"]["loader"] >= TARGET_GBPS,
            "meets_subset": out["quarter_over_full_read"] <= TARGET_SUBSET,
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]},
            "kept": str(cache.path) if args.keep else None,
        })
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
