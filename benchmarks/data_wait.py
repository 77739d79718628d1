"""The data-wait fraction of a real distill run: how long training blocks on the cache loader.

Collects a small cache (task antonyms, N=16, T=1, all layers, bf16) into a temp store, then
trains ``distill(DistillConfig(method="act", lr=1e-3))`` for ``--steps`` optimizer steps from it
into a temp directory, and reads ``run.json``: ``data_wait_seconds`` (time the train loop blocked
on the loader) over ``train_loop_seconds`` (time inside the train loop). Also reported: the
median step time (between consecutive optimizer steps) and the rate at which the loop consumed
cached activation bytes. ``--model``, ``--device``, ``--dtype`` pick the model (default: the
default model; ``random:llama-3.2-1b`` for the paper's smallest shape).

Target: data_wait_seconds / train_loop_seconds <= 1%.

Launch: ``python -m benchmarks.data_wait [--n 16] [--t 1] [--steps 12]``; writes
``benchmarks/results/data_wait.json`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import add_model_args, budget_kwargs, cuda_peak_mb, load, sync, write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.store import Cache

TARGET = 0.01


def _act_bytes(cache: Cache, split_rows: int) -> int:
    """Bytes of activations per pass over ``split_rows`` rows, as stored (uncompressed)."""
    m = cache.manifest
    width = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}[m["dtype"]]
    return split_rows * len(m["layers"]) * int(m["position_slots"]) * int(m["model"]["hidden_size"]) * width


def measure(lm: Any, task: str, n: int, t: int, steps: int, tmp: str | Path, method: str = "act",
            lr: float = 1e-3, batch_size: int = 4, collect_batch_size: int = 8) -> dict[str, Any]:
    """Collect a cache with ``lm`` (already loaded), then distill ``steps`` steps from it on
    ``lm``'s device; data wait, step time, loader rate and peak GPU memory of each part.

    ``lm`` is wrapped by peft in place: load a fresh model for anything after this."""
    tmp = Path(tmp)
    cuda_peak_mb(lm.device)
    sync(lm.device)
    t0 = time.perf_counter()
    res = collect(CollectConfig(task=task, n=n, max_new_tokens=t, store=str(tmp / "store"),
                                batch_size=collect_batch_size), lm)
    sync(lm.device)
    collect_s = time.perf_counter() - t0
    collect_peak = cuda_peak_mb(lm.device)
    cache = Cache.open(res.cache)
    out = tmp / "run"
    stamps: list[float] = []

    def progress(event: dict[str, Any]) -> None:
        if "loss" in event and not event.get("evaluation"):
            stamps.append(time.perf_counter())

    config = DistillConfig(cache=res.cache, method=method, lr=lr, batch_size=batch_size, out=str(out),
                           device=str(lm.device), **budget_kwargs(DistillConfig, steps))
    d = distill(config, lm, progress=progress)
    distill_peak = cuda_peak_mb(lm.device)
    run = json.loads((out / "run.json").read_text())
    wait, loop = run.get("data_wait_seconds"), run.get("train_loop_seconds")
    frac = wait / loop if wait is not None and loop else None
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    n_train = int(cache.manifest.get("n_train", n))
    per_epoch = max(1, math.ceil(n_train / batch_size))
    epochs, rest = divmod(len(stamps), per_epoch)
    consumed = _act_bytes(cache, epochs * n_train + min(rest * batch_size, n_train))
    return {
        "model": lm.info.name, "model_random": lm.info.random, "device": str(lm.device), "task": task,
        "n": n, "t": t, "rows": res.rows, "cache": res.cache, "n_train": n_train, "method": method, "lr": lr,
        "batch_size": batch_size, "steps": len(stamps), "budget": budget_kwargs(DistillConfig, steps),
        "collect_seconds": round(collect_s, 3), "distill_seconds": d.seconds,
        "data_wait_seconds": wait, "train_loop_seconds": loop,
        "data_wait_fraction": None if frac is None else round(frac, 4),
        "target": TARGET, "meets_target": None if frac is None else frac <= TARGET,
        "step_seconds_median": round(statistics.median(gaps), 5) if gaps else None,
        "act_bytes_consumed": consumed,
        "loader_gb_per_s_fed": round(consumed / loop / 1e9, 4) if loop and consumed else None,
        "peak_gpu_mb": {"collect": collect_peak, "distill": distill_peak},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--t", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps")
    ap.add_argument("--method", default="act")
    ap.add_argument("--lr", type=float, default=1e-3)
    add_model_args(ap)
    args = ap.parse_args()
    lm = load(args)
    with tempfile.TemporaryDirectory(prefix="ia2-data-wait-") as tmp:
        result = measure(lm, args.task, args.n, args.t, args.steps, tmp, method=args.method, lr=args.lr)
    write_result("data_wait", result)


if __name__ == "__main__":
    main()
