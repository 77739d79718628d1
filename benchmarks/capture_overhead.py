"""What capturing and writing the teacher costs: ia2cache ``collect`` against a bare teacher loop.

Both sides do the same model work on the same rows (default model, task antonyms, 64 rows,
k=8, T in {1, 8}), micro-batch by micro-batch (``--batch-size`` rows, inside shards of 32 rows
as collect forms them):

- **bare**: for T>1 transformers' batched KV-cached greedy ``generate`` with the task's stop
  string (``benchmarks._common.greedy_generate``), which is all the model work an ICL response
  needs: collect captures inside its own decode loop and runs no second pass. For T=1 a
  single forward whose argmax at the last prompt token is the response: with
  ``--bare-head aligned`` (the default) the decoder plus its final norm, with the LM head at
  the last prompt token only, which is exactly collect's model work (its trace stops after the
  final norm); ``--bare-head full`` is a plain ``model(...)`` with the LM head over every
  position, more work than collect does (~20% of this model's FLOPs per token). Rows are
  sorted by length inside each shard, as collect batches them. No nnsight, no capture, no
  writes.
- **ours**: ``collect`` into a fresh temp store, all 30 layers, bf16, with the model already
  loaded: prompt building, nnsight tracing, encoding, checksums, stats and zarr writes.

Both sides include loading the task and building the prompt pairs. They run alternately,
bare, ours, bare, ours (``--repeats`` pairs), and the min of each is kept.

Target: overhead = ours / bare - 1 <= 10%.

``--model``, ``--device`` and ``--dtype`` pick another model (e.g. ``random:llama-3.2-1b``) and
device; both sides run on it.

Launch: ``python -m benchmarks.capture_overhead [--rows 64] [--k 8] [--t 1,8] [--batch-size 8]``;
writes ``benchmarks/results/capture_overhead.json`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks._common import add_model_args, greedy_generate, load, sync, write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.models import LoadedModel
from ia2cache.padding import pad
from ia2cache.prompts import PromptConfig, build_pairs
from ia2cache.store import Cache
from ia2cache.tasks import load_task

TARGET = 0.10
SHARD_ROWS = 32


@torch.no_grad()
def bare(lm: LoadedModel, task_name: str, n: int, k: int, t: int, batch_size: int,
         head: str) -> list[list[int]]:
    """The teacher's model work with no capture and no writes; returns the responses."""
    model, tok = lm.model, lm.tokenizer
    task = load_task(task_name)
    rows = list(build_pairs(task, tok, PromptConfig(n=n, k=k)).rows)
    dev = next(model.parameters()).device
    responses: list[list[int]] = []
    for s in range(0, len(rows), SHARD_ROWS):
        order = sorted(range(s, min(s + SHARD_ROWS, len(rows))), key=lambda r: len(rows[r].teacher_ids))
        shard = [rows[r] for r in order]
        got: list[list[int]] = []
        for i in range(0, len(shard), batch_size):
            pairs = shard[i : i + batch_size]
            prompts = [list(p.teacher_ids) for p in pairs]
            if t > 1:
                got.extend(greedy_generate(model, tok, prompts, t, task.stop))
                continue
            ids, mask = pad(prompts, tok.pad_token_id)
            ids, mask = ids.to(dev), mask.to(dev)
            last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
            rows_ix = torch.arange(len(pairs), device=dev)
            if head == "full":
                last_logits = model(input_ids=ids, attention_mask=mask).logits[rows_ix, last]
            else:
                hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                last_logits = model.get_output_embeddings()(hidden[rows_ix, last]).float()
            got.extend([int(x)] for x in last_logits.argmax(-1).tolist())
        back = sorted(range(len(order)), key=lambda j: order[j])  # back to row order
        responses.extend(got[j] for j in back)
    sync(dev)
    return responses


def ours(lm: LoadedModel, task_name: str, n: int, k: int, t: int,
         batch_size: int) -> tuple[float, list[list[int]], int]:
    """collect into a fresh temp store; returns (seconds, responses, teacher tokens computed)."""
    with tempfile.TemporaryDirectory(prefix="ia2-overhead-") as store:
        cfg = CollectConfig(task=task_name, n=n, k=k, max_new_tokens=t, store=store, batch_size=batch_size,
                            shard_rows=SHARD_ROWS, layers="all", dtype="bf16")
        sync(lm.device)
        t0 = time.perf_counter()
        res = collect(cfg, lm)
        sync(lm.device)
        seconds = time.perf_counter() - t0
        cache = Cache.open(res.cache)
        ids = cache.read("tokens/response_ids", 0, res.rows)
        lens = cache.read("tokens/response_len", 0, res.rows)
        resp = [ids[i, : lens[i]].tolist() for i in range(res.rows)]
        assert not res.reused and res.rows_computed == res.rows
    return seconds, resp, res.tokens_computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="train + dev rows (N + N//2)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--t", default="1,8", help="comma-separated T values")
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="bare/ours pairs; the min of each is kept")
    ap.add_argument("--bare-head", choices=["aligned", "full"], default="aligned")
    ap.add_argument("--size", choices=["default", "large"], default="default")
    add_model_args(ap)
    args = ap.parse_args()
    if args.size == "large":
        args.rows = 256
    lm = load(args)
    n = (2 * args.rows + 2) // 3  # N train + N//2 dev = rows
    runs = []
    for t in (int(x) for x in args.t.split(",")):
        bare_s: list[float] = []
        ours_s: list[float] = []
        same = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            bare_resp = bare(lm, args.task, n, args.k, t, args.batch_size, args.bare_head)
            bare_s.append(time.perf_counter() - t0)
            s, our_resp, _ = ours(lm, args.task, n, args.k, t, args.batch_size)
            ours_s.append(s)
            same = sum(a == b for a, b in zip(bare_resp, our_resp, strict=True))
        b, o = min(bare_s), min(ours_s)
        runs.append({
            "t": t, "rows": len(bare_resp), "n": n, "k": args.k,
            "bare_seconds": [round(x, 3) for x in bare_s], "ours_seconds": [round(x, 3) for x in ours_s],
            "bare_min_seconds": round(b, 3), "ours_min_seconds": round(o, 3),
            "overhead": round(o / b - 1, 4), "target": TARGET, "meets_target": o / b - 1 <= TARGET,
            "responses_equal": f"{same}/{len(bare_resp)}",
        })
        print(runs[-1], flush=True)
    write_result("capture_overhead", {
        "model": lm.info.name, "model_random": lm.info.random, "device": str(lm.device),
        "dtype": str(next(lm.model.parameters()).dtype),
        "task": args.task, "batch_size": args.batch_size, "shard_rows": SHARD_ROWS,
        "bare_head": args.bare_head, "repeats": args.repeats, "runs": runs,
        "max_overhead": max(r["overhead"] for r in runs),
    })


if __name__ == "__main__":
    main()
