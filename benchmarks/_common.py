"""Shared helpers for the benchmarks: machine description, result writing, bare greedy generation."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def write_result(name: str, obj: dict[str, Any]) -> None:
    """Print one JSON object on stdout and keep it under benchmarks/results/NAME.json."""
    obj = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **obj}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    print(json.dumps(obj, sort_keys=True))


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], t: int,
                    stop: str) -> list[list[int]]:
    """transformers' batched, KV-cached greedy ``generate`` (left padded), cut after EOS or the
    stop string: the bare model work of an ICL response, with no capture."""
    from ia2cache.padding import pad
    from ia2cache.prompts import response_length

    pad_id = tokenizer.pad_token_id
    ids, mask = pad(prompts, pad_id, left=True, device=next(model.parameters()).device)
    # stop_strings: generate, like collect, ends a batch once every row has hit the stop string.
    extra = {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=t, min_new_tokens=1,
                         do_sample=False, pad_token_id=pad_id, **extra)
    new = out[:, ids.shape[1]:].tolist()
    return [r[: response_length(tokenizer, r, stop)] for r in new]
