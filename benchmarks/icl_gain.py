"""How much k demos help the default model on each built-in task.

For every built-in task: eval-split accuracy with 0 demos (base), k=4 and k=16 (ICL), ECE
alongside. A task is kept as IA2-worthy when k=4 demos beat 0 demos by at least 15 points.

Launch: ``python -m benchmarks.icl_gain [--n-eval 200] [--tasks a,b] [--model FILE.gguf]``; writes
``benchmarks/results/icl_gain.json`` (``icl_gain-<model name>.json`` for another model than the
default) and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ia2cache.evaluate import EvalConfig, evaluate
from ia2cache.models import load_model
from ia2cache.tasks import list_builtin, load_task

RESULTS = Path(__file__).parent / "results"
MIN_GAIN = 0.15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(list_builtin()))
    ap.add_argument("--ks", default="4,16")
    ap.add_argument("--model", default="default", help="any --model spec: a .gguf file, a directory, ...")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = load_model(args.model)
    rows = []
    for name in args.tasks.split(","):
        task = load_task(f"builtin:{name}")
        row = {"task": name, "eval": min(args.n_eval, len(task.eval))}
        base = evaluate(lm.model, lm.tokenizer, task, EvalConfig(mode="base", n_eval=args.n_eval))
        row["base"] = {k: base[k] for k in ("accuracy", "ece_equal_mass", "ece_equal_width")}
        for k in (int(x) for x in args.ks.split(",")):
            # A property of the task (is it learnable in context at all?), so demos from the whole
            # pool: not the ICL baseline of the comparison, which draws them from the N train rows.
            ec = EvalConfig(mode="icl", k=k, n_eval=args.n_eval, icl_demos="pool")
            r = evaluate(lm.model, lm.tokenizer, task, ec)
            row[f"k{k}"] = {m: r[m] for m in ("accuracy", "ece_equal_mass", "ece_equal_width")}
        row["single_token"] = base["single_token"]
        row["gain_k4"] = round(row["k4"]["accuracy"] - row["base"]["accuracy"], 4)
        row["keep"] = row["gain_k4"] >= MIN_GAIN
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {
        "benchmark": "icl_gain",
        "model": lm.info.to_dict(),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "icl_gain.json" if args.model == "default" else f"icl_gain-{lm.info.name}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
