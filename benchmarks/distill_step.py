"""Cost of one IA2 (act) training step relative to a plain SFT (tok) step on the same batch.

Both steps run on the default model with a fresh LoRA adapter, on the same batch of cached rows:
forward (student activations captured by hooks for act; logits for tok), loss, backward, Adam
step. The act step reads its targets from the cache and never runs the teacher; its extra work
is the hooks and the MSE over 30 layers, minus the LM head it skips.

Launch: ``python -m benchmarks.distill_step [--task antonyms] [--n 16] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, _loss, _setup, _trainable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--t", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = collect(CollectConfig(task=args.task, n=args.n, max_new_tokens=args.t, store=tmp))
        times: dict[str, list[float]] = {"act": [], "tok": []}
        runs, opts = {}, {}
        for method in ("act", "tok"):
            runs[method] = _setup(DistillConfig(cache=cache.cache, method=method, batch_size=args.batch_size,
                                                out=str(Path(tmp) / method)), None)
            opts[method] = torch.optim.Adam(list(_trainable(runs[method].model).values()), lr=1e-4)
            runs[method].model.train()
        batch = next(iter(runs["act"].train))
        # Alternate the two step kinds so that background load hits both alike.
        for i in range(args.repeats + 2):
            for method in ("act", "tok"):
                run, opt = runs[method], opts[method]
                t0 = time.perf_counter()
                loss = _loss(run, batch, method)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:  # two warm-up steps
                    times[method].append(time.perf_counter() - t0)
        for run in runs.values():
            run.capture.close()
    act, tok = statistics.median(times["act"]), statistics.median(times["tok"])
    write_result("distill_step", {
        "task": args.task, "n": args.n, "t": args.t, "batch_size": args.batch_size,
        "act_step_seconds_median": round(act, 4), "tok_step_seconds_median": round(tok, 4),
        "act_over_tok": round(act / tok, 3), "repeats": args.repeats,
    })


if __name__ == "__main__":
    main()
