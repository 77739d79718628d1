"""Analyze: how ICL-like is an adapter's computation?

Two measurements, both cheap because the teacher was traced once into a cache:

**similarity** (``ia2cache analyze similarity``): the no-demo student (base model, or base model
plus an adapter) reads each cached row teacher-forced (student prompt + response[:-1]); the
cached site is captured at the cached layers with forward hooks and gathered at the student's
aligned positions; each vector ``s`` is compared with the teacher's cached vector ``t``:

- ``cosine``: the mean over rows and aligned positions of ``s·t / (|s| |t|)``;
- ``nmse`` (normalised MSE): the mean over rows and positions of ``||s - t||²`` divided by the
  teacher's variance at that layer, ``mean ||t - t̄||²`` with ``t̄`` the mean teacher vector of
  the layer over the same rows and positions. 0 means identical; 1 means no better than always
  answering the teacher's mean vector. One denominator per layer, shared by every position, so
  values by position are comparable. Where every row ends in the same template token the
  teacher varies little across rows at that position, and nmse can exceed 1 by far;
- ``rel_mse``: the same mean ``||s - t||²`` divided by the teacher's mean ``||t||²`` instead
  (relative squared error; 1 means as far as the zero vector).

Where a denominator is zero (the teacher does not vary at a layer, or is the zero vector there)
the value is undefined and written as JSON ``null``, per layer and per position; ``mean_nmse`` and
``mean_rel_mse`` are ``null`` when any layer's value is. The output stays valid JSON (no
``Infinity``/``NaN``).

Both are reported per layer (all positions) and per layer and response position (position t of
the response; rows whose response is shorter than t+1 do not count there). The base model is
the reference: an adapter that moved its computation toward ICL scores a higher cosine and a
lower nmse than the base. The ICL teacher itself scores cosine 1 and nmse 0 by construction.
Measure on an eval cache (``ia2cache collect --split eval``): its rows were never trained on.

**overlap** (``ia2cache analyze overlap``): for LoRA adapters, per layer and module, the overlap
of the top-r left singular subspaces of the weight updates ``ΔW = B·A``:
``||U1ᵀ U2||²_F / r``, 1 for the same subspace, 0 for orthogonal ones, about ``r / d_out`` for
random ones (reported as ``chance``). Weights are read from ``adapter_model.safetensors``.
``a2t`` starts from the ``act`` adapter, so their overlap is high by construction.

Launch: ``ia2cache analyze similarity --cache KEY --adapter DIR --out sweep/analysis`` or
``ia2cache.analyze.similarity(SimilarityConfig(cache=KEY, adapters=(DIR,)))``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ia2cache._io import write_json_atomic
from ia2cache.errors import IA2Error
from ia2cache.outputs import save_figure
from ia2cache.padding import pad
from ia2cache.sites import StopForward, capture
from ia2cache.store import (
    Cache,
    act_path,
    decode_activations,
    default_store,
    dequantize,
    location,
    resolve_cache,
)

log = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"
"""A sweep directory keeps analysis outputs in ``<sweep>/analysis/`` (similarity*.json, overlap*.json)."""


# ----------------------------------------------------------------------------- similarity


@dataclass(frozen=True)
class SimilarityConfig:
    """What to compare with the cached teacher."""

    cache: str
    """The cache (key in --store, or a directory); an eval cache (collect --split eval) is best."""
    adapters: tuple[str, ...] = ()
    """Adapter directories (distill outputs with run.json) to compare."""
    base: bool = True
    """Also measure the base model without an adapter (the reference point)."""
    model: str | None = None
    """Base model for the no-adapter reference; default the one the cache was collected with."""
    batch_size: int = 8
    """Rows per student forward pass."""
    store: str | None = None
    """Store directory or fsspec URL (s3://bucket/prefix) holding --cache; default $IA2CACHE_HOME/store."""
    device: str | None = None
    """Device (cpu, cuda); default cuda when available."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise IA2Error(f"--batch-size {self.batch_size}: must be at least 1")
        if not self.adapters and not self.base:
            raise IA2Error("nothing to measure: give --adapter DIR or keep the base model")


class _Tokens:
    """The cache's token arrays, read once (an eval cache is small)."""

    def __init__(self, cache: Cache) -> None:
        n = cache.n_rows

        def rd(path: str) -> np.ndarray:
            return cache.read(path, 0, n)

        self.student_ids, self.student_len = rd("tokens/student_ids"), rd("tokens/student_len")
        self.response_ids, self.response_len = rd("tokens/response_ids"), rd("tokens/response_len")
        self.student_pos, self.pos_len = rd("tokens/student_positions"), rd("tokens/positions_len")
        self.split = rd("rows/split")

    def sequences(self, rows: range) -> list[list[int]]:
        """Student prompt + response[:-1] for each row (what the teacher read, minus the demos)."""
        out = []
        for r in rows:
            prompt = self.student_ids[r, : self.student_len[r]].tolist()
            resp = self.response_ids[r, : self.response_len[r]].tolist()
            out.append(prompt + resp[:-1])
        return out


class _Sums:
    """Running sums for one model: per layer and per (layer, response position)."""

    def __init__(self, n_layers: int, t: int) -> None:
        self.cos = np.zeros(n_layers)
        self.sq = np.zeros(n_layers)
        self.count = 0
        self.cos_t = np.zeros((n_layers, t))
        self.sq_t = np.zeros((n_layers, t))
        self.count_t = np.zeros(t, dtype=np.int64)


def _teacher(cache: Cache, layers: list[int], site: str, start: int, stop: int) -> torch.Tensor:
    """(layers, rows, slots, hidden) float64 teacher activations of rows [start, stop): one read."""
    path = act_path(site)
    spec = cache.specs[path]
    values = decode_activations(cache.read(path, start, stop, layers=layers), spec.logical_dtype)
    scales = (torch.from_numpy(cache.read(spec.scales, start, stop, layers=layers)) if spec.scales else None)
    return dequantize(values, scales).double().transpose(0, 1)


def _response_slots(tok: _Tokens, r: int) -> list[int]:
    """Slot j of response position t: positions_len - response_len + t (the query slots of
    ``--positions query+response`` come first)."""
    first = int(tok.pos_len[r]) - int(tok.response_len[r])
    return [first + t for t in range(int(tok.response_len[r]))]


def _variance(cache: Cache, tok: _Tokens, layers: list[int], site: str,
              block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the variance mean ||t - t̄||² and the energy mean ||t||², over every valid
    (row, slot) of the cache."""
    s1: torch.Tensor | None = None
    s2 = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    for start in range(0, cache.n_rows, block):
        stop = min(start + block, cache.n_rows)
        t = _teacher(cache, layers, site, start, stop)
        valid = torch.tensor(
            [[j < tok.pos_len[r] for j in range(t.shape[2])] for r in range(start, stop)]
        )
        v = t[:, valid]  # (layers, valid vectors, hidden)
        s1 = v.sum(1) if s1 is None else s1 + v.sum(1)
        s2 += (v * v).sum((1, 2))
        count += v.shape[1]
    if s1 is None or count == 0:
        raise IA2Error(f"--cache {cache.path}: holds no rows (no teacher activations to compare with)")
    mean = s1 / count
    return (s2 / count - (mean * mean).sum(-1)).numpy(), (s2 / count).numpy()


@torch.no_grad()
def _measure(model: Any, pad_id: int, cache: Cache, tok: _Tokens, layers: list[int], site: str,
             batch_size: int, block: int, device: torch.device) -> _Sums:
    t_max = int(cache.manifest["max_new_tokens"])
    sums = _Sums(len(layers), t_max)
    hooks = capture(model, site, layers, stop_at=max(layers))
    try:
        for start in range(0, cache.n_rows, block):
            stop = min(start + block, cache.n_rows)
            teacher = _teacher(cache, layers, site, start, stop)
            for b0 in range(start, stop, batch_size):
                rows = range(b0, min(b0 + batch_size, stop))
                ids, mask = pad(tok.sequences(rows), pad_id, device=device)
                hooks.out.clear()
                with contextlib.suppress(StopForward):
                    model(input_ids=ids, attention_mask=mask)
                for li, layer in enumerate(layers):
                    h = hooks.out[layer]
                    shift = h.shape[1] - ids.shape[1]  # prompt tuning prepends virtual tokens
                    for r in rows:
                        n = int(tok.pos_len[r])
                        pos = torch.as_tensor(tok.student_pos[r, :n], dtype=torch.long, device=h.device)
                        s = h[r - b0, shift + pos].double().cpu()
                        t = teacher[li, r - start, :n]
                        cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
                        sq = ((s - t) ** 2).sum(-1)
                        sums.cos[li] += float(cos.sum())
                        sums.sq[li] += float(sq.sum())
                        slots = _response_slots(tok, r)
                        sums.cos_t[li, : len(slots)] += cos[slots].numpy()
                        sums.sq_t[li, : len(slots)] += sq[slots].numpy()
                for r in rows:
                    sums.count += int(tok.pos_len[r])
                    sums.count_t[: int(tok.response_len[r])] += 1
    finally:
        hooks.close()
    return sums


def _summary(sums: _Sums, var: np.ndarray, energy: np.ndarray) -> dict[str, Any]:
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = sums.cos / sums.count
        nmse = sums.sq / sums.count / var
        rel = sums.sq / sums.count / energy
        cos_t = sums.cos_t / sums.count_t
        nmse_t = sums.sq_t / sums.count_t / var[:, None]

    def clean(a: np.ndarray) -> list[Any]:
        return [None if not np.isfinite(x) else round(float(x), 6) for x in a]

    def mean(a: np.ndarray) -> float | None:  # null, not inf/nan (invalid JSON), if any layer is undefined
        return round(float(a.mean()), 6) if np.isfinite(a).all() else None

    return {
        "cosine": clean(cos), "nmse": clean(nmse), "rel_mse": clean(rel),
        "mean_cosine": mean(cos), "mean_nmse": mean(nmse), "mean_rel_mse": mean(rel),
        "by_position": {"cosine": [clean(row) for row in cos_t], "nmse": [clean(row) for row in nmse_t],
                        "rows": sums.count_t.tolist()},
        "vectors": sums.count,
    }


def _adapter_record(folder: Path) -> dict[str, Any]:
    from ia2cache.evaluate import read_run_record

    return read_run_record(folder, required=True)


def _method_info(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    cm = record.get("cache_manifest", {})
    cfg = record.get("config", {})
    return {"method": cfg.get("method", folder.name), "adapter": str(folder), "task": cm.get("task"),
            "n": cm.get("n"), "seed": cm.get("seed"), "lr": cfg.get("lr"),
            "adapter_type": cfg.get("adapter")}


def _labels(infos: list[dict[str, Any]]) -> None:
    """label = method, or method (N.., seed ..) where several entries share a method."""
    counts: dict[str, int] = {}
    for i in infos:
        counts[i["method"]] = counts.get(i["method"], 0) + 1
    for i in infos:
        i["label"] = i["method"] if counts[i["method"]] == 1 else f"{i['method']} N{i['n']} s{i['seed']}"


def _model_of(info: dict[str, Any], config: SimilarityConfig, cache: Cache,
              device: torch.device | None) -> tuple[Any, Any]:
    """(model, tokenizer) of one measured entry: the cache's own base model (its fingerprint
    checked), or an adapter on it."""
    from ia2cache.evaluate import load_adapter
    from ia2cache.models import load_model

    if info["adapter"] is not None:
        model, tokenizer, _ = load_adapter(info["adapter"], device=config.device)
        return model, tokenizer
    spec = config.model or cache.manifest.get("about", {}).get("model_spec", "default")
    fp = cache.manifest["model"]["fingerprint"]
    loaded = load_model(spec, device=device)
    if loaded.info.fingerprint != fp:
        raise IA2Error(f"--model {spec}: model {loaded.info.fingerprint} is not the cache's {fp}")
    return loaded.model.eval(), loaded.tokenizer


def similarity(config: SimilarityConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Cosine and normalised MSE between each model's activations and the cached teacher's.

    Args:
        config: the cache, the adapters and whether to include the base model.
        progress: called with a short message before each model is measured.

    Returns:
        JSON-ready: the cache's description, the metric definitions, the teacher's per-layer
        variance and one entry per model (``methods``) with per-layer and per-position values.
    """
    t0 = time.perf_counter()
    store = location(config.store or default_store())  # a directory or an fsspec URL
    cache = Cache.open(resolve_cache(store, config.cache))
    m = cache.manifest
    if cache.status != "complete":
        raise IA2Error(f"--cache {cache.path}: is {cache.status}, not complete; run `ia2cache collect` again")
    if m.get("split", "train") != "eval":
        log.warning("cache %s holds train/dev rows, not eval rows: adapters were trained on them",
                    cache.path)
    folders = [Path(a).expanduser() for a in config.adapters]
    records = [_adapter_record(f) for f in folders]
    fp = m["model"]["fingerprint"]
    for f, rec in zip(folders, records, strict=True):
        theirs = rec.get("cache_manifest", {}).get("model", {}).get("fingerprint")
        if theirs is not None and theirs != fp:
            raise IA2Error(f"--adapter {f}: trained on model {theirs}, but the cache holds model {fp}")
    layers, site = list(m["layers"]), m["site"]
    tok = _Tokens(cache)
    block = cache.rows_per_shard
    var, energy = _variance(cache, tok, layers, site, block)
    device = torch.device(config.device) if config.device else None
    infos = ([{"method": "base", "adapter": None, "task": m["task"], "n": 0, "seed": 0, "lr": None,
               "adapter_type": None}] if config.base else [])
    infos += [_method_info(f, r) for f, r in zip(folders, records, strict=True)]
    _labels(infos)
    results = []
    for info in infos:
        if progress:
            progress(info["label"])
        model, tokenizer = _model_of(info, config, cache, device)
        dev = next(model.parameters()).device
        sums = _measure(model, tokenizer.pad_token_id, cache, tok, layers, site, config.batch_size,
                        block, dev)
        results.append({**info, **_summary(sums, var, energy)})
        del model
    return {
        "cache": str(cache.path), "key": cache.key, "task": m["task"], "n": m["n"], "k": m["k"],
        "seed": m["seed"], "split": m.get("split", "train"), "rows": cache.n_rows, "site": site,
        "layers": layers, "max_new_tokens": m["max_new_tokens"], "positions": m["positions"],
        "model": m["model"]["name"],
        "metrics": {
            "cosine": "mean over rows and aligned positions of cos(student, teacher)",
            "nmse": "mean over rows and positions of ||student - teacher||^2 divided by the teacher's "
                    "per-layer variance mean ||teacher - mean teacher||^2 (0 identical, 1 = as far as "
                    "the teacher's mean vector)",
            "rel_mse": "mean ||student - teacher||^2 divided by the teacher's mean ||teacher||^2 "
                       "(relative squared error; 1 = as far as the zero vector)",
        },
        "teacher_variance": [round(float(v), 6) for v in var],
        "teacher_energy": [round(float(v), 6) for v in energy],
        "methods": results,
        "config": asdict(config),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def three_places(x: float | None) -> str:
    """A metric with 3 decimals, or "–" where it is undefined (null in the JSON)."""
    return "–" if x is None else f"{x:.3f}"


def plot_similarity(result: dict[str, Any], path: Path) -> Path:
    """Cosine and nmse vs layer, one line per model; the ICL teacher is cosine 1 / nmse 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for entry in result["methods"]:
        style = {"color": "grey", "ls": "--"} if entry["method"] == "base" else {}
        axes[0].plot(layers, [np.nan if v is None else v for v in entry["cosine"]], marker=".",
                     label=f"{entry['label']} (mean {three_places(entry['mean_cosine'])})", **style)
        axes[1].plot(layers, [np.nan if v is None else v for v in entry["nmse"]], marker=".",
                     label=f"{entry['label']} (mean {three_places(entry['mean_nmse'])})", **style)
    axes[0].axhline(1.0, color="black", lw=0.8, ls=":", label="ICL teacher")
    axes[0].set_ylabel("cosine similarity to ICL teacher")
    axes[1].set_ylabel("nMSE to ICL teacher (÷ teacher variance)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['task']}: {result['site']} activations vs the ICL teacher "
                 f"(k={result['k']}, {result['rows']} {result['split']} rows, {result['model']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- overlap


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _lora_updates(folder: Path) -> tuple[dict[str, Any], dict[tuple[int, str], torch.Tensor]]:
    """adapter_config.json and {(layer, module): ΔW = B·A} from adapter_model.safetensors."""
    from safetensors.torch import load_file

    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise IA2Error(f"--adapter {folder}: no adapter_config.json (not an adapter directory)")
    cfg = json.loads(cfg_file.read_text())
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise IA2Error(f"--adapter {folder}: is a {cfg.get('peft_type')} adapter; overlap needs LoRA")
    if not weights.is_file():
        raise IA2Error(f"--adapter {folder}: no adapter_model.safetensors")
    tensors = load_file(str(weights))
    out: dict[tuple[int, str], torch.Tensor] = {}
    for name, a in tensors.items():
        if not name.endswith("lora_A.weight"):
            continue
        b = tensors.get(name.replace("lora_A.weight", "lora_B.weight"))
        match = _LAYER_RE.search(name)
        if b is None or match is None:
            continue
        module = name.split(".lora_A")[0].rsplit(".", 1)[-1]
        out[(int(match.group(1)), module)] = b.double() @ a.double()
    if not out:
        raise IA2Error(f"--adapter {weights}: no lora_A/lora_B weight pairs found")
    return cfg, out


def _top_left(delta: torch.Tensor, r: int) -> torch.Tensor | None:
    """The top left singular vectors of ΔW: r of them, fewer if ΔW has lower rank, None if 0."""
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    if s[0] <= 1e-12:
        return None
    rank = int((s > s[0] * 1e-6).sum())
    return u[:, : min(r, rank)]


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 6)


def subspace_overlap(u1: torch.Tensor, u2: torch.Tensor) -> float:
    """||U1ᵀ U2||²_F / min(r1, r2) for orthonormal columns: 1 same subspace, 0 orthogonal."""
    return float((u1.T @ u2).pow(2).sum() / min(u1.shape[1], u2.shape[1]))


def overlap(adapters: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Pairwise subspace overlap of LoRA updates, per layer and module and on average.

    Args:
        adapters: LoRA adapter directories (adapter_config.json + adapter_model.safetensors;
            run.json, when present, names the method).
    """
    from ia2cache.evaluate import read_run_record

    if len(adapters) < 1:
        raise IA2Error("--adapter: give at least one LoRA adapter directory")
    t0 = time.perf_counter()
    folders = [Path(a).expanduser() for a in adapters]
    infos, bases = [], []
    for f in folders:
        cfg, deltas = _lora_updates(f)
        r = int(cfg.get("r", 8))
        bases.append({key: _top_left(d, r) for key, d in deltas.items()})
        rec = read_run_record(f)
        info = _method_info(f, rec) if rec else {"method": f.name, "adapter": str(f), "n": None, "seed": None}
        info["r"] = r
        infos.append(info)
    _labels(infos)
    k = len(folders)
    matrix = np.full((k, k), np.nan)
    pairs = []
    for i in range(k):
        for j in range(i, k):
            common = sorted(set(bases[i]) & set(bases[j]))
            vals = {key: subspace_overlap(bases[i][key], bases[j][key]) for key in common
                    if bases[i][key] is not None and bases[j][key] is not None}
            if not vals:
                continue
            modules = sorted({mod for _, mod in vals})
            layers = sorted({layer for layer, _ in vals})
            # E||U1ᵀU2||² = r1·r2/d for random subspaces; divided by min(r1, r2).
            chance = float(np.mean([max(bases[i][key].shape[1], bases[j][key].shape[1])
                                    / bases[i][key].shape[0] for key in vals]))
            matrix[i, j] = matrix[j, i] = float(np.mean(list(vals.values())))
            pairs.append({
                "a": infos[i]["label"], "b": infos[j]["label"], "mean": round(matrix[i, j], 6),
                "chance": round(chance, 6), "compared": len(vals),
                "by_module": {mod: _mean([v for (_, m2), v in vals.items() if m2 == mod]) for mod in modules},
                "by_layer": {str(ly): _mean([v for (l2, _), v in vals.items() if l2 == ly]) for ly in layers},
            })
    return {
        "adapters": infos,
        "labels": [i["label"] for i in infos],
        "matrix": [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in matrix],
        "pairs": pairs,
        "definition": "per layer and module: ||U1^T U2||_F^2 / r, U the top-r left singular vectors of "
                      "B·A; averaged over the layers and modules both adapters hold. chance ~ r/d_out",
        "seconds": round(time.perf_counter() - t0, 3),
    }


def plot_overlap(result: dict[str, Any], path: Path) -> Path:
    """Heatmap of the pairwise mean overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = result["labels"]
    m = np.array([[np.nan if x is None else x for x in row] for row in result["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.0 * len(labels) + 2))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                        color="black" if m[i, j] > 0.5 else "white", fontsize=9)
    chance = [p["chance"] for p in result["pairs"]]
    fig.colorbar(im, ax=ax, fraction=0.046)
    title = "LoRA update subspace overlap ||U1ᵀU2||²/r"
    ax.set_title(title + (f"\n(chance ≈ {np.mean(chance):.3f})" if chance else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def check_name(name: str) -> str:
    """A ``--name`` file stem: refused (IA2Error) when empty, or with a path separator or ``..``,
    which would write outside ``--out``."""
    if not name or name.strip() != name or "/" in name or "\\" in name or ".." in name or "\0" in name:
        raise IA2Error(f"--name {name!r}: give a plain file stem (no '/', '\\' or '..'); "
                       "the files go in --out")
    return name


def save_result(result: dict[str, Any], out: str | Path, name: str, kind: str) -> dict[str, str]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.png`` (kind: similarity or overlap)."""
    from ia2cache.outputs import LOCK, OutputLock, claim_output_dir

    check_name(name)
    # A folder that is new, empty or analyze's own; one writer at a time.
    folder = claim_output_dir(out, "--out", kind="analyze")
    with OutputLock(folder / LOCK, "--out"):
        json_path = folder / f"{name}.json"
        write_json_atomic(json_path, result)
        png = (plot_similarity if kind == "similarity" else plot_overlap)(result, folder / f"{name}.png")
    return {"json": str(json_path), "png": str(png)}


def default_name(result: dict[str, Any]) -> str:
    """``similarity-<task>-n<N>-s<seed>``: one file per eval cache, as the report expects."""
    return f"similarity-{result['task']}-n{result['n']}-s{result['seed']}"


# ----------------------------------------------------------------------------- report


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("skipping unreadable %s", path)
        return None


def report_section(folder: Path, rows: list[dict[str, Any]]) -> tuple[str, list[Path]]:
    """Markdown and plots for ``ia2cache report``, from ``<folder>/analysis/`` if present.

    Each similarity*.json gives a table (mean and a few layers) and its PNG; every model entry
    that matches a results.jsonl row on (task, method, N, seed) becomes a point of a scatter of
    mean cosine vs accuracy and ECE (equal-mass). ``rows`` are results.jsonl rows as read (not
    relabelled ``train->eval``); only in-distribution rows (no ``eval_task``, or the training task
    itself) are matched: the similarity is measured on the training task's eval cache, so an OOD
    accuracy of the same adapter is not its counterpart.
    """
    adir = folder / ANALYSIS_DIR
    sims = [(p, d) for p in sorted(adir.glob("similarity*.json")) if (d := _load_json(p)) is not None]
    ovls = [(p, d) for p in sorted(adir.glob("overlap*.json")) if (d := _load_json(p)) is not None]
    if not sims and not ovls:
        return "", []
    lines = ["## How ICL-like are the adapters?\n"]
    for path, sim in sims:
        layers = sim["layers"]
        picks = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
        lines.append(f"**{sim['task']} (N={sim['n']}, seed {sim['seed']}, k={sim['k']}): {sim['site']} "
                     f"activations on {sim['rows']} {sim['split']} rows vs the ICL teacher** "
                     "(cosine ↑, normalised MSE ↓)\n")
        lines.append("| model | mean cosine | mean nMSE | " + " | ".join(f"cos L{i}" for i in picks) + " |")
        lines.append("|---|---|---|" + "---|" * len(picks))
        for e in sim["methods"]:
            cells = [three_places(e["cosine"][layers.index(i)]) for i in picks]
            means = f"{three_places(e['mean_cosine'])} | {three_places(e['mean_nmse'])}"
            lines.append(f"| {e['label']} | {means} | " + " | ".join(cells) + " |")
        png = path.with_suffix(".png")
        if png.is_file():
            lines.append(f"\n![similarity]({png.relative_to(folder)})")
        lines.append("")
    for path, ov in ovls:
        labels = ov["labels"]
        lines.append(f"**LoRA subspace overlap** ({path.name}; a2t starts from act, so that pair is high "
                     "by construction)\n")
        lines.append("| | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        for lab, row in zip(labels, ov["matrix"], strict=True):
            lines.append(f"| {lab} | " + " | ".join("–" if x is None else f"{x:.3f}" for x in row) + " |")
        png = path.with_suffix(".png")
        if png.is_file():
            lines.append(f"\n![overlap]({png.relative_to(folder)})")
        lines.append("")
    pngs = _scatter([d for _, d in sims], rows, folder)
    for p in pngs:
        lines.append(f"![similarity vs metrics]({p.relative_to(folder)})\n")
    return "\n".join(lines), pngs


def _eval_task(row: dict[str, Any]) -> str:
    """The task a results.jsonl row was scored on: its eval_task (sweep --eval-task), else its task."""
    return row.get("eval_task") or row["task"]


def scatter_points(sims: list[dict[str, Any]], rows: list[dict[str, Any]]
                   ) -> dict[str, list[tuple[str, float, dict[str, Any]]]]:
    """By task: (method, mean cosine, results.jsonl row) for each similarity entry with a matching
    in-distribution row on (task, scored task, method, N, seed). An OOD row (sweep --eval-task: same
    task, method, N and seed) never pairs with a similarity measured on the training task."""
    by_key = {(r["task"], _eval_task(r), r["method"], r["n"], r["seed"]): r for r in rows
              if _eval_task(r) == r["task"]}
    points: dict[str, list[tuple[str, float, dict[str, Any]]]] = {}
    for sim in sims:
        for e in sim["methods"]:
            task = e.get("task") or sim["task"]
            r = by_key.get((task, task, e["method"], e["n"], e["seed"]))
            if r is not None and e.get("mean_cosine") is not None:
                points.setdefault(sim["task"], []).append((e["method"], e["mean_cosine"], r))
    return points


def _scatter(sims: list[dict[str, Any]], rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    points = scatter_points(sims, rows)
    if not points:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, pts in sorted(points.items()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        methods = sorted({m for m, _, _ in pts})
        for metric, ax in zip(("accuracy", "ece_equal_mass"), axes, strict=True):
            for m in methods:
                xs = [c for mm, c, _ in pts if mm == m]
                ys = [r.get(metric) for mm, _, r in pts if mm == m]
                ax.scatter(xs, [np.nan if y is None else y for y in ys], label=m)
            ax.set_xlabel("mean cosine similarity to the ICL teacher (eval rows)")
            ax.set_ylabel("accuracy" if metric == "accuracy" else "ECE (15 equal-mass bins)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task}: activation similarity vs accuracy and calibration "
                     "(each point: one model, N, seed)")
        fig.tight_layout()
        path = folder / f"{task}_similarity_vs_metrics.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
