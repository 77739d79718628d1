"""Cells per hour of ``ia2cache sweep`` with 1 worker against 2 workers, side by side on this
machine, on the real default model.

The same small grid (task antonyms, N=4, seeds 0..S-1, methods tok and act, one lr, a short step
cap) runs three times into fresh folders that share one store (its caches are collected once,
up front, so all three measure training and evaluation only):

- ``1 worker`` in this process with torch's default thread count (what a plain run does);
- ``1 worker, 1 thread``;
- ``2 workers`` (one torch thread each: the sweep's default for W > 1 on a CPU).

The rows of the three runs must agree (the same cells, the same chosen lr and steps; accuracy
within float reordering), and that is checked. Reported: wall seconds and cells per hour of each,
and the ratio 2 workers / 1 worker. Run it on an otherwise idle machine.

Launch: ``python -m benchmarks.sweep_parallel [--seeds 4] [--max-steps 30]``; writes
``benchmarks/results/sweep_parallel.json`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.sweep import SweepConfig, read_results, sweep


def _run(cfg: SweepConfig) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.perf_counter()
    res = sweep(cfg)
    seconds = time.perf_counter() - t0
    assert res["cells_failed"] == 0, res
    return seconds, read_results(Path(cfg.out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--n-eval", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        for s in range(args.seeds):  # caches first: the three runs below share them
            collect(CollectConfig(task=args.task, n=args.n, seed=s, store=store))
        base = dict(task=args.task, ns=(args.n,), seeds=tuple(range(args.seeds)), methods=("tok", "act"),
                    lrs=(1e-3,), max_steps=args.max_steps, eval_every=10, n_eval=args.n_eval, store=store)
        default_threads = torch.get_num_threads()
        runs = {
            "1_worker": SweepConfig(out=f"{tmp}/w1", workers=1, **base),
            "1_worker_1_thread": SweepConfig(out=f"{tmp}/w1t1", workers=1, threads=1, **base),
            "2_workers": SweepConfig(out=f"{tmp}/w2", workers=2, **base),
        }
        seconds, rows = {}, {}
        for name, cfg in runs.items():
            torch.set_num_threads(default_threads)
            seconds[name], rows[name] = _run(cfg)
        torch.set_num_threads(default_threads)
    cells = len(rows["1_worker"])
    keyed = {name: {(r["n"], r["seed"], r["method"]): r for r in rs} for name, rs in rows.items()}
    for name, got in keyed.items():  # the same cells and choices in every run
        assert got.keys() == keyed["1_worker"].keys(), name
        for key, r in got.items():
            ref = keyed["1_worker_1_thread"][key]
            assert r.get("lr") == ref.get("lr") and r.get("steps_run") == ref.get("steps_run"), (name, key)
    per_hour = {name: round(cells / s * 3600, 1) for name, s in seconds.items()}
    write_result("sweep_parallel", {
        "task": args.task, "n": args.n, "seeds": args.seeds, "methods": ["tok", "act"],
        "max_steps": args.max_steps, "n_eval": args.n_eval, "cells": cells,
        "default_torch_threads": default_threads,
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "cells_per_hour": per_hour,
        "two_workers_over_one": round(per_hour["2_workers"] / per_hour["1_worker"], 3),
        "two_workers_over_one_thread": round(per_hour["2_workers"] / per_hour["1_worker_1_thread"], 3),
    })


if __name__ == "__main__":
    main()
