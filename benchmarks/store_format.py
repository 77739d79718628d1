"""Store format 1 against format 2, side by side in one run: write, verify and loader throughput.

Format 1 (one array per layer) is run by the code of the last commit that wrote it (``--v1-commit``,
extracted with ``git archive`` into a temp dir, or ``--v1-src DIR``), format 2 by this tree, each
in its own subprocess, alternating, ``--repeats`` rounds, min of each. Every run writes the same
synthetic cache (the shape of the default model at T=8: 30 layers, 8 slots, hidden 576, bf16 of
standard normals, 32 rows a shard, 8 a chunk, the token arrays collect writes, all rows train)
into a fresh temp store, then times:

- **write**: ``Cache.write_shard`` of every shard, the store's part of collect (checksums, stats,
  codecs, files), with the arrays already encoded; with each format's collect codecs (format 1:
  blosc-zstd; format 2: the layout's, uncompressed in layer groups, read by
  ``ia2cache.store.direct``), format 1 uncompressed (its loader benchmark was), and format 2 with
  blosc-lz4 (its default before 2026-12-01, read through zarr);
- **verify**: ``Cache.verify`` of the whole cache (every byte read, every chunk's sha256);
- **raw**: ``f.read`` of every activation shard file into preallocated memory, warm;
- **loader**: one shuffled epoch of ``CacheLoader`` (batch 32), opening it included, each
  format's defaults (format 1: float32 out, every chunk's sha256 checked; format 2: as stored,
  bf16, every chunk's crc32c checked), and one for a quarter of the layers (0-7).

Wall and CPU seconds of the subprocess are both kept (the machine may be busy); the load
average is recorded before and after.

Launch: ``python -m benchmarks.store_format [--gb 0.5] [--repeats 2]``; writes
``benchmarks/results/store_format.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import write_result

REPO = Path(__file__).resolve().parents[1]
V1_COMMIT = "853cc6d"
"""The last commit whose ia2cache wrote store format 1."""

# One run of one format, in a fresh process: prints one JSON object. ``FORMAT`` and ``CODEC`` come
# from the environment; ia2cache is whichever tree is first on sys.path (the format-1 one or this).
_RUN = r'''
import json, math, os, sys, tempfile, time, shutil
from pathlib import Path
import numpy as np, torch
from ia2cache.loader import CacheLoader, LoaderConfig
import ia2cache.store as store
FORMAT, CODEC, GB = int(os.environ["FORMAT"]), os.environ["CODEC"], float(os.environ["GB"])
L, T, H, SHARD, CHUNK = 30, 8, 576, 32, 8
n_rows = math.ceil(GB * 1e9 / (L * T * H * 2) / SHARD) * SHARD
tok = {"tokens/student_ids": (12,), "tokens/student_len": (), "tokens/teacher_ids": (160,),
       "tokens/teacher_len": (), "tokens/response_ids": (T,), "tokens/response_len": (),
       "tokens/target_ids": (4,), "tokens/target_len": (), "tokens/teacher_positions": (T,),
       "tokens/student_positions": (T,), "tokens/positions_len": (), "rows/example_index": (),
       "rows/demo_index": (8,)}
if FORMAT == 1:
    specs = [store.ArraySpec(f"acts/attn/layer_{i:03d}", (T, H), "uint16", "bfloat16", stats=True,
                             compress=CODEC != "none") for i in range(L)]
else:
    import dataclasses
    act = store.cache_arrays(site="attn", n_layers=L, slots=T, hidden=H, dtype="bf16",
                             rows_per_chunk=CHUNK, student_len=1, teacher_len=1, t=1,
                             target_len=1, k=1, topk=0)[0]
    specs = [act if CODEC == "default" else dataclasses.replace(act, codec=CODEC)]
specs += [store.ArraySpec(p, s, "int32") for p, s in tok.items()]
specs += [store.ArraySpec("rows/split", (), "uint8")]
rng = np.random.default_rng(0)
acts = torch.from_numpy(rng.standard_normal((n_rows, L, T, H), dtype=np.float32)).to(torch.bfloat16)
acts = acts.view(torch.uint16).numpy()
data = {p: rng.integers(1, 9, (n_rows, *s), dtype=np.int32) for p, s in tok.items()}
data["tokens/student_len"][:] = 12; data["tokens/response_len"][:] = T; data["tokens/target_len"][:] = 4
data["tokens/positions_len"][:] = T; data["rows/split"] = np.zeros(n_rows, np.uint8)
data["tokens/student_positions"][:] = np.arange(11, 11 + T)
if FORMAT == 1:
    for i in range(L):
        data[f"acts/attn/layer_{i:03d}"] = np.ascontiguousarray(acts[:, i])
else:
    data["acts/attn"] = acts
fields = {"key_fields": {"bench": "store_format", "codec": CODEC}, "site": "attn", "layers": list(range(L)),
          "n_train": n_rows, "n_dev": 0, "model": {"fingerprint": "0", "tokenizer_fingerprint": "0"}}
tmp = Path(tempfile.mkdtemp(prefix="ia2-format-bench-"))
try:
    cache = store.Cache.create_or_open(tmp, store.cache_key(fields["key_fields"]), fields, specs, n_rows,
                                       SHARD, CHUNK)
    w = c = 0.0
    with cache.lock():
        for s in range(cache.n_shards):
            a, b = cache.shard_rows(s)
            part = {p: v[a:b] for p, v in data.items()}
            w0, c0 = time.perf_counter(), time.process_time()
            cache.write_shard(s, part)
            w += time.perf_counter() - w0; c += time.process_time() - c0
        cache.finalize()
    del data
    out = {"format": FORMAT, "codec": CODEC, "rows": n_rows, "act_bytes": acts.nbytes,
           "write": [w, c]}
    act_files = [Path(r) / f for r, _, fs in os.walk(Path(cache.path) / "acts")
                 for f in fs if f != "zarr.json"]
    out["act_file_bytes"] = sum(f.stat().st_size for f in act_files)
    buf = bytearray(max(f.stat().st_size for f in act_files))
    def raw():
        for f in act_files:
            with open(f, "rb", buffering=0) as fh: fh.readinto(memoryview(buf))
    raw()
    def timed(fn):
        w0, c0 = time.perf_counter(), time.process_time(); r = fn()
        return [time.perf_counter() - w0, time.process_time() - c0], r
    out["raw"], _ = timed(raw)
    out["verify"], problems = timed(lambda: store.Cache.open(cache.path).verify())
    assert problems == [], problems[:3]
    def epoch(**kw):
        loader = CacheLoader(cache.path, LoaderConfig(batch_size=32, shuffle=True, **kw))
        return sum(len(b.rows) for b in loader)
    out["loader"], rows = timed(epoch)
    assert rows == n_rows
    out["loader_quarter"], _ = timed(lambda: epoch(layers=tuple(range(8))))
    print(json.dumps(out))
finally:
    shutil.rmtree(tmp, ignore_errors=True)
'''


def _v1_tree(commit: str, dest: Path) -> Path:
    """The format-1 ia2cache package of ``commit``, extracted read-only with ``git archive``."""
    archive = subprocess.run(["git", "archive", commit, "ia2cache"], cwd=REPO,
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def _run(tree: Path, fmt: int, codec: str, gb: float) -> dict[str, Any]:
    env = {**os.environ, "FORMAT": str(fmt), "CODEC": codec, "GB": str(gb), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(tree)}
    # cwd = the tree: `python -c` puts the working directory first on sys.path
    r = subprocess.run([sys.executable, "-c", _RUN], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=3600)
    if r.returncode:
        raise SystemExit(f"format {fmt} ({codec}) failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--v1-commit", default=V1_COMMIT)
    ap.add_argument("--v1-src", default=None, help="a folder holding the format-1 ia2cache package")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ia2-v1-src-") as tmp:
        v1 = Path(args.v1_src) if args.v1_src else _v1_tree(args.v1_commit, Path(tmp))
        configs = [(v1, 1, "zstd"), (REPO, 2, "default"), (v1, 1, "none"), (REPO, 2, "lz4")]
        load = [round(x, 2) for x in os.getloadavg()]
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeats):
            for tree, fmt, codec in configs:
                runs.setdefault(f"format{fmt}-{codec}", []).append(_run(tree, fmt, codec, args.gb))
        out: dict[str, Any] = {}
        for name, rs in runs.items():
            best = {k: [min(r[k][0] for r in rs), min(r[k][1] for r in rs)]
                    for k in ("write", "verify", "raw", "loader", "loader_quarter")}
            act = rs[0]["act_bytes"]
            out[name] = {
                "rows": rs[0]["rows"], "act_bytes": act, "act_file_bytes": rs[0]["act_file_bytes"],
                "size_ratio": round(rs[0]["act_file_bytes"] / act, 3),
                "seconds": {k: round(v[0], 3) for k, v in best.items()},
                "cpu_seconds": {k: round(v[1], 3) for k, v in best.items()},
                "gb_per_s": {k: round((act * (8 / 30 if k == "loader_quarter" else 1)) / v[0] / 1e9, 3)
                             for k, v in best.items() if k != "raw"} | {"raw": round(
                                 rs[0]["act_file_bytes"] / best["raw"][0] / 1e9, 3)},
                "cpu_gb_per_s": {k: round(act / v[1] / 1e9, 3)
                                 for k, v in best.items() if k != "loader_quarter"},
                "loader_over_raw": round(best["loader"][0] / best["raw"][0], 2),
                "quarter_over_full_loader": round(best["loader_quarter"][0] / best["loader"][0], 3),
                "all_seconds": {k: [[round(x, 3) for x in r[k]] for r in rs]
                                for k in ("write", "verify", "raw", "loader", "loader_quarter")},
            }
    write_result("store_format", {
        "gb": args.gb, "repeats": args.repeats, "v1_commit": args.v1_commit, "layers": 30, "t": 8,
        "hidden": 576, "shard_rows": 32, "chunk_rows": 8, "batch_size": 32, "runs": out,
        "load_average": {"before": load, "after": [round(x, 2) for x in os.getloadavg()]},
    })


if __name__ == "__main__":
    main()
