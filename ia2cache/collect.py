"""Collect: trace the ICL teacher once and write its activations to a cache.

For every row (a teacher prompt ``demos + query`` and its student prompt ``query``):

1. the response: the teacher's greedy continuation (``icl``), stopping at EOS or the stop
   string, or the gold target (``target``), at most T tokens;
2. the chosen site of the chosen layers, **gathered at the aligned positions inside nnsight
   traces**, so whole sequences never leave them:
   - ``icl`` with T > 1: the capture happens inside the batched, KV-cached greedy decode
     itself (a traced prefill over the left-padded prompts, then one traced one-token step per
     response token), so the response costs what ``generate`` costs and there is no second
     pass. The values equal a teacher-forced pass over ``prompt + response[:-1]`` within fp32
     rounding (tested against a plain forward with hooks and against ``generate``).
   - ``target``, and ``icl`` with T=1: one teacher-forced trace over ``prompt + response[:-1]``
     (the last response token is never an input at an aligned position); with ``icl`` and
     T=1 the response token is that pass's argmax.
   Traces stop after the final norm: logits (for the greedy token and the optional top-k
   log-probs) come from the LM head applied at the aligned positions only.

Rows are written shard by shard (a shard is one writer batch); a finished shard gets a ledger
entry. A rerun on a complete key does no model work; on a partial key it computes only the
missing shards. Micro-batches are fixed by the shard, so a resumed run computes bit-identical
values.

Launch: ``ia2cache collect --task sentiment_remap --n 16`` or ``ia2cache.collect(CollectConfig())``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ia2cache import distributed
from ia2cache._faults import fault_point
from ia2cache.errors import IA2Error, check_float, check_int
from ia2cache.models import load_model, load_tokenizer
from ia2cache.padding import pad
from ia2cache.prompts import (
    DEFAULT_DEV,
    DEFAULT_POSITIONS,
    PromptConfig,
    PromptPair,
    build_eval_pairs,
    build_pairs,
    check_positions,
    eos_ids,
    response_length,
)
from ia2cache.sites import check_site, decoder_layers, get_site, parse_layers
from ia2cache.store import (
    ACT_DTYPES,
    ArraySpec,
    Cache,
    Location,
    act_path,
    cache_arrays,
    cache_key,
    default_store,
    encode_activations,
    how_to_read,
    layout,
    location,
    scale_path,
)
from ia2cache.tasks import DEFAULT_TASK, Task, is_single_token, load_task

log = logging.getLogger(__name__)

RESPONSE_MODES = ("icl", "target")
DTYPES = tuple(ACT_DTYPES)
SPLIT_CODES = {"train": 0, "dev": 1, "eval": 2, "unlabelled": 3}
PAD = -1
"""Fill value of ragged int arrays (token ids, positions)."""


@dataclass(frozen=True)
class CollectConfig:
    """What to collect. Everything but model/task source, batch size, shard rows and store
    goes into the cache key."""

    model: str = "default"
    """'default' (SmolLM2-135M-Instruct, offline), a local model directory, a .gguf file (converted
    once to safetensors under $IA2CACHE_HOME/models), a hub id, or random:NAME (random weights)."""
    task: str = DEFAULT_TASK
    """A built-in task name or a .jsonl file."""
    template: str | None = None
    """Override the task's prompt template (must contain {input})."""
    separator: str | None = None
    """Override the task's demo separator."""
    eval_fraction: float = 0.5
    """For .jsonl tasks: the share of examples held out for evaluation."""
    n: int = 16
    """Training examples (N) drawn from the pool."""
    dev: int = DEFAULT_DEV
    """Dev rows D drawn from the pool after the N (disjoint from train and eval): they choose the
    lr and the stopping step; reports call them extra labelled data ("N train + D dev")."""
    unlabelled: int = 0
    """M unlabelled teacher rows (rows/split 3): queries from the pool after the N train and D dev
    rows (their targets dropped; they repeat with fresh demos when M exceeds them) or from
    --unlabelled-file, each with k demos from the N labelled rows. Only activation phases (act,
    a2t's first) train on them."""
    unlabelled_file: str | None = None
    """A JSONL of {"input": ...} lines (no target) to draw the unlabelled queries from; with it,
    --unlabelled 0 means one row per line."""
    k: int | None = None
    """Demos per teacher prompt; None (auto) means min(N-1, 8)."""
    seed: int = 0
    """Data seed: picks the N examples and every row's demos."""
    split: str = "train"
    """train: the N train rows plus dev rows (for distill); eval: the task's eval rows, each with k
    demos drawn (seeded) from the pool, as ICL evaluation sees them (for `analyze similarity`)."""
    n_eval: int | None = None
    """With --split eval: the first n_eval eval rows (all if None)."""
    response: str = "icl"
    """icl: the teacher's own greedy continuation; target: the gold target."""
    max_new_tokens: int | None = None
    """T, the response tokens aligned per row; None (auto): 1 for single-token tasks, else 16."""
    site: str = "attn"
    """Activation site: attn (o_proj output), attn_out (what attention adds to the residual: after the
    post-norm on Gemma), resid (layer output), mlp, or mlp_out; per architecture: `collect --help`, README."""
    layers: str = "all"
    """Decoder layers to store: all, or indices and ranges like 0-5,7."""
    positions: str = DEFAULT_POSITIONS
    """response: positions predicting response tokens; query+response: every query token too."""
    dtype: str = "bf16"
    """Stored dtype: bf16 (bit exact as uint16), fp16 (refused on overflow), fp32, or int8 (lossy:
    one float32 absmax scale per (row, layer, position), |error| <= max|x|/254, ~1 byte a value)."""
    topk_logits: int = 0
    """Also store the teacher's top-K next-token log-probs at the aligned positions (0: none)."""
    batch_size: int = 8
    """Rows per teacher forward pass."""
    shard_rows: int = 32
    """Rows per shard: the unit of writing and of resuming. A multiple of chunk_rows."""
    chunk_rows: int = 8
    """Rows per chunk: the unit of reading and checksumming."""
    store: str | None = None
    """Store directory or fsspec URL (s3://bucket/prefix); default $IA2CACHE_HOME/store."""
    repair: bool = False
    """Verify an existing cache first and recompute exactly its damaged shards (checksum mismatch,
    a missing, unreadable or special shard file, a lost ledger entry), so that it ends as a clean
    run leaves it; damage recomputing cannot fix (a manifest that does not produce its key) is
    refused. Not part of the key."""
    plan: bool = False
    """Plan only, write nothing: rows, aligned positions, bytes on disk for --dtype, the free space
    on the store's filesystem, and with --probe an estimated time (``plan_collect``). A real
    collect refuses (exit 2) to start a cache its store has no room for. Not part of the key."""
    probe: bool = False
    """With --plan: load the model and time one micro-batch of median-length rows to estimate the
    collection time (the first call pays one-off costs, so the estimate errs high). Not part of the key."""

    def __post_init__(self) -> None:
        if self.response not in RESPONSE_MODES:
            raise IA2Error(f"--response {self.response}: choose icl or target")
        check_positions(self.positions)
        if self.dtype not in DTYPES:
            raise IA2Error(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        get_site(self.site)
        # Every number bounded before anything is allocated or written (the model's own limits,
        # context and vocabulary, are checked in the plan).
        if self.max_new_tokens is not None:
            check_int(self.max_new_tokens, "--max-new-tokens", 1, 32_768)
        check_int(self.topk_logits, "--topk-logits", 0, 1_000_000)
        check_int(self.batch_size, "--batch-size", 1, 4096)
        check_int(self.n, "--n", 2, 10_000_000)
        check_int(self.dev, "--dev", 1, 100_000)
        check_int(self.chunk_rows, "--chunk-rows", 1, 65_536)
        check_int(self.shard_rows, "--shard-rows", 1, 1_048_576)
        check_float(self.eval_fraction, "--eval-fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        if self.n_eval is not None:
            check_int(self.n_eval, "--n-eval", 1, 10_000_000)
        if self.shard_rows % self.chunk_rows:
            raise IA2Error(
                f"--shard-rows {self.shard_rows}: must be a positive multiple of --chunk-rows "
                f"{self.chunk_rows}"
            )
        PromptConfig(n=self.n, k=self.k, seed=self.seed, dev=self.dev, unlabelled=self.unlabelled)
        if (self.unlabelled or self.unlabelled_file) and self.response != "icl":
            raise IA2Error(f"--response {self.response}: unlabelled rows have no target; "
                           "they need --response icl")
        if (self.unlabelled or self.unlabelled_file) and self.split != "train":
            raise IA2Error("--unlabelled: only for --split train caches (the rows distill trains on)")
        if self.split not in ("train", "eval"):
            raise IA2Error(f"--split {self.split}: choose train or eval")
        if self.n_eval is not None and (self.split != "eval" or self.n_eval < 1):
            raise IA2Error(f"--n-eval {self.n_eval}: needs --split eval and at least 1")

    @property
    def store_path(self) -> Location:
        """The store: a local folder, or a remote prefix for an fsspec URL (``s3://b/p``)."""
        return location(self.store if self.store else default_store())


@dataclass
class CollectResult:
    """What a collect did (``to_dict`` is its ``--json``)."""

    cache: str
    """The cache's folder or URL (``<store>/<key>``)."""
    key: str
    """The cache key: a hash of every key field of the config, resolved (see ``NON_KEY``)."""
    rows: int
    """Rows in the cache (train, unlabelled and dev; or eval)."""
    reused: bool
    """True when the cache was already complete: no model work was done."""
    status: str
    """``complete``, ``partial`` (a rank of a failed job) or ``planned`` (``--plan``)."""
    bytes_on_disk: int
    seconds: float
    """Wall seconds of this call."""
    shards_computed: int = 0
    """Shards this call computed (every rank's, under torchrun)."""
    rows_computed: int = 0
    tokens_computed: int = 0
    """Teacher tokens run through the model (prompts and decode steps)."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The cache's manifest (left out of ``to_dict``)."""
    plan: dict[str, Any] | None = None
    """With ``CollectConfig.plan``: ``CollectPlan.to_dict()`` (status is then ``planned``)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("manifest")
        if d["plan"] is None:
            d.pop("plan")
        d["rows_per_s"] = round(self.rows_computed / self.seconds, 3) if self.seconds else None
        d["tokens_per_s"] = round(self.tokens_computed / self.seconds, 1) if self.seconds else None
        return d


Progress = Callable[[int, int, int], None]
"""Called after each shard with (rows done, rows total, teacher tokens processed)."""


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Plan:
    """What a collect will write, resolved from its config, the tokenizer and the model config."""

    task: Task
    rows: tuple[PromptPair, ...]
    """Every row of the cache in stored order (train | unlabelled | dev, or the eval rows)."""
    demos: int
    """k, the demos in each teacher prompt."""
    response_tokens: int
    """T, the most response tokens aligned per row."""
    layers: list[int]
    position_slots: int
    """P, the aligned positions stored per row and layer (T, or query length - 1 + T)."""
    key: str
    manifest: dict[str, Any]
    specs: list[ArraySpec]
    hidden: int

    @cached_property
    def pool_index(self) -> dict[str, int]:
        """Example id -> index in the task pool (what ``rows/example_index`` stores); built once
        per collect, not per shard."""
        return {e.id: i for i, e in enumerate(self.task.pool)}


def _resolve_t(config: CollectConfig, task: Task, tokenizer: Any) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if task.card.get("max_new_tokens"):  # multi-token tasks name their response length T
        return int(task.card["max_new_tokens"])
    return 1 if is_single_token(task, tokenizer) else 16


def _plan(config: CollectConfig, tokenizer: Any, info: Any, model_config: Any) -> _Plan:
    task = load_task(config.task, config.template, config.separator, config.eval_fraction)
    queries, queries_hash = None, None
    m = config.unlabelled
    if config.unlabelled_file:
        from ia2cache.tasks import load_unlabelled

        queries, queries_hash = load_unlabelled(config.unlabelled_file)
        m = m or len(queries)
    pairs = build_pairs(task, tokenizer, PromptConfig(n=config.n, k=config.k, seed=config.seed,
                                                      dev=config.dev, unlabelled=m), queries)
    rows = pairs.rows
    if config.split == "eval":
        # Same k and the same N training rows as the train cache: the teacher that ICL evaluation
        # scores (ia2cache eval --icl --n N --seed S) and that distill aligns to.
        rows = tuple(build_eval_pairs(task, tokenizer, pairs.k, config.seed, config.n_eval, n=config.n))
    t = _resolve_t(config, task, tokenizer)
    n_layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    layers = parse_layers(config.layers, n_layers)
    q_max = max(p.query_len for p in rows)
    p_slots = t if config.positions == "response" else q_max - 1 + t
    _check_model_limits(config, model_config, rows, t, p_slots * hidden * len(layers))
    key_fields = _key_fields(config, {
        "model": {"fingerprint": info.fingerprint, "tokenizer": info.tokenizer_fingerprint},
        "task": {"content": task.content_hash, "template": task.template, "separator": task.separator},
        "template": _FOLDED, "separator": _FOLDED, "eval_fraction": _FOLDED,  # in "task"
        "k": pairs.k, "dev": len(pairs.dev), "max_new_tokens": t, "layers": layers,
        # Only for eval caches, and only with unlabelled rows: other caches keep their old keys.
        "split": "eval" if config.split == "eval" else _FOLDED,
        "n_eval": len(rows) if config.split == "eval" else _FOLDED,
        "unlabelled": m or _FOLDED, "unlabelled_file": _FOLDED,  # in "unlabelled_queries"
    }, stop=task.stop, sft_labels=_SFT_LABELS[t > 1],
        **({"unlabelled_queries": queries_hash or "pool"} if m else {}))
    key = cache_key(key_fields)
    manifest = _manifest(config, task, info, pairs, rows, key_fields, n_layers, hidden, t, layers,
                         p_slots)
    specs = _array_specs(config, rows, t, layers, hidden, p_slots, pairs.k)
    return _Plan(task, rows, pairs.k, t, layers, p_slots, key, manifest, specs, hidden)


def _manifest(config: CollectConfig, task: Task, info: Any, pairs: Any, rows: tuple[PromptPair, ...],
              key_fields: dict[str, Any], n_layers: int, hidden: int, t: int, layers: list[int],
              p_slots: int) -> dict[str, Any]:
    """What the cache's manifest says about how it was made (its ``key_fields`` among them)."""
    m = len(pairs.unlabelled)
    manifest = {
        "model": {"name": info.name, "fingerprint": info.fingerprint,
                  "tokenizer_fingerprint": info.tokenizer_fingerprint,
                  "layers_total": n_layers, "hidden_size": hidden},
        "task": task.name,
        "task_info": {"content_hash": task.content_hash, "template": task.template,
                      "separator": task.separator, "stop": task.stop,
                      "pool": len(task.pool), "eval": len(task.eval)},
        "n": config.n, "k": pairs.k, "seed": config.seed, "n_train": len(pairs.train),
        "n_dev": len(pairs.dev), "n_unlabelled": len(pairs.unlabelled),
        "distinct_unlabelled": pairs.distinct_unlabelled, "sft_labels": _SFT_LABELS[t > 1],
        "response": config.response, "max_new_tokens": t,
        "site": config.site, "layers": layers, "positions": config.positions,
        "position_slots": p_slots, "dtype": config.dtype, "topk_logits": config.topk_logits,
        "key_fields": key_fields,
        "splits": {"0": "train", "1": "dev", **({"3": "unlabelled"} if m else {})},
        "pad": PAD,
        "how_to_read": how_to_read(config.site, config.dtype),
    }
    if config.split == "eval":  # train manifests stay as they were, so old partial caches resume
        manifest.update(split="eval", n_train=0, n_dev=0, n_eval=len(rows), splits={"2": "eval"},
                        how_to_read=how_to_read(config.site, config.dtype, "eval"))
    return manifest


def _check_model_limits(config: CollectConfig, model_config: Any, rows: tuple[PromptPair, ...], t: int,
                        values_per_row: int) -> None:
    """Refuse, before anything is allocated, what the model cannot do or a shard cannot hold."""
    limit = getattr(model_config, "max_position_embeddings", None)
    longest = max(rows, key=lambda p: len(p.teacher_ids))
    if limit is not None and len(longest.teacher_ids) + t > limit:
        raise IA2Error(
            f"row {longest.row} (example {longest.example_id}): teacher prompt of "
            f"{len(longest.teacher_ids)} tokens + --max-new-tokens {t} exceeds the model's "
            f"context of {limit}; lower --k or --max-new-tokens"
        )
    vocab = getattr(model_config, "vocab_size", None)
    if config.topk_logits and isinstance(vocab, int) and config.topk_logits > vocab:
        raise IA2Error(f"--topk-logits {config.topk_logits}: more than the model's vocabulary "
                       f"({vocab} tokens)")
    # One shard is computed and buffered whole (fp32) before it is written: bound it before any
    # allocation, and never let a huge --shard-rows become a cache's stored geometry.
    shard = min(config.shard_rows, -(-len(rows) // config.chunk_rows) * config.chunk_rows)
    need = shard * values_per_row * 4
    if need > SHARD_BYTES_MAX:
        raise IA2Error(
            f"--shard-rows {config.shard_rows}: a shard of {shard} rows buffers {need / 2**30:.1f} GiB of "
            f"activations (limit {SHARD_BYTES_MAX / 2**30:.0f} GiB); lower --shard-rows"
        )


NON_KEY: dict[str, str] = {
    "batch_size": "rows per forward: fixed per cache (resumes batch alike); not a value's cause",
    "shard_rows": "the unit of writing", "chunk_rows": "the unit of reading",
    "store": "where the cache lives", "repair": "how to resume", "plan": "writes nothing",
    "probe": "writes nothing",
}
"""CollectConfig fields that do not change a cached value, with why: the cache key hashes every
other field (``_key_fields``), so a new field is part of the key unless declared here."""

_FOLDED = object()
"""A key field whose value another key entry already carries (or that a mode leaves out)."""


def _key_fields(config: CollectConfig, resolved: dict[str, Any], **derived: Any) -> dict[str, Any]:
    """What names a cache: every field of ``config`` but :data:`NON_KEY`, at its resolved value
    (``resolved[name]``: the model's fingerprints for its spec, the layer list for ``all``...;
    ``_FOLDED`` where another entry carries it), plus ``derived`` facts of the plan."""
    out: dict[str, Any] = {}
    for f in fields(config):
        if f.name in NON_KEY:
            continue
        value = resolved.get(f.name, getattr(config, f.name))
        if value is not _FOLDED:
            out[f.name] = value
    return {**out, **derived}


SHARD_BYTES_MAX = 4 * 2**30
"""The most activation memory one shard may buffer (fp32, before encoding)."""

_SFT_LABELS = {False: "target", True: "target+stop"}
"""What tokens/target_ids hold: with T > 1 the gold target then the stop ids (EOS where the task
has no stop string), so SFT learns to stop where the teacher's responses stop."""


def _array_specs(config: CollectConfig, rows: tuple[PromptPair, ...], t: int, layers: list[int],
                 hidden: int, p_slots: int, k: int) -> list[ArraySpec]:
    return cache_arrays(
        site=config.site, n_layers=len(layers), slots=p_slots, hidden=hidden, dtype=config.dtype,
        rows_per_chunk=config.chunk_rows, student_len=max(len(p.student_ids) for p in rows),
        teacher_len=max(len(p.teacher_ids) for p in rows), t=t,
        target_len=max(len(p.label_ids(t)) for p in rows), k=k, topk=config.topk_logits,
    )


# ----------------------------------------------------------------------------- plan before paying


@dataclass(frozen=True)
class CollectPlan:
    """What a collect would compute and store, before any of it is paid for (``plan_collect``)."""

    cache: str
    key: str
    status: str
    """absent, partial or complete: the cache as it stands in the store now."""
    rows: int
    rows_to_compute: int
    """Rows in the shards still missing (all rows for a new cache, 0 for a complete one)."""
    position_slots: int
    """Aligned positions stored per row (T, or query + T with query+response)."""
    positions: int
    """rows x position_slots: the activation vectors stored per layer (icl rows that stop early
    pad theirs with zeros)."""
    layers: int
    hidden: int
    dtype: str
    teacher_tokens: int
    """Prompt tokens the teacher reads over all rows (the response tokens come on top)."""
    bytes_activations: int
    bytes_on_disk: int
    """Every array at its stored dtype, uncompressed, as collect writes them (plus each chunk's
    4-byte crc32c and each shard's index, well under 1%)."""
    bytes_needed: int
    """bytes_on_disk for the rows still to compute: what the store must have free."""
    free_bytes: int | None
    """Free space on the store's filesystem; None where it cannot be known (s3://, ...)."""
    probe_rows: int = 0
    probe_seconds: float | None = None
    estimated_seconds: float | None = None
    """probe_seconds x the micro-batches still to compute; None without --probe."""

    @property
    def fits(self) -> bool | None:
        return None if self.free_bytes is None else self.bytes_needed <= self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def _free_bytes(store: Location) -> int | None:
    """Free bytes on the filesystem a local store lives on (its nearest existing ancestor)."""
    return location(store).free_bytes()


def _geometry(config: CollectConfig, n_rows: int, existing: Cache | None) -> tuple[int, int]:
    """(rows per shard, rows per chunk): a resumed cache keeps its own; a shard never holds more
    rows than the cache (whole chunks)."""
    if existing is not None:
        return existing.rows_per_shard, existing.rows_per_chunk
    return min(config.shard_rows, -(-n_rows // config.chunk_rows) * config.chunk_rows), config.chunk_rows


def _disk_bytes(specs: list[ArraySpec], rows: int, geometry: tuple[int, int]) -> int:
    """Bytes ``rows`` rows take on disk as collect writes them (uncompressed): whole chunks (the
    last one padded), each with its crc32c, and each shard's index (an entry per chunk slot, then
    its crc32c); an upper bound but for metadata and the ledger."""
    shard, chunk = geometry
    row_chunks, shards = -(-rows // chunk), -(-rows // shard)
    total = 0
    for spec in specs:
        padded = int(np.prod(spec.shard_trailing, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        trailing = zip(spec.shard_trailing, spec.chunk_trailing, strict=True)
        per_row_chunk = math.prod(s // c for s, c in trailing)
        total += row_chunks * (chunk * padded + per_row_chunk * layout.CHUNK_CRC_BYTES)
        total += shards * (shard // chunk * per_row_chunk * layout.INDEX_ENTRY_BYTES + layout.CHUNK_CRC_BYTES)
    return total


def _act_bytes(specs: list[ArraySpec]) -> int:
    """Bytes of activation values one row holds."""
    return sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
               for s in specs if s.path.startswith("acts/"))


def _rows_to_compute(existing: Cache | None, n_rows: int) -> int:
    if existing is None:
        return n_rows
    if existing.status == "complete":
        return 0
    return sum(b - a for a, b in map(existing.shard_rows, existing.missing_shards()))


def _probe(config: CollectConfig, plan: _Plan, loaded: Any) -> tuple[int, float]:
    """Time one micro-batch of median-length rows, as collect would run it."""
    teacher = Teacher(loaded.model, loaded.tokenizer, config.site, plan.layers, config.topk_logits)
    by_len = sorted(plan.rows, key=lambda p: len(p.teacher_ids))
    mid = max(0, len(by_len) // 2 - config.batch_size // 2)
    batch = by_len[mid : mid + config.batch_size]
    t0 = time.perf_counter()
    _run_teacher(teacher, plan, config, batch)
    return len(batch), time.perf_counter() - t0


def plan_collect(config: CollectConfig, loaded: Any | None = None) -> CollectPlan:
    """What ``collect(config)`` would compute and store, without writing anything.

    Reads the tokenizer and the model config only (no weights, no forward), unless
    ``config.probe``: then the model is loaded (or ``loaded`` used) and one micro-batch is timed.
    """
    tok, info, model_config = _model_parts(config, loaded)
    plan = _plan(config, tok, info, model_config)
    store = config.store_path
    path = store / plan.key
    existing = Cache.open(path) if (path / "zarr.json").exists() else None
    rows = len(plan.rows)
    todo = _rows_to_compute(existing, rows)
    geometry = _geometry(config, rows, existing)
    probe_rows, probe_s, est = 0, None, None
    if config.probe and todo:
        loaded = loaded or load_model(config.model)
        probe_rows, probe_s = _probe(config, plan, loaded)
        est = round(probe_s * -(-todo // config.batch_size), 1)
        probe_s = round(probe_s, 3)
    return CollectPlan(
        cache=str(path), key=plan.key, status=existing.status if existing else "absent", rows=rows,
        rows_to_compute=todo, position_slots=plan.position_slots, positions=rows * plan.position_slots,
        layers=len(plan.layers), hidden=plan.hidden, dtype=config.dtype,
        teacher_tokens=sum(len(p.teacher_ids) for p in plan.rows),
        bytes_activations=rows * _act_bytes(plan.specs),
        bytes_on_disk=_disk_bytes(plan.specs, rows, geometry),
        bytes_needed=_disk_bytes(plan.specs, todo, geometry),
        free_bytes=_free_bytes(store), probe_rows=probe_rows, probe_seconds=probe_s, estimated_seconds=est,
    )


def _check_room(store: Location, need: int, rows: int, config: CollectConfig) -> None:
    """Refuse, before the cache is created, a collect whose store cannot hold it."""
    free = _free_bytes(store)
    if free is None or need <= free:
        return
    raise IA2Error(
        f"--store {store}: the cache needs up to {need / 1e9:.2f} GB for {rows} rows at --dtype "
        f"{config.dtype} (uncompressed) but its filesystem has {free / 1e9:.2f} GB free; free space, "
        "pick another --store, or store less (--dtype bf16, --layers, --n, --max-new-tokens); "
        "`ia2cache collect --plan` prints the sizes"
    )


# ----------------------------------------------------------------------------- teacher


class Teacher:
    """The base model wrapped by nnsight, tracing one micro-batch at a time.

    Counts forward passes (``forwards``) so tests can check that reuse does no model work.
    """

    def __init__(self, model: Any, tokenizer: Any, site: str, layers: list[int], topk: int) -> None:
        from nnsight import NNsight

        self.model, self.tok = model, tokenizer
        self.nn = NNsight(model)
        check_site(model, site)
        self.site = get_site(site)
        self.layers, self.topk = layers, topk
        self.forwards = 0
        self.tokens = 0
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        params = inspect.signature(model.forward).parameters  # the traced call
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.eos = eos_ids(model, tokenizer)

    def _greedy(self, logits: torch.Tensor, first: bool) -> list[int]:
        """Greedy next tokens; at the first response token EOS is barred (``min_new_tokens=1``)."""
        if first and self.eos:
            logits = logits.clone()
            logits[:, self.eos] = float("-inf")
        return [int(x) for x in logits.argmax(-1).tolist()]

    def _finished(self, ids: list[int], stop: str) -> bool:
        """Whether the response ``ids`` has just ended: at EOS, or with the stop string."""
        return ids[-1] in self.eos or bool(stop and stop in self.tok.decode(ids, skip_special_tokens=True))

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

        if response == "icl" and t > 1:
            return self._run_decoding(pairs, t, positions, stop, p_slots)
        one_pass = response == "icl"
        # icl's single token comes from this very trace's logits, below.
        resp = [[] for _ in pairs] if one_pass else [list(p.label_ids(t)[:t]) for p in pairs]
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
                resp = [[x] for x in self._greedy(logits[torch.arange(b), last], first=True)]
            if self.topk:
                # Log-probabilities, not raw logits: with them the mass outside the top k is
                # known (1 - sum exp), which the tokl objective needs.
                v, ix = logits.log_softmax(-1).topk(self.topk, dim=-1)
                out["topk_values"] = v.masked_fill(~valid[..., None].to(dev), 0)
                out["topk_ids"] = ix.masked_fill(~valid[..., None].to(dev), PAD)
        out["responses"] = resp
        return out


    def _cache_kwargs(self, cache: Any) -> dict[str, Any]:
        # transformers renames ``past_key_values`` to ``cache`` during 5.x.
        return {self._cache_arg: cache, "use_cache": True}

    @torch.no_grad()
    def _run_decoding(self, pairs: list[PromptPair], t: int, positions: str, stop: str,
                      p_slots: int) -> dict[str, Any]:
        """``icl`` with T > 1: capture inside the batched, KV-cached greedy decode itself.

        The prefill (prompts left padded, positions from the mask) gives every aligned position
        inside the prompt, its last position included; decode step j feeds response token j-1
        and gives aligned position ``len(prompt) - 1 + j``. These are the activations that a
        teacher-forced pass over ``prompt + response[:-1]`` computes (same tokens, same
        positions; equal within fp32 rounding, tested), at the cost of the generation alone.
        Greedy as ``generate(min_new_tokens=1)``: EOS is barred at the first step only; the
        loop ends when every row has reached EOS or the stop string.
        """
        state = self._prefill(pairs, t, positions)
        gen = [[x] for x in self._greedy(state.first_logits, first=True)]
        done = [self._finished(g, stop) for g in gen]
        dec_acts: list[list[torch.Tensor]] = []
        dec_normed: list[torch.Tensor] = []
        for _step in range(1, t):
            if all(done):
                break
            acts, normed = self._step(state, [g[-1] for g in gen])
            dec_acts.append(acts)
            dec_normed.append(normed)
            for i, x in enumerate(self._greedy(self._logits(normed), first=False)):
                if not done[i]:
                    gen[i].append(x)
                    done[i] = self._finished(gen[i], stop)
        resp = [g[: response_length(self.tok, g, stop, self.eos)] for g in gen]
        pos = [p.positions(len(r), positions) for p, r in zip(pairs, resp, strict=True)]
        valid = torch.zeros((len(pairs), p_slots), dtype=torch.bool, device=state.mask.device)
        for i, (tp, _) in enumerate(pos):
            valid[i, : len(tp)] = True

        def place(first: torch.Tensor, steps: list[torch.Tensor]) -> torch.Tensor:
            return _place(first, steps, state.n_pre, p_slots).masked_fill(~valid[..., None], 0)

        out: dict[str, Any] = {
            "acts": [place(state.acts[j], [s[j] for s in dec_acts]) for j in range(len(self.layers))],
            "positions": pos,
            "responses": resp,
        }
        if self.topk:
            logits = self._logits(place(state.normed, dec_normed))
            v, ix = logits.log_softmax(-1).topk(self.topk, dim=-1)
            out["topk_values"] = v.masked_fill(~valid[..., None], 0)
            out["topk_ids"] = ix.masked_fill(~valid[..., None], PAD)
        return out

    def _prefill(self, pairs: list[PromptPair], t: int, positions: str) -> _Decoding:
        """The traced prefill over the left-padded prompts: it fills the KV cache and captures
        every aligned slot that lies inside the prompt (all of query+response's query part, and
        response slot 0); the rest come from the decode steps, in order."""
        import nnsight
        from transformers import DynamicCache

        b = len(pairs)
        dev = next(self.model.parameters()).device
        prompts = [list(p.teacher_ids) for p in pairs]
        ids, mask = pad(prompts, self.tok.pad_token_id, left=True, device=dev)
        width = ids.shape[1]
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        full = [p.positions(t, positions) for p in pairs]
        n_pre = [sum(1 for x in tp if x < len(q)) for (tp, _), q in zip(full, prompts, strict=True)]
        pre = torch.zeros((b, max(n_pre)), dtype=torch.long)
        for i, ((tp, _), n) in enumerate(zip(full, n_pre, strict=True)):
            pre[i, :n] = torch.tensor(tp[:n]) + (width - len(prompts[i]))  # + the row's left padding
            pre[i, n:] = width - 1
        bi = torch.arange(b, device=dev)[:, None]
        pi = pre.to(dev)
        layers = decoder_layers(self.nn)
        kv = DynamicCache(config=self.model.config)
        with self.nn.trace(input_ids=ids, attention_mask=mask, position_ids=pos_ids,
                           **self._cache_kwargs(kv)) as tracer:
            acts = nnsight.save([self.site.module(layers[i]).output[bi, pi] for i in self.layers])
            normed = nnsight.save(self.nn.model.norm.output[bi, pi])
            tracer.stop()  # the cache is filled by the layers; the LM head runs on few rows only
        self.forwards += 1
        self.tokens += int(mask.sum())
        # The LM head on each row's last prompt position only (the top-k, if asked, is computed
        # once for every slot at the end).
        last = torch.tensor([n - 1 for n in n_pre], device=dev)
        first_logits = self._logits(normed[torch.arange(b, device=dev), last])
        return _Decoding(kv, mask, pos_ids, n_pre, acts, normed, first_logits)

    def _step(self, state: _Decoding, last_tokens: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One traced decode step feeding each row's last token: the aligned layers' site and
        the final norm at the new position (the KV cache, mask and positions advance in
        ``state``)."""
        import nnsight

        dev = state.mask.device
        b = len(last_tokens)
        state.mask = torch.cat([state.mask, torch.ones((b, 1), dtype=state.mask.dtype, device=dev)], dim=1)
        state.pos_ids = state.pos_ids[:, -1:] + 1
        layers = decoder_layers(self.nn)
        with self.nn.trace(input_ids=torch.tensor(last_tokens, device=dev)[:, None],
                           attention_mask=state.mask, position_ids=state.pos_ids,
                           **self._cache_kwargs(state.kv)) as tracer:
            acts = nnsight.save([self.site.module(layers[i]).output[:, -1] for i in self.layers])
            normed = nnsight.save(self.nn.model.norm.output[:, -1])
            tracer.stop()
        self.forwards += 1
        self.tokens += b
        return acts, normed


@dataclass
class _Decoding:
    """A batched greedy decode in progress (``Teacher._prefill``, then ``Teacher._step``)."""

    kv: Any
    """The KV cache (transformers ``DynamicCache``) the traced steps extend."""
    mask: torch.Tensor
    pos_ids: torch.Tensor
    n_pre: list[int]
    """Per row: how many of its aligned slots the prefill captured."""
    acts: list[torch.Tensor]
    """Per aligned layer: the prefill's slots, (rows, max(n_pre), hidden)."""
    normed: torch.Tensor
    """The final norm at the prefill's slots (for the top-k)."""
    first_logits: torch.Tensor
    """The LM head at each row's last prompt position: the first response token."""


def _place(first: torch.Tensor, steps: list[torch.Tensor], n_pre: list[int], p_slots: int) -> torch.Tensor:
    """Per row, its ``n_pre`` prefill slots then the decode steps' values, in ``p_slots`` slots."""
    out = first.new_zeros((first.shape[0], p_slots, first.shape[-1]))
    later = torch.stack(steps, dim=1) if steps else None
    for i, n in enumerate(n_pre):
        out[i, :n] = first[i, :n]
        if later is not None:
            m = min(later.shape[1], p_slots - n)
            out[i, n : n + m] = later[i, :m]
    return out


# ----------------------------------------------------------------------------- rows -> arrays


def _ragged(seqs: list[list[int]] | list[tuple[int, ...]], width: int) -> np.ndarray:
    a = np.full((len(seqs), width), PAD, dtype=np.int32)
    for i, s in enumerate(seqs):
        a[i, : len(s)] = s
    return a


def _refuse_non_finite(t: torch.Tensor, pairs: list[PromptPair], site: str, layer: int) -> None:
    """A teacher that outputs NaN/Inf poisons every run trained from the cache: stop before the
    shard is written (the cache stays partial) and name the layer and rows."""
    finite = torch.isfinite(t).flatten(1).all(1)
    if bool(finite.all()):
        return
    bad = [i for i in range(len(pairs)) if not finite[i]]
    rows = sorted(pairs[i].row for i in bad)
    examples = [pairs[i].example_id for i in bad]
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    raise IA2Error(
        f"the teacher produced non-finite activations ({nan} NaN, {inf} Inf) at --site {site} layer "
        f"{layer}, rows {rows[:10]}{' ...' if len(rows) > 10 else ''} (examples {examples[:10]}); "
        "nothing of their shard was written and the cache is left partial. Check the model's "
        "weights and --dtype (an overflow in half precision?)"
    )


def _encode_acts(plan: _Plan, config: CollectConfig, pairs: list[PromptPair], results: list[dict[str, Any]],
                 data: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """The shard's activations, (rows, layers, P, hidden), encoded layer by layer into one array
    (and int8's scales into theirs); returns what a lossy dtype lost, for the ledger."""
    acts, scales = act_path(config.site), scale_path(config.site)
    spec = next(s for s in plan.specs if s.path == acts)
    data[acts] = np.empty((len(pairs), *spec.shape), dtype=spec.dtype)
    if spec.scales:
        data[scales] = np.empty((len(pairs), *spec.shape[:2]), dtype=np.float32)
    worst = (0.0, 0.0)
    for j, layer in enumerate(plan.layers):
        t = torch.cat([res["acts"][j].cpu() for res in results])
        _refuse_non_finite(t, pairs, config.site, layer)
        enc = encode_activations(t, config.dtype)
        data[acts][:, j] = enc.values
        if spec.scales:
            data[scales][:, j] = enc.scales
            worst = (max(worst[0], enc.max_rel_error or 0.0), max(worst[1], enc.max_rel_l2_error or 0.0))
    return {acts: worst} if spec.scales else {}


def _shard_data(plan: _Plan, config: CollectConfig, pairs: list[PromptPair], results: list[dict[str, Any]],
                ) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    resp = [r for res in results for r in res["responses"]]
    pos = [p for res in results for p in res["positions"]]
    specs = {s.path: s for s in plan.specs}
    data: dict[str, np.ndarray] = {}
    errors = _encode_acts(plan, config, pairs, results, data)

    def width(path: str) -> int:
        return specs[path].shape[0]

    data[layout.STUDENT_IDS] = _ragged([p.student_ids for p in pairs], width(layout.STUDENT_IDS))
    data[layout.STUDENT_LEN] = np.array([len(p.student_ids) for p in pairs], dtype=np.int32)
    data[layout.TEACHER_IDS] = _ragged([p.teacher_ids for p in pairs], width(layout.TEACHER_IDS))
    data[layout.TEACHER_LEN] = np.array([len(p.teacher_ids) for p in pairs], dtype=np.int32)
    data[layout.RESPONSE_IDS] = _ragged(resp, plan.response_tokens)
    data[layout.RESPONSE_LEN] = np.array([len(r) for r in resp], dtype=np.int32)
    labels = [p.label_ids(plan.response_tokens) for p in pairs]
    data[layout.TARGET_IDS] = _ragged(labels, width(layout.TARGET_IDS))
    data[layout.TARGET_LEN] = np.array([len(x) for x in labels], dtype=np.int32)
    data[layout.TEACHER_POSITIONS] = _ragged([tp for tp, _ in pos], plan.position_slots)
    data[layout.STUDENT_POSITIONS] = _ragged([sp for _, sp in pos], plan.position_slots)
    data[layout.POSITIONS_LEN] = np.array([len(tp) for tp, _ in pos], dtype=np.int32)
    pool_index = plan.pool_index
    queries = pool_index if config.split == "train" else {e.id: i for i, e in enumerate(plan.task.eval)}
    # Rows of an --unlabelled-file index no pool example: PAD (-1).
    data[layout.EXAMPLE_INDEX] = np.array([queries.get(p.example_id, PAD) for p in pairs], dtype=np.int32)
    data[layout.DEMO_INDEX] = _ragged(
        [[pool_index[d] for d in p.demo_ids] for p in pairs], width(layout.DEMO_INDEX)
    )
    data[layout.SPLIT] = np.array([SPLIT_CODES[p.split] for p in pairs], dtype=np.uint8)
    if config.topk_logits:
        data[layout.TOPK_VALUES] = torch.cat(
            [res["topk_values"].cpu() for res in results]).numpy().astype(np.float32)
        data[layout.TOPK_IDS] = torch.cat(
            [res["topk_ids"].cpu() for res in results]).numpy().astype(np.int32)
    return data, errors


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
    if config.plan:
        planned = plan_collect(config, loaded)
        return CollectResult(planned.cache, planned.key, planned.rows, False, "planned", 0,
                             round(time.perf_counter() - t0, 3), plan=planned.to_dict())
    plan = _plan(config, *_model_parts(config, loaded))
    existing = _existing(config, plan)
    if existing is not None and existing.status == "complete":
        log.info("cache %s is complete: reused, no model work", existing.path)
        return CollectResult(str(existing.path), plan.key, existing.n_rows, True, "complete",
                             existing.bytes_on_disk(), round(time.perf_counter() - t0, 3),
                             manifest=existing.manifest)
    with contextlib.ExitStack() as held:
        cache, missing = _open_for_writing(config, plan, existing, held)
        mine = distributed.my_share(missing)  # rank r computes missing[r::W], whole shards only
        with _ShardWriter(cache, missing, progress) as writer:
            if mine:
                log.info("collecting %d of %d shards into %s", len(mine), cache.n_shards, cache.path)
                loaded = loaded or load_model(config.model)
                teacher = Teacher(loaded.model, loaded.tokenizer, config.site, plan.layers,
                                  config.topk_logits)
                writer.tokens = lambda: teacher.tokens
            fault_point("collect.before_first_shard")
            for shard in mine:
                writer.submit(shard, *_compute_shard(teacher, plan, config, cache, shard))
        seconds = round(time.perf_counter() - t0, 3)
        cache = _finish(cache, seconds)
    # Under torchrun the result counts the work of every rank (identity in one process).
    n_shards, rows_computed, tokens = (int(x) for x in distributed.all_reduce_sum(
        [len(mine), writer.rows_computed, teacher.tokens if mine else 0]))
    return CollectResult(str(cache.path), plan.key, cache.n_rows, False, cache.status,
                         cache.bytes_on_disk(), seconds, n_shards, rows_computed, tokens,
                         manifest=cache.manifest)


def _existing(config: CollectConfig, plan: _Plan) -> Cache | None:
    """The cache already under the key, if any (with ``--repair`` its damaged shards dropped, so
    that the resume recomputes exactly those)."""
    path = config.store_path / plan.key
    existing = Cache.open(path) if (path / "zarr.json").exists() else None
    if config.repair and existing is not None and distributed.rank0_call(existing.repair):
        existing = Cache.open(path)
    return existing


def _open_for_writing(config: CollectConfig, plan: _Plan, existing: Cache | None,
                      held: contextlib.ExitStack) -> tuple[Cache, list[int]]:
    """The cache, created or resumed and locked for the whole job, and its missing shards.

    Checks first that the store is writable and has room (a complete cache on a read-only store
    was reused before this). Under torchrun rank 0 creates the cache (the arrays are made once),
    takes its lock and lists the missing shards; every rank gets that list, or rank 0's error,
    and the others open the cache only after that."""
    store = config.store_path
    _check_store_writable(store)
    todo = _rows_to_compute(existing, len(plan.rows))
    geometry = _geometry(config, len(plan.rows), existing)
    _check_room(store, _disk_bytes(plan.specs, todo, geometry), todo, config)
    # A resumed cache keeps its geometry and its micro-batches (so a resumed shard is computed
    # bit-identically).
    rows_per_shard, rows_per_chunk = geometry
    batch_size = existing.manifest["about"]["batch_size"] if existing else config.batch_size
    about = {"batch_size": batch_size, "model_spec": config.model, "task_spec": config.task,
             "eval_fraction": config.eval_fraction}
    manifest = {**plan.manifest, "about": about, "versions": _versions()}
    created: list[Cache] = []

    # ... and its codecs (not part of the key: a cache written before a default changed resumes).
    specs = [replace(s, codec=existing.specs[s.path].codec) if existing and s.path in existing.specs
             else s for s in plan.specs]

    def create_and_lock() -> list[int]:
        cache = Cache.create_or_open(store, plan.key, manifest, specs, len(plan.rows),
                                     rows_per_shard, rows_per_chunk)
        held.enter_context(cache.lock())  # for the whole job (rank 0 only under torchrun)
        created.append(cache)
        return cache.missing_shards()

    missing = distributed.rank0_call(create_and_lock)
    return (created[0] if created else Cache.open(store / plan.key)), missing


def _compute_shard(teacher: Teacher, plan: _Plan, config: CollectConfig, cache: Cache,
                   shard: int) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]], int]:
    """One shard's arrays (in row order), what a lossy dtype lost, and its row count."""
    a, b = cache.shard_rows(shard)
    pairs = list(plan.rows[a:b])
    # Micro-batches of similar length waste less compute on padding; the order is a pure
    # function of the shard's rows, so a resumed shard batches identically.
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i].teacher_ids), i))
    by_len = [pairs[i] for i in order]
    size = cache.manifest["about"]["batch_size"]
    results = [_run_teacher(teacher, plan, config, by_len[i : i + size])
               for i in range(0, len(by_len), size)]
    data, errors = _shard_data(plan, config, by_len, results)
    back = np.argsort(order)
    return {k: arr[back] for k, arr in data.items()}, errors, b - a


def _run_teacher(teacher: Teacher, plan: _Plan, config: CollectConfig,
                 pairs: list[PromptPair]) -> dict[str, Any]:
    """One micro-batch through the teacher, as the plan and config ask."""
    return teacher.run(pairs, plan.response_tokens, config.response, config.positions,
                       plan.task.stop, plan.position_slots)


class _ShardWriter:
    """Writes shards in the background, one at a time, while the next one is computed.

    At most one write is in flight, so ledger entries land in shard order, and a write's error
    surfaces before the next shard is handed over (or on leaving the ``with``, which never leaves
    a write running behind an error). Counts the rows written and reports progress after each."""

    def __init__(self, cache: Cache, missing: list[int], progress: Progress | None) -> None:
        self.cache, self.progress = cache, progress
        self.rows_computed = 0
        self.rows_done = cache.n_rows - sum(len(range(*cache.shard_rows(s))) for s in missing)
        self.tokens: Callable[[], int] = lambda: 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ia2cache-writer")
        self._pending: tuple[Future, int, int] | None = None
        if progress:
            progress(self.rows_done, cache.n_rows, 0)

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self.wait_for_pending_write()
        finally:
            self._pool.shutdown(wait=True)

    def submit(self, shard: int, data: dict[str, np.ndarray], errors: dict[str, tuple[float, float]],
               n_rows: int) -> None:
        self.wait_for_pending_write()
        self._pending = (self._pool.submit(self.cache.write_shard, shard, data, errors), shard, n_rows)

    def wait_for_pending_write(self) -> None:
        if self._pending is None:
            return
        fut, shard, n = self._pending
        self._pending = None
        try:
            fut.result()
        except OSError as exc:
            # Disk full, quota, read-only remount: the shard has no ledger entry, so the cache
            # stays partial and a rerun recomputes exactly the missing shards.
            cache = self.cache
            raise IA2Error(
                f"--store {cache.path.parent}: writing shard {shard} of {cache.path} failed "
                f"({exc.strerror or exc}); the cache is left partial with {len(cache.done_shards())} "
                f"of {cache.n_shards} shards done: free space and rerun the same command to resume"
            ) from exc
        self.rows_computed += n
        self.rows_done += n
        if self.progress:
            self.progress(self.rows_done, self.cache.n_rows, self.tokens())


def _finish(cache: Cache, seconds: float) -> Cache:
    """Mark the cache complete once every rank's shards and ledger entries are in place."""
    distributed.barrier()
    if distributed.is_main():
        cache.finalize({"seconds": seconds})
    distributed.barrier()
    if not distributed.is_main():
        cache = Cache.open(cache.path)  # rank 0 marked it complete
    fault_point("collect.end")
    return cache


def _model_parts(config: CollectConfig, loaded: Any | None) -> tuple[Any, Any, Any]:
    """(tokenizer, ModelInfo, model config): from ``loaded``, else without loading the weights."""
    if loaded is not None:
        return loaded.tokenizer, loaded.info, loaded.model.config
    from transformers import AutoConfig

    tok, info = load_tokenizer(config.model)
    return tok, info, AutoConfig.from_pretrained(info.path)


def _check_store_writable(store: Location) -> None:
    try:
        store.mkdir()
    except OSError as exc:
        raise IA2Error(f"--store {store}: cannot create it ({exc.strerror or exc})") from exc
    try:
        store.probe_writable()  # a new file under a fresh name: never through a link planted there
    except OSError as exc:
        raise IA2Error(f"--store {store}: not writable ({exc.strerror or exc})") from exc
