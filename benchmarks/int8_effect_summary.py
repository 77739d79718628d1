"""Summarise ``benchmarks/int8_effect.sh``'s runs: per seed and dtype, the cache's bytes, the best
dev act loss of a2t's first phase (against that cache's own targets), a2t's accuracy and ECE, the
adapter's relative MSE to the bf16 teacher on the eval rows, and ``verify``'s lossy error.

Launch: ``python -m benchmarks.int8_effect_summary /tmp/ia2-int8``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks._common import write_result

METRICS = ("dev_act_loss", "accuracy", "ece", "rel_mse_vs_bf16_teacher")


def _row(w: Path, seed: int, dtype: str, similarity: dict[str, dict]) -> dict:
    o = w / "out"
    col = json.loads((o / f"collect-{dtype}-{seed}.json").read_text())
    run = json.loads((o / f"a2t-{dtype}-{seed}" / "run.json").read_text())
    ev = json.loads((o / f"eval-{dtype}-{seed}.json").read_text())
    first = [h["dev_loss"] for h in run["history"] if h["phase"] == 0 and h["dev_loss"] is not None]
    verify = subprocess.run([sys.executable, "-m", "cli", "verify", col["key"], "--store", str(w / "store"),
                             "--json"], capture_output=True, text=True, check=False)
    sim = similarity[str(o / f"a2t-{dtype}-{seed}")]
    return {"seed": seed, "dtype": dtype, "bytes": col["bytes_on_disk"], "dev_act_loss": round(min(first), 3),
            "steps": run["steps_run"], "accuracy": ev["accuracy"], "ece": round(ev["ece_equal_mass"], 3),
            "rel_mse_vs_bf16_teacher": sim["mean_rel_mse"], "cosine": sim["mean_cosine"],
            "lossy": json.loads(verify.stdout).get("lossy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="the $W of int8_effect.sh")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        an = json.loads((args.work / "out" / f"analyze-{seed}.json").read_text())
        similarity = {m["adapter"]: m for m in an["methods"] if m["adapter"]}
        rows += [_row(args.work, seed, d, similarity) for d in ("bf16", "int8")]
    summary = {}
    for k in METRICS:
        a = [r[k] for r in rows if r["dtype"] == "bf16"]
        b = [r[k] for r in rows if r["dtype"] == "int8"]
        summary[k] = {"bf16_mean": round(statistics.mean(a), 4), "int8_mean": round(statistics.mean(b), 4),
                      "int8_minus_bf16": [round(y - x, 4) for x, y in zip(a, b, strict=True)]}
    write_result("int8_effect", {"task": "antonyms", "n": 8, "method": "a2t", "lr": 1e-3, "max_steps": 200,
                                 "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
