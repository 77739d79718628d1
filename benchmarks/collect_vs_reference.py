"""ia2cache collect against a reference-style teacher loop, on the same rows, side by side.

The reference loop does what the paper's public code does: batch size 1, and for each example
T full forward passes (prompt + the response so far, no KV cache) with forward hooks that keep
the site output at the predicting position in RAM; the greedy token of each pass extends the
response. ia2cache runs one batched KV-cached greedy decode per micro-batch (nnsight-traced
prefill, then one-token steps; T=1 is the prefill alone), captures at the aligned positions
inside it, and writes a zarr cache. Both run on the same loaded model (``--model``, default the
default model; ``--device``, ``--dtype``), in one process. The activations are compared at the
middle layer, at the first aligned position.

Launch: ``python -m benchmarks.collect_vs_reference [--rows 64] [--k 8] [--t 1,8]
[--model random:llama-3.2-1b]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch

from benchmarks._common import add_model_args, load, model_dims, read_acts, sync, write_result
from ia2cache.collect import CollectConfig, collect
from ia2cache.prompts import PromptConfig, build_pairs
from ia2cache.sites import SITES, decoder_layers
from ia2cache.store import Cache
from ia2cache.tasks import load_task


@torch.no_grad()
def reference(model: Any, pairs: list[Any], t: int, eos: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Batch size 1, T full forwards per example, forward hooks, everything kept in RAM."""
    layers = decoder_layers(model)
    got: dict[int, torch.Tensor] = {}
    hooks = [SITES["attn"].module(layers[i]).register_forward_hook(
        lambda m, a, o, i=i: got.__setitem__(i, o[0, -1].clone())) for i in range(len(layers))]
    responses, acts = [], []
    for p in pairs:
        seq, resp, per_t = list(p.teacher_ids), [], []
        for _ in range(t):
            logits = model(input_ids=torch.tensor([seq], device=model.device)).logits
            per_t.append(torch.stack([got[i] for i in range(len(layers))]))
            tok = int(logits[0, -1].argmax())
            resp.append(tok)
            seq.append(tok)
            if tok == eos:
                break
        responses.append(resp)
        acts.append(torch.stack(per_t))  # (T', layers, hidden)
    for h in hooks:
        h.remove()
    return responses, acts


def measure(lm: Any, task_name: str, rows: int, k: int, t: int, batch_size: int,
            shard_rows: int = 32) -> dict[str, Any]:
    """ia2cache collect and the reference loop on the same ``rows`` rows at one T; both timed
    with the model already loaded, on its device, with the device synchronised."""
    task = load_task(task_name)
    n_train = (2 * rows + 2) // 3  # N train + N//2 dev = rows
    n_layers, hidden = model_dims(lm.model)
    mid = n_layers // 2
    with tempfile.TemporaryDirectory() as store:
        cfg = CollectConfig(task=task_name, n=n_train, k=k, max_new_tokens=t, store=store,
                            batch_size=batch_size, shard_rows=shard_rows)
        sync(lm.device)
        t0 = time.perf_counter()
        res = collect(cfg, lm)
        sync(lm.device)
        ours = time.perf_counter() - t0
        cache = Cache.open(res.cache)
        pairs = list(build_pairs(task, lm.tokenizer, PromptConfig(n=n_train, k=k)).rows)
        t0 = time.perf_counter()
        ref_resp, ref_acts = reference(lm.model, pairs, t, lm.tokenizer.eos_token_id)
        sync(lm.device)
        ref = time.perf_counter() - t0
        # Same work: compare responses and activations (bf16 storage tolerance).
        resp = cache.read("tokens/response_ids", 0, res.rows)
        rlen = cache.read("tokens/response_len", 0, res.rows)
        same_resp = sum(list(resp[i, : rlen[i]]) == r[: rlen[i]] for i, r in enumerate(ref_resp))
        ours_mid = read_acts(cache, "attn", mid, 0, res.rows)
        ref_acts = [a.float().cpu() for a in ref_acts]
        err = max(float((ours_mid[i, 0] - ref_acts[i][0, mid]).abs().max()) for i in range(res.rows))
        scale = max(float(ref_acts[i][0, mid].abs().max()) for i in range(res.rows))
    values = res.rows * t * n_layers * hidden
    teacher_tokens = sum(len(p.teacher_ids) for p in pairs)
    return {
        "t": t, "rows": res.rows, "k": k, "n": n_train, "batch_size": batch_size,
        "mean_teacher_prompt_tokens": round(teacher_tokens / len(pairs), 1),
        "ia2cache_seconds": round(ours, 3), "reference_seconds": round(ref, 3),
        "speedup": round(ref / ours, 2),
        "ia2cache_rows_per_s": round(res.rows / ours, 2),
        "ia2cache_tokens_per_s": round(res.tokens_computed / ours, 1),
        "reference_rows_per_s": round(res.rows / ref, 2),
        "tokens_computed": res.tokens_computed,
        "bytes_on_disk": res.bytes_on_disk,
        "bytes_per_stored_value": round(res.bytes_on_disk / values, 3),
        "responses_equal": f"{same_resp}/{res.rows}",
        "compared_layer": mid,
        "max_abs_diff_mid_layer_pos0": err, "max_abs_mid_layer": scale,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--t", default="1,8")
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", choices=["default", "large"], default="default")
    add_model_args(ap)
    args = ap.parse_args()
    if args.size == "large":
        args.rows = 256
    lm = load(args)
    runs = []
    for t in (int(x) for x in args.t.split(",")):
        runs.append(measure(lm, args.task, args.rows, args.k, t, args.batch_size))
        print(runs[-1], flush=True)
    write_result("collect_vs_reference", {"model": lm.info.name, "model_random": lm.info.random,
                                          "device": str(lm.device), "task": args.task, "runs": runs,
                                          "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
