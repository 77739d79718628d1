"""The data-wait fraction of a real distill run: how long training blocks on the cache loader.

Collects a small cache on the default model (task antonyms, N=16, T=1, all 30 layers, bf16)
into a temp store, then trains ``distill(DistillConfig(method="act", lr=1e-3, epochs=3))``
from it into a temp directory, and reads ``run.json``: ``data_wait_seconds`` (time the train
loop blocked on the loader) over ``train_loop_seconds`` (time inside the train loop).

Target: data_wait_seconds / train_loop_seconds <= 5%.

Launch: ``python -m benchmarks.data_wait [--n 16] [--epochs 3]``; writes
``benchmarks/results/data_wait.json`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks._common import write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.models import load_model

TARGET = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--method", default="act")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ia2-data-wait-") as tmp:
        lm = load_model("default")
        t0 = time.perf_counter()
        res = collect(CollectConfig(task=args.task, n=args.n, max_new_tokens=1, store=f"{tmp}/store"), lm)
        collect_s = time.perf_counter() - t0
        out = Path(tmp) / "run"
        # distill wraps the model it is given with peft in place; the teacher is no longer needed.
        d = distill(DistillConfig(cache=res.cache, method=args.method, lr=args.lr, epochs=args.epochs,
                                  out=str(out)), lm)
        run = json.loads((out / "run.json").read_text())
    wait, loop = run["data_wait_seconds"], run["train_loop_seconds"]
    frac = wait / loop if loop else float("nan")
    write_result("data_wait", {
        "model": lm.info.name, "device": str(lm.device), "task": args.task, "n": args.n, "rows": res.rows,
        "method": args.method, "lr": args.lr, "epochs": args.epochs, "epochs_run": d.epochs_run,
        "collect_seconds": round(collect_s, 2), "distill_seconds": d.seconds,
        "data_wait_seconds": wait, "train_loop_seconds": loop, "data_wait_fraction": round(frac, 4),
        "target": TARGET, "meets_target": frac <= TARGET,
    })


if __name__ == "__main__":
    main()
