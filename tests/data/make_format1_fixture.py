"""Rebuild ``format1_caches.tar.gz``: real store-format-1 caches for the migrate tests.

Format 1 (one zarr array per layer, ``acts/<site>/layer_NNN``) is what ia2cache wrote up to
commit 853cc6d; this ia2cache no longer writes it, so the fixture was made by that commit's own
code, with the tiny test model:

    git archive 853cc6d ia2cache cli | tar -x -C /tmp/v1src
    PYTHONPATH=/tmp/v1src python tests/data/make_format1_fixture.py tests/data/format1_caches.tar.gz

It holds a store with two caches of a 20-example JSONL task (8 train + 4 dev rows, T=2 from the
teacher, chunks of 2 rows, shards of 4): a complete bf16 cache with top-k logits and a partial
fp32 cache (killed before the ledger entry of its second shard), and ``fixture.json`` naming both
keys and the model and task they were made from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def main(out: str) -> None:
    from ia2cache.testing import tiny_llama, tiny_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="format1-"))
    tok = tiny_tokenizer()
    model_dir = tmp / "model"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    task = tmp / "task.jsonl"
    words = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy", "ocean", "forest"]
    task.write_text("".join(json.dumps({"input": f"{w} {i}", "target": words[(i * 3) % 10]}) + "\n"
                            for i, w in enumerate(words * 2)))
    store = tmp / "store"
    common = ["collect", "--model", str(model_dir), "--task", str(task), "--n", "8", "--dev", "4",
              "--max-new-tokens", "2", "--chunk-rows", "2", "--shard-rows", "4", "--batch-size", "4",
              "--store", str(store), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IA2CACHE_HOME": str(tmp / "home")}
    done = subprocess.run([sys.executable, "-m", "cli", *common, "--topk-logits", "3"], env=env,
                          capture_output=True, text=True, check=True)
    complete = json.loads(done.stdout)["key"]
    killed = subprocess.run([sys.executable, "-m", "cli", *common, "--dtype", "fp32"],
                            env={**env, "IA2CACHE_FAULT": "store.before_ledger:2"}, capture_output=True,
                            text=True)
    assert killed.returncode != 0, killed.stderr
    partial = next(p.name for p in store.iterdir() if p.name != complete)
    (store / partial / ".lock").unlink(missing_ok=True)
    (store / complete / ".lock").unlink(missing_ok=True)
    meta = {"complete": complete, "partial": partial, "made_by": "ia2cache 853cc6d (store format 1)",
            "task": task.read_text()}
    (tmp / "fixture.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    with tarfile.open(out, "w:gz") as tar:
        tar.add(store, arcname="store")
        tar.add(tmp / "fixture.json", arcname="fixture.json")
    print(json.dumps(meta))


if __name__ == "__main__":
    main(sys.argv[1])
