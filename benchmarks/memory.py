"""Peak memory of ``collect`` at N=256 against N=4096: it must not grow with the cache size.

Collect streams shard by shard (one writer batch of 32 rows at a time), so its peak resident
memory should be the same for a cache 16 times larger. The model is the tiny in-process Llama
(``ia2cache.testing.tiny_llama`` + ``tiny_tokenizer``, saved to a temp dir as a model
directory), the task a synthetic JSONL file of >= 9000 short lines (half of them the pool);
k=4, T=1, shard_rows=32. Each size runs in its own fresh child process
(``python -m benchmarks.memory --child ...``), which loads the model, collects into a temp
store (one torch thread by default: the tiny model gains nothing from more) and reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the peak RSS) before and after
``collect``.

Target: peak RSS at N=4096 / peak RSS at N=256 <= 1.2.

Launch: ``python -m benchmarks.memory [--small 256] [--large 4096]``; writes
``benchmarks/results/memory.json`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET = 1.2
K, T, SHARD_ROWS = 4, 1, 32


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(n: int, model_dir: str, task: str, store: str, threads: int) -> None:
    """Collect N rows in this process and print one JSON line with its peak RSS."""
    import torch

    from ia2cache.collect import CollectConfig, collect
    from ia2cache.models import load_model

    torch.set_num_threads(threads)  # the tiny model gains nothing from more; it only contends

    lm = load_model(model_dir, device="cpu")
    before = _maxrss_mb()
    t0 = time.perf_counter()
    res = collect(CollectConfig(model=model_dir, task=task, n=n, k=K, max_new_tokens=T, shard_rows=SHARD_ROWS,
                                store=store), lm)
    print(json.dumps({"n": n, "rows": res.rows, "shards": res.shards_computed,
                      "seconds": round(time.perf_counter() - t0, 2), "bytes_on_disk": res.bytes_on_disk,
                      "peak_rss_mb_before_collect": round(before, 1), "peak_rss_mb": round(_maxrss_mb(), 1)}))


def prepare(root: Path, lines: int) -> tuple[Path, Path]:
    """The tiny model as a model directory, and a synthetic JSONL task of ``lines`` lines."""
    from ia2cache.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model_dir = root / "tiny-model"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    words = ["hot", "cold", "up", "down", "big", "small", "go", "went", "yes", "no", "ocean", "forest"]
    task = root / "synthetic.jsonl"
    with task.open("w") as f:
        for i in range(lines):
            line = {"input": f"{words[i % len(words)]} {i}", "target": words[(i * 7) % len(words)]}
            f.write(json.dumps(line) + "\n")
    return model_dir, task


def run_child(n: int, model_dir: Path, task: Path, store: Path, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", str(n), "--model-dir", str(model_dir),
           "--task", str(task), "--store", str(store), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=256, help="N of the small collect")
    ap.add_argument("--large", type=int, default=4096, help="N of the large collect")
    ap.add_argument("--lines", type=int, default=9000, help="lines of the synthetic JSONL task")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the children")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.model_dir, args.task, args.store, args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="ia2-memory-") as tmp:
        root = Path(tmp)
        model_dir, task = prepare(root, args.lines)
        small = run_child(args.small, model_dir, task, root / "store-small", args.threads)
        large = run_child(args.large, model_dir, task, root / "store-large", args.threads)
    from benchmarks._common import write_result

    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    for r in (small, large):  # what collect added on top of the imports and the loaded model
        r["collect_increment_mb"] = round(r["peak_rss_mb"] - r["peak_rss_mb_before_collect"], 1)
    write_result("memory", {
        "model": "tiny_llama (hidden 64, 4 layers)", "task_lines": args.lines, "k": K, "t": T,
        "shard_rows": SHARD_ROWS, "torch_threads_in_children": args.threads,
        "small": small, "large": large, "ratio": round(ratio, 4),
        "target": TARGET, "meets_target": ratio <= TARGET,
    })


if __name__ == "__main__":
    main()
