"""Collect: trace the ICL teacher once and write its activations to a cache.

For every row (a teacher prompt ``demos + query`` and its student prompt ``query``):

1. the response: the teacher's greedy continuation (``icl``; a batched, KV-cached
   ``generate``, cut after EOS or the stop string) or the gold target (``target``), at most T
   tokens;
2. one nnsight trace of the teacher over ``prompt + response[:-1]`` (the last response token
   is never an input at an aligned position), saving the chosen site of the chosen layers
   **gathered at the aligned positions inside the trace**, so whole sequences never leave it.
   The trace stops after the final norm: the top-k logits at the aligned positions come from
   the LM head applied to those positions only. With ``icl`` and T=1 the response token is
   that argmax, so collection is a single forward pass.

Rows are written shard by shard (a shard is one writer batch); a finished shard gets a ledger
entry. A rerun on a complete key does no model work; on a partial key it computes only the
missing shards. Micro-batches are fixed by the shard, so a resumed run computes bit-identical
values.

Launch: ``ia2cache collect --task sentiment_remap --n 16`` or ``ia2cache.collect(CollectConfig())``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ia2cache._faults import fault_point
from ia2cache.errors import IA2Error
from ia2cache.models import home, load_model, load_tokenizer
from ia2cache.padding import pad
from ia2cache.prompts import POSITION_MODES, PromptConfig, PromptPair, build_pairs, response_length
from ia2cache.sites import decoder_layers, get_site, parse_layers
from ia2cache.store import ArraySpec, Cache, cache_key, encode_activations
from ia2cache.tasks import DEFAULT_TASK, Task, is_single_token, load_task

log = logging.getLogger(__name__)

RESPONSE_MODES = ("icl", "target")
DTYPES = ("bf16", "fp16", "fp32")
SPLIT_CODES = {"train": 0, "dev": 1, "eval": 2}
PAD = -1
"""Fill value of ragged int arrays (token ids, positions)."""


def default_store() -> Path:
    return home() / "store"


@dataclass(frozen=True)
class CollectConfig:
    """What to collect. Everything but model/task source, batch size, shard rows and store
    goes into the cache key."""

    model: str = "default"
    """'default' (SmolLM2-135M-Instruct, offline), a local model directory, or a hub id."""
    task: str = DEFAULT_TASK
    """A built-in task name or a .jsonl file."""
    template: str | None = None
    """Override the task's prompt template (must contain {input})."""
    separator: str | None = None
    """Override the task's demo separator."""
    eval_fraction: float = 0.5
    """For .jsonl tasks: the share of examples held out for evaluation."""
    n: int = 16
    """Training examples (N) drawn from the pool; dev rows are the next min(N//2, 48)."""
    k: int | None = None
    """Demos per teacher prompt; None (auto) means min(N-1, 8)."""
    seed: int = 0
    """Data seed: picks the N examples and every row's demos."""
    response: str = "icl"
    """icl: the teacher's own greedy continuation; target: the gold target."""
    max_new_tokens: int | None = None
    """T, the response tokens aligned per row; None (auto): 1 for single-token tasks, else 16."""
    site: str = "attn"
    """Activation site: attn (after o_proj, before the residual add), resid, or mlp."""
    layers: str = "all"
    """Decoder layers to store: all, or indices and ranges like 0-5,7."""
    positions: str = "response"
    """response: positions predicting response tokens; query+response: every query token too."""
    dtype: str = "bf16"
    """Stored dtype: bf16 (bit exact as uint16), fp16 (refused on overflow) or fp32."""
    topk_logits: int = 0
    """Also store the teacher's top-K next-token log-probs at the aligned positions (0: none)."""
    batch_size: int = 8
    """Rows per teacher forward pass."""
    shard_rows: int = 32
    """Rows per shard: the unit of writing and of resuming. A multiple of chunk_rows."""
    chunk_rows: int = 8
    """Rows per chunk: the unit of reading and checksumming."""
    store: str | None = None
    """Store directory; default $IA2CACHE_HOME/store."""

    def __post_init__(self) -> None:
        if self.response not in RESPONSE_MODES:
            raise IA2Error(f"--response {self.response}: choose icl or target")
        if self.positions not in POSITION_MODES:
            raise IA2Error(f"--positions {self.positions}: choose {' or '.join(POSITION_MODES)}")
        if self.dtype not in DTYPES:
            raise IA2Error(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        get_site(self.site)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise IA2Error(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.topk_logits < 0:
            raise IA2Error(f"--topk-logits {self.topk_logits}: must be 0 or more")
        if self.batch_size < 1:
            raise IA2Error(f"--batch-size {self.batch_size}: must be at least 1")
        if self.chunk_rows < 1 or self.shard_rows < 1 or self.shard_rows % self.chunk_rows:
            raise IA2Error(
                f"--shard-rows {self.shard_rows}: must be a positive multiple of --chunk-rows "
                f"{self.chunk_rows}"
            )
        PromptConfig(n=self.n, k=self.k, seed=self.seed)

    @property
    def store_path(self) -> Path:
        return Path(self.store).expanduser() if self.store else default_store()


@dataclass
class CollectResult:
    cache: str
    key: str
    rows: int
    reused: bool
    status: str
    bytes_on_disk: int
    seconds: float
    shards_computed: int = 0
    rows_computed: int = 0
    tokens_computed: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("manifest")
        d["rows_per_s"] = round(self.rows_computed / self.seconds, 3) if self.seconds else None
        d["tokens_per_s"] = round(self.tokens_computed / self.seconds, 1) if self.seconds else None
        return d


Progress = Callable[[int, int, int], None]
"""Called after each shard with (rows done, rows total, teacher tokens processed)."""


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Plan:
    task: Task
    rows: tuple[PromptPair, ...]
    k: int
    t: int
    layers: list[int]
    p_slots: int
    key: str
    manifest: dict[str, Any]
    specs: list[ArraySpec]
    hidden: int


def _resolve_t(config: CollectConfig, task: Task, tokenizer: Any) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    return 1 if is_single_token(task, tokenizer) else 16


def _plan(config: CollectConfig, tokenizer: Any, info: Any, model_config: Any) -> _Plan:
    task = load_task(config.task, config.template, config.separator, config.eval_fraction)
    pairs = build_pairs(task, tokenizer, PromptConfig(n=config.n, k=config.k, seed=config.seed))
    rows = pairs.rows
    t = _resolve_t(config, task, tokenizer)
    n_layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    layers = parse_layers(config.layers, n_layers)
    limit = getattr(model_config, "max_position_embeddings", None)
    longest = max(rows, key=lambda p: len(p.teacher_ids))
    if limit is not None and len(longest.teacher_ids) + t > limit:
        raise IA2Error(
            f"row {longest.row} (example {longest.example_id}): teacher prompt of "
            f"{len(longest.teacher_ids)} tokens + --max-new-tokens {t} exceeds the model's "
            f"context of {limit}; lower --k or --max-new-tokens"
        )
    q_max = max(p.query_len for p in rows)
    p_slots = t if config.positions == "response" else q_max - 1 + t
    key_fields = {
        "model": {"fingerprint": info.fingerprint, "tokenizer": info.tokenizer_fingerprint},
        "task": {"content": task.content_hash, "template": task.template,
                 "separator": task.separator},
        "n": config.n, "k": pairs.k, "seed": config.seed,
        "response": config.response, "max_new_tokens": t, "stop": task.stop,
        "site": config.site, "layers": layers, "positions": config.positions,
        "dtype": config.dtype, "topk_logits": config.topk_logits,
    }
    key = cache_key(key_fields)
    manifest = {
        "model": {"name": info.name, "fingerprint": info.fingerprint,
                  "tokenizer_fingerprint": info.tokenizer_fingerprint,
                  "layers_total": n_layers, "hidden_size": hidden},
        "task": task.name,
        "task_info": {"content_hash": task.content_hash, "template": task.template,
                      "separator": task.separator, "stop": task.stop,
                      "pool": len(task.pool), "eval": len(task.eval)},
        "n": config.n, "k": pairs.k, "seed": config.seed, "n_train": len(pairs.train),
        "n_dev": len(pairs.dev), "response": config.response, "max_new_tokens": t,
        "site": config.site, "layers": layers, "positions": config.positions,
        "position_slots": p_slots, "dtype": config.dtype, "topk_logits": config.topk_logits,
        "key_fields": key_fields,
        "splits": {"0": "train", "1": "dev"},
        "pad": PAD,
        "how_to_read": _HOW_TO_READ,
    }
    specs = _array_specs(config, rows, t, layers, hidden, p_slots, pairs.k)
    return _Plan(task, rows, pairs.k, t, layers, p_slots, key, manifest, specs, hidden)


_HOW_TO_READ = " ".join("""
Row r of every array is one training pair. Student prompt: tokens/student_ids[r, :student_len[r]].
Teacher prompt: tokens/teacher_ids[r, :teacher_len[r]]. Response: tokens/response_ids[r, :response_len[r]]
(the teacher's greedy continuation, or the gold target). Activations: acts/<site>/layer_NNN[r, j] for
j < positions_len[r] were taken at teacher position tokens/teacher_positions[r, j] of teacher prompt +
response, and match student position tokens/student_positions[r, j] of student prompt + response.
uint16 arrays with attribute logical_dtype=bfloat16 hold bf16 bits (view as bfloat16). Pads are -1
(ints) or 0 (activations). rows/split: 0 train, 1 dev; rows/example_index and rows/demo_index index
the task pool (pool order as in the task files). logits/topk_values are the teacher's top-k
next-token log-probabilities (log_softmax over the full vocabulary) at the aligned positions,
logits/topk_ids their token ids.
""".split())


def _act_path(site: str, layer: int) -> str:
    return f"acts/{site}/layer_{layer:03d}"


def _array_specs(config: CollectConfig, rows: tuple[PromptPair, ...], t: int, layers: list[int],
                 hidden: int, p_slots: int, k: int) -> list[ArraySpec]:
    st = {"bf16": ("uint16", "bfloat16"), "fp16": ("float16", None), "fp32": ("float32", None)}
    dtype, logical = st[config.dtype]
    ls_max = max(len(p.student_ids) for p in rows)
    lt_max = max(len(p.teacher_ids) for p in rows)
    tg_max = max(len(p.target_ids) for p in rows)
    specs = [
        ArraySpec(_act_path(config.site, i), (p_slots, hidden), dtype, logical, stats=True)
        for i in layers
    ]
    specs += [
        ArraySpec("tokens/student_ids", (ls_max,), "int32"),
        ArraySpec("tokens/student_len", (), "int32"),
        ArraySpec("tokens/teacher_ids", (lt_max,), "int32"),
        ArraySpec("tokens/teacher_len", (), "int32"),
        ArraySpec("tokens/response_ids", (t,), "int32"),
        ArraySpec("tokens/response_len", (), "int32"),
        ArraySpec("tokens/target_ids", (tg_max,), "int32"),
        ArraySpec("tokens/target_len", (), "int32"),
        ArraySpec("tokens/teacher_positions", (p_slots,), "int32"),
        ArraySpec("tokens/student_positions", (p_slots,), "int32"),
        ArraySpec("tokens/positions_len", (), "int32"),
        ArraySpec("rows/example_index", (), "int32"),
        ArraySpec("rows/demo_index", (max(k, 1),), "int32"),
        ArraySpec("rows/split", (), "uint8"),
    ]
    if config.topk_logits:
        specs += [
            ArraySpec("logits/topk_values", (p_slots, config.topk_logits), "float32"),
            ArraySpec("logits/topk_ids", (p_slots, config.topk_logits), "int32"),
        ]
    return specs


# ----------------------------------------------------------------------------- teacher


@torch.no_grad()
def _generate(model: Any, tokenizer: Any, prompts: list[list[int]], t: int, stop: str) -> list[list[int]]:
    """Batched, KV-cached greedy continuation of each prompt (left padded for generate)."""
    pad_id = tokenizer.pad_token_id
    ids, mask = pad(prompts, pad_id, left=True, device=next(model.parameters()).device)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=t,
                         min_new_tokens=1, do_sample=False, pad_token_id=pad_id)
    new = out[:, width:].tolist()
    return [r[: response_length(tokenizer, r, stop)] for r in new]


class Teacher:
    """The base model wrapped by nnsight, tracing one micro-batch at a time.

    Counts forward passes (``forwards``) so tests can check that reuse does no model work.
    """

    def __init__(self, model: Any, tokenizer: Any, site: str, layers: list[int], topk: int) -> None:
        from nnsight import NNsight

        self.model, self.tok = model, tokenizer
        self.nn = NNsight(model)
        self.site = get_site(site)
        self.layers, self.topk = layers, topk
        self.forwards = 0
        self.tokens = 0
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(normed).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def run(self, pairs: list[PromptPair], t: int, response: str, positions: str, stop: str,
            p_slots: int) -> dict[str, Any]:
        """Responses, activations (B, P, H) per layer and optional top-k at aligned positions."""
        import nnsight

        one_pass = response == "icl" and t == 1
        if response == "target":
            resp = [list(p.target_ids[:t]) for p in pairs]
        elif one_pass:
            resp = [[] for _ in pairs]  # filled from this very trace's logits below
        else:
            resp = _generate(self.model, self.tok, [list(p.teacher_ids) for p in pairs], t, stop)
            self.forwards += t
        n_resp = [1 if one_pass else len(r) for r in resp]
        pos = [p.positions(n, positions) for p, n in zip(pairs, n_resp, strict=True)]
        # Input: prompt + response[:-1]; every aligned position lies inside it.
        seqs = [list(p.teacher_ids) + r[:-1] for p, r in zip(pairs, resp, strict=True)]
        ids, mask = pad(seqs, self.tok.pad_token_id)
        b = len(pairs)
        tpos = torch.zeros((b, p_slots), dtype=torch.long)
        for i, (tp, _) in enumerate(pos):
            tpos[i, : len(tp)] = torch.tensor(tp)
            tpos[i, len(tp) :] = tp[-1]  # repeat a valid position; zeroed after the trace
        dev = next(self.model.parameters()).device
        bi = torch.arange(b, device=dev)[:, None]
        pi = tpos.to(dev)
        need_logits = one_pass or self.topk > 0
        layers = decoder_layers(self.nn)
        with self.nn.trace(input_ids=ids.to(dev), attention_mask=mask.to(dev)) as tracer:
            acts = nnsight.save([self.site.module(layers[i]).output[bi, pi] for i in self.layers])
            if need_logits:
                normed = nnsight.save(self.nn.model.norm.output[bi, pi])
            tracer.stop()  # skip the LM head over every position
        self.forwards += 1
        self.tokens += int(mask.sum())
        valid = torch.zeros((b, p_slots), dtype=torch.bool)
        for i, (tp, _) in enumerate(pos):
            valid[i, : len(tp)] = True
        out: dict[str, Any] = {
            "acts": [a.masked_fill(~valid[..., None].to(a.device), 0) for a in acts],
            "positions": pos,
        }
        if need_logits:
            logits = self._logits(normed)
            if one_pass:
                last = torch.tensor([len(tp) - 1 for tp, _ in pos], device=dev)
                resp = [[int(x)] for x in logits[torch.arange(b), last].argmax(-1).tolist()]
            if self.topk:
                # Log-probabilities, not raw logits: with them the mass outside the top k is
                # known (1 - sum exp), which the tokl objective needs.
                v, ix = logits.log_softmax(-1).topk(self.topk, dim=-1)
                out["topk_values"] = v.masked_fill(~valid[..., None].to(dev), 0)
                out["topk_ids"] = ix.masked_fill(~valid[..., None].to(dev), PAD)
        out["responses"] = resp
        return out


# ----------------------------------------------------------------------------- rows -> arrays


def _ragged(seqs: list[list[int]] | list[tuple[int, ...]], width: int) -> np.ndarray:
    a = np.full((len(seqs), width), PAD, dtype=np.int32)
    for i, s in enumerate(seqs):
        a[i, : len(s)] = s
    return a


def _shard_data(plan: _Plan, config: CollectConfig, pairs: list[PromptPair],
                results: list[dict[str, Any]], pool_index: dict[str, int]) -> dict[str, np.ndarray]:
    resp = [r for res in results for r in res["responses"]]
    pos = [p for res in results for p in res["positions"]]
    specs = {s.path: s for s in plan.specs}
    data: dict[str, np.ndarray] = {}
    for j, layer in enumerate(plan.layers):
        t = torch.cat([res["acts"][j].cpu() for res in results])
        data[_act_path(config.site, layer)] = encode_activations(t, config.dtype)

    def width(path: str) -> int:
        return specs[path].shape[0]

    data["tokens/student_ids"] = _ragged([p.student_ids for p in pairs], width("tokens/student_ids"))
    data["tokens/student_len"] = np.array([len(p.student_ids) for p in pairs], dtype=np.int32)
    data["tokens/teacher_ids"] = _ragged([p.teacher_ids for p in pairs], width("tokens/teacher_ids"))
    data["tokens/teacher_len"] = np.array([len(p.teacher_ids) for p in pairs], dtype=np.int32)
    data["tokens/response_ids"] = _ragged(resp, plan.t)
    data["tokens/response_len"] = np.array([len(r) for r in resp], dtype=np.int32)
    data["tokens/target_ids"] = _ragged([p.target_ids for p in pairs], width("tokens/target_ids"))
    data["tokens/target_len"] = np.array([len(p.target_ids) for p in pairs], dtype=np.int32)
    data["tokens/teacher_positions"] = _ragged([tp for tp, _ in pos], plan.p_slots)
    data["tokens/student_positions"] = _ragged([sp for _, sp in pos], plan.p_slots)
    data["tokens/positions_len"] = np.array([len(tp) for tp, _ in pos], dtype=np.int32)
    data["rows/example_index"] = np.array([pool_index[p.example_id] for p in pairs], dtype=np.int32)
    data["rows/demo_index"] = _ragged(
        [[pool_index[d] for d in p.demo_ids] for p in pairs], width("rows/demo_index")
    )
    data["rows/split"] = np.array([SPLIT_CODES[p.split] for p in pairs], dtype=np.uint8)
    if config.topk_logits:
        data["logits/topk_values"] = torch.cat(
            [res["topk_values"].cpu() for res in results]).numpy().astype(np.float32)
        data["logits/topk_ids"] = torch.cat(
            [res["topk_ids"].cpu() for res in results]).numpy().astype(np.int32)
    return data


def _versions() -> dict[str, str]:
    out = {}
    for name in ("ia2cache", "torch", "transformers", "nnsight", "zarr", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# ----------------------------------------------------------------------------- entry point


def collect(config: CollectConfig, loaded: Any | None = None,
            progress: Progress | None = None) -> CollectResult:
    """Collect (or reuse, or resume) the teacher cache that ``config`` describes.

    Args:
        config: what to collect; its key fields name the cache.
        loaded: an already loaded model (``ia2cache.models.LoadedModel``); loaded on demand
            otherwise, and only when there is work to do.
        progress: called after each shard with (rows done, rows total, teacher tokens).

    Returns:
        Where the cache is, whether it was reused, and what the work cost.
    """
    t0 = time.perf_counter()
    if loaded is not None:
        tok, info, model_config = loaded.tokenizer, loaded.info, loaded.model.config
    else:
        from transformers import AutoConfig

        tok, info = load_tokenizer(config.model)
        model_config = AutoConfig.from_pretrained(info.path)
    plan = _plan(config, tok, info, model_config)
    store = config.store_path
    _check_store_writable(store)
    path = store / plan.key
    existing = Cache.open(path) if (path / "zarr.json").exists() else None
    if existing is not None and existing.status == "complete":
        log.info("cache %s is complete: reused, no model work", path)
        return CollectResult(str(path), plan.key, existing.n_rows, True, "complete",
                             existing.bytes_on_disk(), round(time.perf_counter() - t0, 3),
                             manifest=existing.manifest)
    rows_per_shard = existing.rows_per_shard if existing else config.shard_rows
    rows_per_chunk = existing.rows_per_chunk if existing else config.chunk_rows
    # Micro-batches are fixed per cache so that a resumed shard is computed bit-identically.
    batch_size = existing.manifest["about"]["batch_size"] if existing else config.batch_size
    about = {"batch_size": batch_size, "model_spec": config.model, "task_spec": config.task,
             "eval_fraction": config.eval_fraction}
    manifest = {**plan.manifest, "about": about, "versions": _versions()}
    cache = Cache.create_or_open(store, plan.key, manifest, plan.specs, len(plan.rows),
                                 rows_per_shard, rows_per_chunk)
    with cache.lock():
        missing = cache.missing_shards()
        if missing:
            log.info("collecting %d of %d shards into %s", len(missing), cache.n_shards, path)
            loaded = loaded or load_model(config.model)
            teacher = Teacher(loaded.model, tok, config.site, plan.layers, config.topk_logits)
        pool_index = {e.id: i for i, e in enumerate(plan.task.pool)}
        done_rows = cache.n_rows - sum(len(range(*cache.shard_rows(s))) for s in missing)
        if progress:
            progress(done_rows, cache.n_rows, 0)
        rows_computed = 0
        fault_point("collect.before_first_shard")
        for shard in missing:
            a, b = cache.shard_rows(shard)
            pairs = list(plan.rows[a:b])
            # Micro-batches of similar length waste less compute on padding; the order is a
            # pure function of the shard's rows, so a resumed shard batches identically.
            order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i].teacher_ids), i))
            by_len = [pairs[i] for i in order]
            results = [
                teacher.run(by_len[i : i + batch_size], plan.t, config.response, config.positions,
                            plan.task.stop, plan.p_slots)
                for i in range(0, len(by_len), batch_size)
            ]
            data = _shard_data(plan, config, by_len, results, pool_index)
            back = np.argsort(order)
            try:
                cache.write_shard(shard, {path: arr[back] for path, arr in data.items()})
            except OSError as exc:
                # Disk full, quota, read-only remount: the shard has no ledger entry, so the
                # cache stays partial and a rerun recomputes exactly the missing shards.
                raise IA2Error(
                    f"--store {store}: writing shard {shard} of {path} failed ({exc.strerror or exc}); "
                    f"the cache is left partial with {len(cache.done_shards())} of {cache.n_shards} "
                    "shards done: free space and rerun the same command to resume"
                ) from exc
            rows_computed += b - a
            done_rows += b - a
            if progress:
                progress(done_rows, cache.n_rows, teacher.tokens)
        seconds = round(time.perf_counter() - t0, 3)
        cache.finalize({"seconds": seconds})
        fault_point("collect.end")
    tokens = teacher.tokens if missing else 0
    return CollectResult(str(path), plan.key, cache.n_rows, False, cache.status,
                         cache.bytes_on_disk(), seconds, len(missing), rows_computed, tokens,
                         manifest=cache.manifest)


def _check_store_writable(store: Path) -> None:
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IA2Error(f"--store {store}: cannot create it ({exc.strerror})") from exc
    probe = store / ".ia2cache-write-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise IA2Error(f"--store {store}: not writable ({exc.strerror})") from exc
