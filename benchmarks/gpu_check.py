"""GPU check: ia2cache's correctness and speed on one CUDA device, offline, at the paper's scale.

Runs on random-weight models (``random:smollm2-135m``, the default model's shape, and
``random:llama-3.2-1b``, the shape of the paper's smallest model; see ``ia2cache.models``), so
no weights travel: speed does not depend on trained weights. Three stages, each in its own
process under its own time limit inside one overall budget, each step of a stage guarded so
that a failing step never stops the next:

1. ``correctness`` (first model): versions and where each package was imported from; the bf16
   matmul peak; a bf16 collect (N=16, T=8) equals a plain batch-1 forward with hooks at the
   aligned positions, teacher-forced on the cached response, within bf16 rounding (relative L2
   error per layer <= ``TOLERANCE``), at the attention site and at the residual stream (where a
   control one position off must fail); ``verify`` finds nothing; a short act distill runs with
   finite losses.
2. ``speed`` (each model): collect against the reference strategy (batch 1, T full forwards,
   hooks; ``benchmarks.collect_vs_reference``) at T=1 and T=8: rows/s, tokens/s, speedup; collect
   against a bare batched ``generate`` (``benchmarks.capture_overhead``): capture overhead, at
   batch 8 and 32; achieved TFLOP/s (2 x non-embedding parameters x tokens, plus the LM head
   at the T predicting positions; attention scores left out, ~1% here) over the measured bf16
   matmul peak; the loader feeding a bf16 act distill step (``benchmarks.data_wait``): data-wait
   fraction, median step time, GB/s consumed, and a bare loader epoch's GB/s; peak GPU memory
   of every step.

Writes ``gpu_check.json`` (everything, with a ``summary``) and ``stage-*.json`` into ``--out``
(default ``benchmarks/results/gpu/``), and prints a summary. Exit status 0 when every step passed.

Launch: ``bash benchmarks/gpu_check.sh`` on the lent machine (it installs the bundle first), or
``python -m benchmarks.gpu_check [--out DIR] [--budget 420] [--device cuda] [--preset gpu|sim]
[--set rows=32] [--models random:smollm2-135m,random:llama-3.2-1b]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "gpu"
DEFAULT_MODELS = ("random:smollm2-135m", "random:llama-3.2-1b")
TOLERANCE = 2**-4
"""Largest relative L2 error per layer (||collect - forward|| / ||forward||) accepted as bf16
rounding: 16 ulps of bf16's 2^-8, for kernels that batch, pad and cache differently, through up
to 30 layers. The check must also see a misalignment: on the residual stream the same error one
position off (the control) must exceed twice this (~45% on random:smollm2-135m). On attention
outputs the control is reported only: random attention averages almost uniformly, so adjacent
positions differ by ~1% below layer 0."""
PACKAGES = ("torch", "transformers", "peft", "nnsight", "zarr", "numcodecs", "safetensors", "numpy",
            "google_crc32c", "pydantic", "huggingface_hub")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of every step; ``gpu`` for the lent machine, ``sim`` for the CPU simulation."""

    task: str = "antonyms"
    rows: int = 64
    """Rows of each collect-vs-reference run (N train + N//2 dev)."""
    k: int = 8
    ts: tuple[int, ...] = (1, 8)
    batch_sizes: tuple[int, ...] = (8, 32)
    """Collect micro-batches; the reference always runs at batch 1."""
    correct_n: int = 16
    correct_t: int = 8
    loader_n: int = 64
    loader_t: int = 8
    distill_steps: int = 24
    matmul_n: int = 8192
    matmul_iters: int = 100
    stage_limits: tuple[int, ...] = (110, 150)
    """Seconds for the correctness stage and the first speed stage; the last stage gets the rest."""


PRESETS = {
    "gpu": Preset(),
    "sim": Preset(rows=6, k=2, ts=(1, 2), batch_sizes=(2, 4), correct_n=4, correct_t=2, loader_n=4,
                  loader_t=2, distill_steps=2, matmul_n=64, matmul_iters=2, stage_limits=(300, 300)),
}


def preset(name: str, overrides: list[str]) -> Preset:
    """A preset with ``KEY=VALUE`` overrides (tuples as comma lists: ``ts=1,8``)."""
    p = PRESETS[name]
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(Preset)}:
            raise SystemExit(f"gpu_check: --set {item}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(f.name for f in dataclasses.fields(Preset))}")
        current = getattr(p, key)
        if isinstance(current, tuple):
            changes[key] = tuple(int(x) for x in value.split(","))
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(p, **changes)


# ----------------------------------------------------------------------------- stage helpers


class Recorder:
    """Runs the steps of one stage, keeping going when one fails, and rewrites the stage's JSON
    after every step, so that a stage killed by its time limit still leaves what it measured."""

    def __init__(self, path: Path, stage: str, model: str) -> None:
        self.path, self.data = path, {"stage": stage, "model": model, "steps": {}}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.path)

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        print(f"--- {self.data['stage']} {self.data['model']}: {name}", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
            rec = {"ok": bool(out.pop("ok", True)), **out}
        except Exception as exc:  # a failing step is recorded, and the next one still runs
            traceback.print_exc()
            rec, out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}, None
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        self.data["steps"][name] = rec
        self.save()
        print(f"--- {name}: {'ok' if rec['ok'] else 'FAILED'} ({rec['seconds']} s) "
              f"{json.dumps(rec, default=str)[:600]}", flush=True)
        return out

    def skip(self, name: str, reason: str) -> None:
        """Record a step that could not run (and why) without running it."""
        self.data["steps"][name] = {"ok": False, "error": f"not run: {reason}"}
        self.save()


def versions() -> dict[str, Any]:
    """Version and origin of every package the check imports (bundle or machine)."""
    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            where = getattr(mod, "__file__", None)
            out[name] = {"version": getattr(mod, "__version__", None),
                         "from": str(Path(where).parent) if where else None}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    out["cuda"] = {"available": cuda, "torch_cuda": torch.version.cuda,
                   "device": props.name if props else None,
                   "memory_gb": round(props.total_memory / 1e9, 1) if props else None}
    return out


def matmul_peak(device: Any, n: int, iters: int) -> dict[str, Any]:
    """Achieved bf16 TFLOP/s of square n x n matmuls: the denominator of the utilisation estimate."""
    import torch

    from benchmarks._common import sync

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    s = time.perf_counter() - t0
    return {"n": n, "iters": iters, "seconds": round(s, 4), "tflops": round(2 * n**3 * iters / s / 1e12, 3)}


def flops_per_token(model: Any) -> tuple[float, float]:
    """(2 x non-embedding parameters, 2 x LM-head parameters): forward FLOPs per token of the
    decoder body and of the LM head (collect applies the head only at predicting positions)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb.numel() - (0 if head is emb else head.numel())
    return 2.0 * body, 2.0 * head.numel()


def _utilisation(lm: Any, tokens: int, rows: int, t: int, seconds: float, peak: float | None) -> dict:
    body, head = flops_per_token(lm.model)
    tflops = (body * tokens + head * rows * t) / seconds / 1e12
    return {"achieved_tflops": round(tflops, 3),
            "utilisation": round(tflops / peak, 4) if peak else None}


# ----------------------------------------------------------------------------- correctness


def compare_with_forward(lm: Any, cache: Any, need_control: bool = False) -> dict[str, Any]:
    """Cached activations against a plain batch-1 forward over teacher prompt + cached response
    (teacher-forced), hooked at the cache's site, at each row's aligned positions; and, as a
    control, against the same forward one position earlier (``need_control``: that must differ
    by more than twice the tolerance, so that the comparison would see a misalignment)."""
    import torch

    from benchmarks._common import read_acts
    from ia2cache.sites import SITES, decoder_layers

    m, rows = cache.manifest, cache.n_rows
    names = ("teacher_ids", "teacher_len", "response_ids", "response_len", "teacher_positions",
             "positions_len")
    read = {k: cache.read(f"tokens/{k}", 0, rows) for k in names}
    layers = list(m["layers"])
    cached = {i: read_acts(cache, m["site"], i, 0, rows) for i in layers}
    modules = decoder_layers(lm.model)
    got: dict[int, torch.Tensor] = {}

    def hook(i: int) -> Callable[..., None]:
        return lambda _m, _a, o: got.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())

    hooks = [SITES[m["site"]].module(modules[i]).register_forward_hook(hook(i)) for i in layers]
    diff2 = dict.fromkeys(layers, 0.0)
    ctrl2 = dict.fromkeys(layers, 0.0)
    ref2 = dict.fromkeys(layers, 0.0)
    max_abs = 0.0
    try:
        with torch.no_grad():
            for r in range(rows):
                resp = [int(x) for x in read["response_ids"][r, : read["response_len"][r]]]
                seq = [int(x) for x in read["teacher_ids"][r, : read["teacher_len"][r]]] + resp[:-1]
                pos = torch.as_tensor(read["teacher_positions"][r, : read["positions_len"][r]]).long()
                lm.model(input_ids=torch.tensor([seq], device=lm.device))
                for i in layers:
                    ref = got[i][0, pos.to(got[i].device)].float().cpu()
                    off = got[i][0, (pos - 1).to(got[i].device)].float().cpu()  # the control
                    ours = cached[i][r, : len(pos)]
                    diff2[i] += float(((ours - ref) ** 2).sum())
                    ctrl2[i] += float(((ours - off) ** 2).sum())
                    ref2[i] += float((ref**2).sum())
                    max_abs = max(max_abs, float((ours - ref).abs().max()))
    finally:
        for h in hooks:
            h.remove()
    rel = {i: math.sqrt(diff2[i] / ref2[i]) if ref2[i] else 0.0 for i in layers}
    ctrl = {i: math.sqrt(ctrl2[i] / ref2[i]) if ref2[i] else 0.0 for i in layers}
    worst = max(rel, key=rel.get)
    sees = max(ctrl.values()) >= 2 * TOLERANCE
    return {"ok": rel[worst] <= TOLERANCE and (sees or not need_control), "site": m["site"],
            "rows": rows, "layers": len(layers),
            "tolerance": TOLERANCE, "max_rel_l2_error": float(f"{rel[worst]:.4g}"), "worst_layer": worst,
            "mean_rel_l2_error": float(f"{statistics.mean(rel.values()):.4g}"), "max_abs_diff": max_abs,
            "control_one_position_off_max_rel_l2": float(f"{max(ctrl.values()):.4g}"),
            "control_sees_misalignment": sees}


def stage_correctness(rec: Recorder, spec: str, device: str, p: Preset, tmp: Path) -> None:
    import torch

    from benchmarks._common import budget_kwargs, cuda_peak_mb
    from ia2cache.collect import CollectConfig, collect
    from ia2cache.distill import DistillConfig, distill
    from ia2cache.models import load_model
    from ia2cache.store import Cache

    rec.step("versions", versions)
    rec.step("matmul_peak", lambda: matmul_peak(device, p.matmul_n, p.matmul_iters))
    state: dict[str, Any] = {}

    def load() -> dict[str, Any]:
        cuda_peak_mb(device)
        lm = state["lm"] = load_model(spec, device=device, dtype=torch.bfloat16)
        assert next(lm.model.parameters()).dtype == torch.bfloat16
        return {"model": lm.info.to_dict(), "device": str(lm.device), "peak_gpu_mb": cuda_peak_mb(device)}

    def collect_step() -> dict[str, Any]:
        res = state["res"] = collect(CollectConfig(task=p.task, n=p.correct_n, max_new_tokens=p.correct_t,
                                                   store=str(tmp / "store")), state["lm"])
        return {**res.to_dict(), "peak_gpu_mb": cuda_peak_mb(device)}

    def resid_equal() -> dict[str, Any]:
        res = collect(CollectConfig(task=p.task, n=p.correct_n, max_new_tokens=p.correct_t, site="resid",
                                    store=str(tmp / "store")), state["lm"])
        out = compare_with_forward(state["lm"], Cache.open(res.cache), need_control=True)
        return {**out, "peak_gpu_mb": cuda_peak_mb(device)}

    def verify() -> dict[str, Any]:
        problems = [x.to_dict() for x in Cache.open(state["res"].cache).verify()]
        return {"ok": not problems, "problems": problems[:5]}

    def equal() -> dict[str, Any]:
        out = compare_with_forward(state["lm"], Cache.open(state["res"].cache))
        return {**out, "peak_gpu_mb": cuda_peak_mb(device)}

    def distill_step() -> dict[str, Any]:
        cfg = DistillConfig(cache=state["res"].cache, method="act", lr=1e-3, out=str(tmp / "run"),
                            device=device, **budget_kwargs(DistillConfig, 4))
        d = distill(cfg, state["lm"])
        losses = [h.get(k) for h in d.history for k in ("train_loss", "dev_loss")]
        finite = bool(losses) and all(x is None or math.isfinite(x) for x in losses)
        return {"ok": finite, "seconds_distill": d.seconds, "history": d.history[-3:],
                "peak_gpu_mb": cuda_peak_mb(device)}

    needs = {"load": (), "collect_bf16": ("lm",), "collect_equals_forward": ("lm", "res"),
             "resid_collect_equals_forward": ("lm",), "verify": ("res",), "distill_act": ("lm", "res")}
    steps = {"load": load, "collect_bf16": collect_step, "collect_equals_forward": equal,
             "resid_collect_equals_forward": resid_equal, "verify": verify, "distill_act": distill_step}
    for name, fn in steps.items():
        if all(k in state for k in needs[name]):
            rec.step(name, fn)
        else:
            rec.skip(name, "an earlier step failed")


# ----------------------------------------------------------------------------- speed


def stage_speed(rec: Recorder, spec: str, device: str, p: Preset, tmp: Path) -> None:
    import torch

    from benchmarks import capture_overhead, collect_vs_reference, data_wait
    from benchmarks._common import cuda_peak_mb, greedy_generate, sync
    from ia2cache.collect import CollectConfig, collect
    from ia2cache.loader import CacheLoader, LoaderConfig
    from ia2cache.models import load_model

    state: dict[str, Any] = {}
    peak = rec.step("matmul_peak", lambda: matmul_peak(device, p.matmul_n, p.matmul_iters)) or {}
    peak_tflops = peak.get("tflops")

    def load() -> dict[str, Any]:
        cuda_peak_mb(device)
        t0 = time.perf_counter()
        lm = state["lm"] = load_model(spec, device=device, dtype=torch.bfloat16)
        sync(device)
        seconds = time.perf_counter() - t0
        body, head = flops_per_token(lm.model)
        # Warm-up, untimed: CUDA context, kernels, nnsight's first trace, generate's first call.
        collect(CollectConfig(task=p.task, n=4, k=2, max_new_tokens=2, store=str(tmp / "warm")), lm)
        greedy_generate(lm.model, lm.tokenizer, [lm.tokenizer("warm up").input_ids], 2, "\n")
        return {"model": lm.info.to_dict(), "load_seconds": round(seconds, 2),
                "layers": lm.model.config.num_hidden_layers, "hidden": lm.model.config.hidden_size,
                "params": sum(x.numel() for x in lm.model.parameters()), "flops_per_token_body": body,
                "peak_gpu_mb": cuda_peak_mb(device)}

    def vs_reference(t: int) -> dict[str, Any]:
        out = collect_vs_reference.measure(state["lm"], p.task, p.rows, p.k, t, p.batch_sizes[0])
        state[f"ref_seconds_t{t}"] = out["reference_seconds"]
        util = _utilisation(state["lm"], out["tokens_computed"], out["rows"], t, out["ia2cache_seconds"],
                            peak_tflops)
        return {**out, **util, "peak_gpu_mb": cuda_peak_mb(device)}

    def vs_generate(t: int, batch: int) -> dict[str, Any]:
        lm, n = state["lm"], (2 * p.rows + 2) // 3
        t0 = time.perf_counter()
        bare = capture_overhead.bare(lm, p.task, n, p.k, t, batch, "aligned")
        bare_s = time.perf_counter() - t0
        bare_peak = cuda_peak_mb(device)
        ours_s, ours, res = capture_overhead.ours(lm, p.task, n, p.k, t, batch)
        ref_s = state.get(f"ref_seconds_t{t}")
        return {"t": t, "batch_size": batch, "rows": len(bare), "bare_seconds": round(bare_s, 3),
                "ours_seconds": round(ours_s, 3), "overhead": round(ours_s / bare_s - 1, 4),
                "responses_equal": f"{sum(a == b for a, b in zip(bare, ours, strict=True))}/{len(bare)}",
                "ours_rows_per_s": round(len(bare) / ours_s, 2), "tokens": res,
                "ours_tokens_per_s": round(res / ours_s, 1), "bare_tokens_per_s": round(res / bare_s, 1),
                "speedup_vs_reference": round(ref_s / ours_s, 2) if ref_s else None,
                **_utilisation(lm, res, len(bare), t, ours_s, peak_tflops),
                "bare_utilisation": _utilisation(lm, res, len(bare), t, bare_s, peak_tflops)["utilisation"],
                "peak_gpu_mb": {"bare": bare_peak, "ours": cuda_peak_mb(device)}}

    def loader_distill() -> dict[str, Any]:
        out = data_wait.measure(state["lm"], p.task, p.loader_n, p.loader_t, p.distill_steps, tmp / "dw",
                                collect_batch_size=p.batch_sizes[-1])
        state.pop("lm")  # peft wrapped it in place
        loader = CacheLoader(out["cache"], LoaderConfig(batch_size=32, split="train", shuffle=True))
        t0 = time.perf_counter()
        rows = sum(len(b.rows) for b in loader)
        s = time.perf_counter() - t0
        return {**out, "loader_epoch": {"rows": rows, "seconds": round(s, 4), "bytes_read": loader.bytes_read,
                                        "gb_per_s": round(loader.bytes_read / s / 1e9, 3) if s else None,
                                        "wait_seconds": round(loader.wait_seconds, 4)}}

    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [("load", load)]
    steps += [(f"collect_vs_reference_t{t}", lambda t=t: vs_reference(t)) for t in p.ts]
    steps += [(f"collect_vs_generate_t{t}_b{b}", lambda t=t, b=b: vs_generate(t, b))
              for t in p.ts for b in p.batch_sizes]
    steps += [("loader_distill", loader_distill)]
    for name, fn in steps:
        if name == "load" or "lm" in state:
            rec.step(name, fn)
        else:
            rec.skip(name, "the model did not load")


STAGES = {"correctness": stage_correctness, "speed": stage_speed}


def run_stage(args: argparse.Namespace) -> int:
    import torch

    p = preset(args.preset, args.set)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.require_cuda and not device.startswith("cuda"):
        raise SystemExit("gpu_check: no CUDA device (pass --device cpu --no-require-cuda to simulate)")
    rec = Recorder(Path(args.result), args.stage, args.model)
    rec.data.update(device=device, preset=args.preset)
    with tempfile.TemporaryDirectory(prefix=f"ia2-gpu-{args.stage}-") as tmp:
        STAGES[args.stage](rec, args.model, device, p, Path(tmp))
    rec.save()
    return 0 if all(s.get("ok") for s in rec.data["steps"].values()) else 1


# ----------------------------------------------------------------------------- orchestration


def _slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in model.split("/")[-1])[:60]


def orchestrate(args: argparse.Namespace) -> int:
    p = preset(args.preset, args.set)
    models = [m for m in args.models.split(",") if m]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = [("correctness", models[0])] + [("speed", m) for m in models]
    limits = list(p.stage_limits) + [10**6] * len(plan)
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    report: dict[str, Any] = {"preset": dataclasses.asdict(p), "models": models, "budget_s": args.budget,
                              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}
    for (stage, model), limit in zip(plan, limits, strict=False):
        name = f"{stage}:{model}"
        path = out_dir / f"stage-{stage}-{_slug(model)}.json"
        left = deadline - time.perf_counter()
        if left < 15:
            report["stages"][name] = {"status": "not run: out of time", "steps": {}}
            continue
        timeout = min(limit, left)
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", stage, "--model", model,
               "--result", str(path), "--preset", args.preset]
        cmd += [f"--set={x}" for x in args.set]
        cmd += ["--device", args.device] if args.device else []
        cmd += [] if args.require_cuda else ["--no-require-cuda"]
        print(f"=== [{time.perf_counter() - t_start:.0f} s] stage {name} (limit {timeout:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, timeout=timeout).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"steps": {}}
        report["stages"][name] = {**data, "status": status, "seconds": round(time.perf_counter() - t0, 1)}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["ok"] = all(s["status"] == "ok" for s in report["stages"].values())
    report["summary"] = summarize(report)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    print_summary(report)
    return 0 if report["ok"] else 1


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the README's GPU section quotes, one flat dict per table row."""
    out: dict[str, Any] = {"correctness": {}, "collect_vs_reference": [], "collect_vs_generate": [],
                           "loader_distill": [], "peak_gpu_mb": {}}
    for name, st in report["stages"].items():
        model = name.split(":", 1)[1]
        steps = st.get("steps", {})
        for step, rec in steps.items():
            if name.startswith("correctness"):
                keys = ("ok", "error", "max_rel_l2_error", "tolerance", "control_one_position_off_max_rel_l2",
                        "problems", "tflops")
                out["correctness"][step] = {k: rec.get(k) for k in keys if k in rec}
            elif step.startswith("collect_vs_reference") and rec.get("ok"):
                out["collect_vs_reference"].append({"model": model, **{k: rec.get(k) for k in (
                    "t", "batch_size", "rows", "ia2cache_rows_per_s", "ia2cache_tokens_per_s",
                    "reference_rows_per_s", "speedup", "utilisation")}})
            elif step.startswith("collect_vs_generate") and rec.get("ok"):
                out["collect_vs_generate"].append({"model": model, **{k: rec.get(k) for k in (
                    "t", "batch_size", "ours_tokens_per_s", "bare_tokens_per_s", "overhead",
                    "speedup_vs_reference", "achieved_tflops", "utilisation")}})
            elif step == "loader_distill" and rec.get("ok"):
                out["loader_distill"].append({"model": model, **{k: rec.get(k) for k in (
                    "data_wait_fraction", "step_seconds_median", "loader_gb_per_s_fed")},
                    "loader_epoch_gb_per_s": (rec.get("loader_epoch") or {}).get("gb_per_s")})
            peak = rec.get("peak_gpu_mb")
            if peak is not None and (not isinstance(peak, dict) or any(v is not None for v in peak.values())):
                out["peak_gpu_mb"][f"{model} {step}"] = rec["peak_gpu_mb"]
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print(f"\n{title}: no results")
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))
    width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print(f"\n{title}")
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(width[c]) for c in cols))


def print_summary(report: dict[str, Any]) -> None:
    s = report["summary"]
    print(f"\n===== GPU check: {'ALL OK' if report['ok'] else 'SOME STEPS FAILED'} in {report['seconds']} s "
          "(random-weight models: speed figures only; answers mean nothing)")
    for name, st in report["stages"].items():
        bad = [k for k, v in st.get("steps", {}).items() if not v.get("ok")]
        print(f"  {name:<40} {st['status']:<28} failed steps: {', '.join(bad) or 'none'}")
    _table("correctness", [{"step": k, **v} for k, v in s["correctness"].items()])
    _table("collect vs reference (batch 1, T full forwards, hooks)", s["collect_vs_reference"])
    _table("collect vs bare batched generate (capture overhead) and utilisation", s["collect_vs_generate"])
    _table("loader feeding a bf16 act distill step", s["loader_distill"])
    _table("peak GPU memory (MiB)", [{"step": k, "mb": v} for k, v in s["peak_gpu_mb"].items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated model specs; the first one also runs the correctness stage")
    ap.add_argument("--device", default=None, help="default: cuda")
    ap.add_argument("--require-cuda", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preset field, e.g. --set rows=32 --set ts=1,8")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all stages together")
    ap.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.exit(run_stage(args) if args.stage else orchestrate(args))


if __name__ == "__main__":
    main()
