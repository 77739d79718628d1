"""What one shared cache saves across a sweep: K distill runs from ONE cache against K runs that
each recompute the teacher.

K runs (seeds 0..K-1, method act, 2 epochs, lr 1e-3) on the default model, task antonyms, N=8:

- **ours**: one ``collect`` into a temp store, then K ``distill`` runs that all read it;
- **reference**: before each of the K runs, a fresh ``collect`` into a new temp store (the
  teacher is recomputed every time, as in the reference code), then the same ``distill``.

Both sides use one already loaded teacher model for collect; each distill loads its own base
model (distill wraps the model it is given with peft in place), on both sides alike. The
caches are identical (same data seed), so run s of both sides must end with the same losses,
and that is checked.

Reported: total teacher (collect) seconds and total wall seconds of both sides, and the
ratios reference / ours. Expected: the teacher ratio is about K, the wall ratio depends on how
the teacher compares with training.

Launch: ``python -m benchmarks.sweep_reuse [--k-runs 10] [--n 8] [--epochs 2]``; writes
``benchmarks/results/sweep_reuse.json`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.models import LoadedModel, load_model


def _collect(lm: LoadedModel, args: argparse.Namespace, store: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = collect(CollectConfig(task=args.task, n=args.n, store=str(store)), lm)
    assert not res.reused
    return time.perf_counter() - t0, res.cache


def _distill(args: argparse.Namespace, cache: str, seed: int, out: Path) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    d = distill(DistillConfig(cache=cache, method=args.method, lr=args.lr, epochs=args.epochs, seed=seed,
                              out=str(out)))
    assert not d.reused
    return time.perf_counter() - t0, d.final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k-runs", type=int, default=10)
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--method", default="act")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    teacher = load_model("default")  # only ever used unwrapped, by collect
    seeds = list(range(args.k_runs))
    with tempfile.TemporaryDirectory(prefix="ia2-sweep-reuse-") as tmp:
        root = Path(tmp)
        # ours: one cache, K runs from it
        t0 = time.perf_counter()
        ours_teacher, cache = _collect(teacher, args, root / "ours" / "store")
        ours_train, ours_final = 0.0, []
        for s in seeds:
            sec, final = _distill(args, cache, s, root / "ours" / f"run-s{s}")
            ours_train += sec
            ours_final.append(final)
        ours_wall = time.perf_counter() - t0
        # reference: the teacher recomputed before every run
        t0 = time.perf_counter()
        ref_teacher, ref_train, ref_final = 0.0, 0.0, []
        for s in seeds:
            sec, cache_s = _collect(teacher, args, root / "ref" / f"store-s{s}")
            ref_teacher += sec
            sec, final = _distill(args, cache_s, s, root / "ref" / f"run-s{s}")
            ref_train += sec
            ref_final.append(final)
        ref_wall = time.perf_counter() - t0
    write_result("sweep_reuse", {
        "model": teacher.info.name, "device": str(teacher.device), "task": args.task, "n": args.n,
        "k_runs": args.k_runs, "method": args.method, "epochs": args.epochs, "lr": args.lr,
        "ours": {"collects": 1, "teacher_seconds": round(ours_teacher, 2),
                 "distill_seconds": round(ours_train, 2), "wall_seconds": round(ours_wall, 2)},
        "reference": {"collects": args.k_runs, "teacher_seconds": round(ref_teacher, 2),
                      "distill_seconds": round(ref_train, 2), "wall_seconds": round(ref_wall, 2)},
        "teacher_ratio": round(ref_teacher / ours_teacher, 2),
        "wall_ratio": round(ref_wall / ours_wall, 2),
        "same_final_losses": ours_final == ref_final,
    })


if __name__ == "__main__":
    main()
