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


# ----------------------------------------------------------------------------- model, device, store


def add_model_args(ap: Any, model: str = "default") -> None:
    """``--model`` (any ia2cache model spec, e.g. ``random:llama-3.2-1b``), ``--device``, ``--dtype``."""
    ap.add_argument("--model", default=model,
                    help="model spec: default, a directory, a hub id, or random:NAME (random weights)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="model dtype (auto: fp32 on CPU, bf16 on CUDA)")


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load(args: Any) -> Any:
    """The model named by :func:`add_model_args`' flags, loaded."""
    from ia2cache.models import load_model

    return load_model(args.model, device=args.device, dtype=TORCH_DTYPES.get(args.dtype))


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that wall-clock times include it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def model_dims(model: Any) -> tuple[int, int]:
    """(decoder layers, hidden size) of a loaded model."""
    return int(model.config.num_hidden_layers), int(model.config.hidden_size)


def read_acts(cache: Any, site: str, layer: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of one layer's cached activations as float32 ``(rows, P, hidden)``.

    Reads either store layout: one array per layer (``acts/<site>/layer_NNN``) or one per site
    (``acts/<site>``, shaped ``(rows, layers, P, hidden)`` over the manifest's layers).
    """
    from ia2cache.store import decode_activations

    per_layer = f"acts/{site}/layer_{layer:03d}"
    if per_layer in cache.specs:
        spec = cache.specs[per_layer]
        return decode_activations(cache.read(per_layer, start, stop), spec.logical_dtype).float()
    path = f"acts/{site}"
    spec = cache.specs[path]
    raw = cache.read(path, start, stop, layers=[layer])[:, 0]  # one read, that layer only
    if spec.scales:  # --dtype int8: the values times their per-vector scales
        from ia2cache.store import dequantize

        scales = cache.read(spec.scales, start, stop, layers=[layer])[:, 0]
        return dequantize(decode_activations(raw, spec.logical_dtype), torch.from_numpy(scales))
    return decode_activations(raw, spec.logical_dtype).float()


def budget_kwargs(config_cls: Any, steps: int) -> dict[str, int]:
    """DistillConfig keywords for a budget of ``steps`` optimizer steps with one evaluation at the
    end, whichever budget fields this version of DistillConfig has (``max_steps`` or ``epochs``)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    if "max_steps" in names:
        out = {"max_steps": steps}
        if "eval_every" in names:
            out["eval_every"] = steps
        return out
    return {"epochs": steps}


def cuda_peak_mb(device: torch.device | str, reset: bool = True) -> float | None:
    """Peak GPU memory allocated by torch since the last reset, in MiB (None off CUDA)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats(dev)
    return round(peak, 1)
