"""What counting every way an answer can end does to a multi-token task's confidence and ECE.

``ia2cache.evaluate.answer_confidence`` scores a generated answer as P(its tokens) x P(any token
that ends it the same way: EOS, or the stop string after whitespace only). Before commit
3552641, the one end token generation took counted, and an EOS end did not count at all. This
script evaluates base and ICL on one multi-token task once, records both confidences for every
row (the old one recomputed from the same log-probabilities), and reports mean confidence and
ECE under each, with how the answers ended.

Launch: ``python -m benchmarks.confidence_ends [--task capitals] [--n 4] [--seeds 0,1]
[--n-eval 100]``; writes ``benchmarks/results/confidence_ends.json`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import numpy as np
import torch

import ia2cache.evaluate as E
from benchmarks._common import write_result
from ia2cache.metrics import ece_equal_mass, ece_equal_width
from ia2cache.models import load_model
from ia2cache.tasks import load_task


def _old(chosen_lp: torch.Tensor, ids: list[int], n_resp: int, eos: int | None) -> float:
    """The previous definition: the generated tokens up to the end, an EOS end left out."""
    n = n_resp - 1 if n_resp and ids[n_resp - 1] == eos else n_resp
    return float(chosen_lp[: max(n, 1)].sum().exp())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--n-eval", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model("default")
    tok, task = lm.tokenizer, load_task(args.task)
    new_fn = E.answer_confidence
    seen: list[tuple[float, str]] = []

    def both(chosen_lp: torch.Tensor, end_mass: torch.Tensor, ids: list[int], n_resp: int,
             ends: torch.Tensor) -> float:
        last = ids[n_resp - 1] if n_resp else None
        how = repr(tok.decode([last])) if last is not None and bool(ends[last]) else "stop fused or no end"
        seen.append((_old(chosen_lp, ids, n_resp, tok.eos_token_id), how))
        return new_fn(chosen_lp, end_mass, ids, n_resp, ends)

    E.answer_confidence = both  # evaluate() looks it up at call time: one pass gives both numbers
    configs: list[tuple[str, Any]] = [("base", E.EvalConfig(mode="base", n_eval=args.n_eval))]
    configs += [(f"icl N={args.n} seed={s}", E.EvalConfig(mode="icl", k=args.n, n=args.n, n_eval=args.n_eval,
                                                         seed=int(s)))
                for s in args.seeds.split(",")]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for name, cfg in configs:
            seen.clear()
            r = E.evaluate(lm.model, tok, task, cfg, details=True)
            correct = np.asarray(r["rows"]["correct"], dtype=bool)
            new = np.asarray(r["rows"]["confidence"], dtype=float)
            old = np.array([c for c, _ in seen])
            out[name] = {
                "accuracy": r["accuracy"],
                "new": {"confidence": float(new.mean()), "ece_equal_mass": ece_equal_mass(new, correct),
                        "ece_equal_width": ece_equal_width(new, correct)},
                "old": {"confidence": float(old.mean()), "ece_equal_mass": ece_equal_mass(old, correct),
                        "ece_equal_width": ece_equal_width(old, correct)},
                "ended_with": dict(collections.Counter(h for _, h in seen)),
            }
    finally:
        E.answer_confidence = new_fn
    write_result("confidence_ends", {"task": args.task, "n_eval": args.n_eval, "model": "default",
                                     "seconds": round(time.perf_counter() - t0, 1), "results": out})


if __name__ == "__main__":
    main()
