"""Distill: train a PEFT adapter on the no-demo student from a teacher cache.

The training loop reads top to bottom: set up (cache, model + adapter, loaders), then for each
phase of the method's schedule one visible loop over epochs with early stopping on the dev
rows, then save. The teacher is never run: targets stream from the cache.

Launch: ``ia2cache distill --cache KEY --method a2t`` or ``ia2cache.distill(DistillConfig(...))``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ia2cache import distributed
from ia2cache._faults import fault_point
from ia2cache._io import check_writable_dir, ensure_dir_beneath, write_json_atomic
from ia2cache.adapters import ADAPTERS, AdapterSpec, attach, position_offset
from ia2cache.errors import IA2Error
from ia2cache.loader import Batch, CacheLoader, LoaderConfig
from ia2cache.models import LoadedModel, home, load_model
from ia2cache.objectives import OBJECTIVES, SCHEDULES, Mix, Objective, StudentOut, Targets
from ia2cache.outputs import (
    LOCK,
    OutputLock,
    claim_output_dir,
    move_into,
    release_if_unused,
    save_tensors,
)
from ia2cache.padding import pad as pad_batch
from ia2cache.prompts import check_seed
from ia2cache.sites import Capture, StopForward, capture, parse_layers
from ia2cache.store import Cache, act_path, default_store, location, resolve_cache

log = logging.getLogger(__name__)

LABELS = ("gt", "icl")
_NOT_IN_FINGERPRINT = frozenset({"out", "store", "device", "cache", "first_phase_from", "overwrite"})
"""DistillConfig fields that do not change the trained weights (where things are, how they run)."""
WRITES = ("adapter_model.safetensors", "adapter_config.json", "README.md", "run.json", "checkpoint")
"""What distill writes into --out (``--overwrite`` removes only these)."""
LR_MAX = 10.0
"""Learning rates above this only diverge with Adam; refused before anything runs."""
STEPS_MAX = 10_000_000
BATCH_MAX = 65_536
_EPOCH_STRIDE = 100_000
"""Phase p's epochs are loader epochs p*_EPOCH_STRIDE + e: a fresh, reproducible order per phase."""


@dataclass(frozen=True)
class DistillConfig:
    """One training run from one cache."""

    cache: str
    """A cache key (in the store), a cache directory, or a cache URL (s3://bucket/prefix/KEY)."""
    store: str | None = None
    """Store directory or fsspec URL (s3://bucket/prefix) holding the cache; default $IA2CACHE_HOME/store."""
    method: str = "a2t"
    """act (IA2), tok (SFT), tokl (top-k KL), tna (mix), a2t (IA2 then SFT), t2a (SFT then IA2)."""
    labels: str = "gt"
    """Labels for tok: gt (gold targets, ending with the stop string when T > 1) or icl (the
    teacher's cached responses)."""
    adapter: str = "lora"
    """PEFT adapter: lora, ia3, prompt (prompt tuning) or prefix (prefix tuning)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 8
    """LoRA alpha."""
    target_modules: str = "q,k,o"
    """Modules to adapt (q,k,v,o,gate,up,down or full names)."""
    num_virtual_tokens: int = 8
    """Virtual tokens for prompt and prefix tuning."""
    lr: float = 1e-4
    """Adam learning rate (constant) of the first phase. The paper's grid: 1e-4, 3e-4, 1e-3."""
    lr2: float | None = None
    """Learning rate of the second phase (a2t's SFT, t2a's IA2); default --lr. Sweeps choose
    each phase's lr on its own dev loss."""
    max_steps: int = 1000
    """Optimizer steps per phase at most. A phase that reaches it before early stopping is
    recorded as capped (run.json, sweep rows); the sweep reports how often that happens."""
    epochs: int | None = None
    """Cap in epochs instead of --max-steps (converted: epochs x optimizer steps per epoch)."""
    eval_every: int = 10
    """Optimizer steps between dev evaluations (early stopping's clock; also checkpoints)."""
    batch_size: int = 4
    """Rows per optimizer step (micro-batch rows x grad_accum); under torchrun the global batch,
    split across the ranks."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; micro-batch rows = batch_size / grad_accum."""
    patience: int = 5
    """Early stopping: dev evaluations without a significant improvement (see min_delta) before
    a phase ends; the best dev state seen (the initial one included) is restored."""
    min_delta: float = 0.01
    """A dev loss counts as an improvement for patience when it is below (1 - min_delta) x the
    loss at the last improvement: a plateau's noise does not keep a phase running to the cap."""
    seed: int = 0
    """Seed of the adapter's initialisation and of the row order, in [0, 2**32)."""
    layers: str | None = None
    """Layers to align (a subset of the cache's); default all the cache holds."""
    normalize: bool = False
    """Divide each layer's act loss by the teacher's variance at that layer (ledger stats)."""
    tna_weight: float = 0.5
    """w in tna = (1-w)*c*act + w*tok, where c = tok/act on the training rows at step 0, so that
    w=0.5 weighs both halves equally at the start (the act sum over layers is 10-100x a CE)."""
    model: str | None = None
    """Base model; default the one the cache was collected from."""
    allow_model_mismatch: bool = False
    """Train even if the model's fingerprint differs from the cache's."""
    skip_damaged: bool = False
    """Train without the rows of damaged cache chunks (checksum mismatch, unreadable or deleted
    shard files) instead of stopping; how many rows were dropped is logged and kept in run.json."""
    first_phase_from: str | None = None
    """a2t/t2a: take the first phase from this finished act/tok run directory (same cache, seed,
    adapter, budgets and --lr) instead of training it again. The result is the same, so it is
    not part of the run's fingerprint; sweep uses it to share a2t's IA2 phase with the act cell."""
    out: str | None = None
    """Output directory; default $IA2CACHE_HOME/runs/<cache key>/<method>-<adapter>-lr<lr>-s<seed>.
    It must be new, empty, or a distill folder of this same run (resumed or reused)."""
    overwrite: bool = False
    """Let --out hold a distill run with other settings: the files that run wrote are removed first."""
    device: str | None = None
    """cpu or cuda; default cuda when available."""

    def __post_init__(self) -> None:
        if self.method not in SCHEDULES:
            raise IA2Error(f"--method {self.method}: choose one of {', '.join(SCHEDULES)}")
        if self.labels not in LABELS:
            raise IA2Error(f"--labels {self.labels}: choose gt or icl")
        if self.adapter not in ADAPTERS:
            raise IA2Error(f"--adapter {self.adapter}: choose one of {', '.join(ADAPTERS)}")
        for flag, lr in (("--lr", self.lr), ("--lr2", self.lr2)):
            ok = isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= LR_MAX
            if lr is not None and not ok:
                raise IA2Error(f"{flag} {lr}: must be a finite learning rate in (0, {LR_MAX:g}]")
        for flag, v, hi in (("--max-steps", self.max_steps, STEPS_MAX), ("--epochs", self.epochs, STEPS_MAX),
                            ("--eval-every", self.eval_every, STEPS_MAX),
                            ("--batch-size", self.batch_size, BATCH_MAX),
                            ("--grad-accum", self.grad_accum, BATCH_MAX),
                            ("--patience", self.patience, STEPS_MAX), ("--lora-r", self.lora_r, 4096),
                            ("--lora-alpha", self.lora_alpha, 65536),
                            ("--num-virtual-tokens", self.num_virtual_tokens, 4096)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi):
                raise IA2Error(f"{flag} {v}: must be an integer from 1 to {hi}")
        if self.batch_size % self.grad_accum:
            raise IA2Error(f"--grad-accum {self.grad_accum}: must divide --batch-size {self.batch_size}")
        if not (math.isfinite(self.min_delta) and 0.0 <= self.min_delta < 1.0):
            raise IA2Error(f"--min-delta {self.min_delta}: must be in [0, 1)")
        if not (math.isfinite(self.tna_weight) and 0.0 <= self.tna_weight <= 1.0):
            raise IA2Error(f"--tna-weight {self.tna_weight}: must be in [0, 1]")
        check_seed(self.seed)
        if self.lr2 is not None and len(SCHEDULES[self.method]) < 2:
            raise IA2Error(f"--lr2 {self.lr2}: --method {self.method} has one phase; --lr2 is for a2t/t2a")
        if self.first_phase_from is not None and len(SCHEDULES[self.method]) < 2:
            raise IA2Error(f"--first-phase-from: --method {self.method} has one phase; it is for a2t/t2a")

    def phase_lrs(self) -> list[float]:
        """The learning rate of each phase."""
        n = len(SCHEDULES[self.method])
        return [self.lr] + [self.lr2 if self.lr2 is not None else self.lr] * (n - 1)

    def run_name(self) -> str:
        two = f"-lr2{self.lr2:g}" if self.lr2 is not None else ""
        return f"{self.method}-{self.adapter}-lr{self.lr:g}{two}-s{self.seed}"

    def fingerprint(self) -> str:
        """Hash of every field that changes the trained weights."""
        d = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}
        if not self.skip_damaged:  # off, it changes nothing: runs from before it keep their hash
            d.pop("skip_damaged")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def first_phase_config(self) -> DistillConfig:
        """The single-phase run (act for a2t, tok for t2a) whose result is this run's phase 1."""
        return replace(self, method=SCHEDULES[self.method][0], lr2=None, first_phase_from=None, out=None)


@dataclass
class DistillResult:
    adapter: str
    """The adapter directory (peft's files plus run.json)."""
    method: str
    best_epoch: list[int]
    """Per phase: the epoch holding the best dev step (-1: the initial state was best)."""
    epochs_run: list[int]
    """Per phase: epochs begun."""
    final: dict[str, float | None]
    """The last phase's train and dev loss at its best step."""
    seconds: float
    reused: bool = False
    initial_dev_loss: list[float | None] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: list[int] = field(default_factory=list)
    """Per phase: the optimizer step whose state was kept (0: the initial state)."""
    steps_run: list[int] = field(default_factory=list)
    """Per phase: optimizer steps taken."""
    capped: list[bool] = field(default_factory=list)
    """Per phase: True when the step cap, not early stopping, ended it."""
    lrs: list[float] = field(default_factory=list)
    """Per phase: the learning rate."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


Progress = Callable[[dict[str, Any]], None]
"""Called after every optimizer step and every epoch with a dict of counters and losses."""


# ----------------------------------------------------------------------------- student forward


def _quiet(cap: Capture) -> Capture:
    """A capture that records only while a forward needs activations (``_student_out`` sets it)."""
    cap.on = False
    return cap


def _rows(ids: torch.Tensor, lens: torch.Tensor) -> list[list[int]]:
    return [ids[i, : int(n)].tolist() for i, n in enumerate(lens)]


@dataclass
class _Seq:
    """A teacher-forced student sequence and the positions its loss reads."""

    ids: torch.Tensor
    mask: torch.Tensor
    label_pos: torch.Tensor  # (B, T) positions predicting label tokens
    labels: torch.Tensor  # (B, T)
    label_mask: torch.Tensor  # (B, T)


def _sequence(batch: Batch, source: str, pad: int, device: torch.device) -> _Seq:
    """Student prompt + ``source`` tokens[:-1]; labels are the ``source`` tokens."""
    prompts = _rows(batch.student_ids, batch.student_len)
    if source == "icl":
        resp = _rows(batch.response_ids, batch.response_len)
    else:
        resp = _rows(batch.target_ids, batch.target_len)
    seqs = [p + r[:-1] for p, r in zip(prompts, resp, strict=True)]
    ids, mask = pad_batch(seqs, pad, device=device)
    t = max(len(r) for r in resp)
    label_pos = torch.zeros((len(seqs), t), dtype=torch.long)
    labels = torch.zeros((len(seqs), t), dtype=torch.long)
    label_mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, resp, strict=True)):
        label_pos[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        labels[i, : len(r)] = torch.tensor(r)
        label_mask[i, : len(r)] = True
    return _Seq(ids, mask, label_pos.to(device), labels.to(device), label_mask.to(device))


# ----------------------------------------------------------------------------- the run


@dataclass
class _Run:
    config: DistillConfig
    cache: Cache
    model: Any
    tokenizer: Any
    layers: list[int]
    capture: Capture
    labelled: CacheLoader
    """The N labelled training rows: what every phase with a token objective trains on."""
    dev: CacheLoader
    offset: int
    variances: dict[int, float] | None
    out: Path
    device: torch.device
    everything: CacheLoader | None = None
    """The labelled rows and the cache's unlabelled rows (``collect --unlabelled M``) as one range:
    what activation phases train on. None without unlabelled rows."""
    train: CacheLoader = field(init=False)
    """The phase in progress's training rows (:meth:`use_rows`)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float | None] = field(default_factory=dict)
    """Dev loss of each phase before its first step (keys are phase indices as strings)."""
    phases: list[dict[str, Any]] = field(default_factory=list)
    """Per finished phase: lr, best_step, steps_run, capped, best_epoch, epochs_run."""
    tna_scale: float | None = None
    """c in tna = (1-w)*c*act + w*tok: tok/act on the training rows at step 0."""
    loop_seconds: float = 0.0
    """Wall time inside the training loops (steps plus waiting for data)."""
    step: Any = None
    """The training loss as a module (:class:`_Step`), wrapped in DistributedDataParallel under
    torchrun: what a training step calls."""

    def __post_init__(self) -> None:
        self.train = self.labelled

    def use_rows(self, objective: str) -> None:
        """Train the next phase on its rows: with unlabelled rows in the cache, an objective that
        reads no labels (act, and tokl's teacher distribution) takes them too; tok never does."""
        reads_labels = OBJECTIVES[objective].reads_labels()
        self.train = self.everything if self.everything is not None and not reads_labels else self.labelled

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train) / self.config.grad_accum))

    @property
    def max_steps(self) -> int:
        """The step cap of the phase in progress (--max-steps, or --epochs of its rows)."""
        if self.config.epochs is not None:
            return self.config.epochs * self.steps_per_epoch
        return self.config.max_steps


class _Step(torch.nn.Module):
    """One batch's training loss as a module, so that DistributedDataParallel can wrap it.

    DDP finds the parameters a step did not use by walking back from the forward's output; the
    student's own output (logits) depends on every layer, while the act loss reads hooks at the
    aligned layers and may stop the forward early. Returning the loss itself makes DDP see exactly
    the parameters the loss used (``find_unused_parameters`` covers the adapter's layers above
    the last aligned one)."""

    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.student = run.model  # registered: DDP syncs and reduces its parameters
        self._run = [run]  # not a submodule

    def forward(self, batch: Batch, objective: str) -> torch.Tensor:
        return _loss(self._run[0], batch, objective)


def _wrap_step(run: _Run) -> Any:
    """The step module, in DDP under torchrun (its construction broadcasts rank 0's weights,
    e.g. a resumed checkpoint's, to every rank)."""
    step = _Step(run)
    if distributed.world_size() == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel

    ids = [run.device.index] if run.device.type == "cuda" and run.device.index is not None else None
    return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)


def _act_source(cache: Cache) -> str:
    return "icl" if cache.manifest.get("response") == "icl" else "target"


def _objective(run: _Run, name: str) -> Objective:
    """The registered objective ``name``, built with this run's settings (the per-layer variances
    of ``--normalize``, tna's weight and its step-0 scale)."""
    cls = OBJECTIVES[name]
    settings = {"variances": run.variances, "weight": run.config.tna_weight,
                "scale": run.tna_scale if run.tna_scale is not None else 1.0}
    wanted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in settings.items() if k in wanted})


def _loss(run: _Run, batch: Batch, objective: str) -> torch.Tensor:
    """The loss of one batch under one registered objective."""
    obj = _objective(run, objective)
    return obj.loss(*_student_out(run, batch, obj))


def _student_out(run: _Run, batch: Batch, obj: Objective) -> tuple[StudentOut, Targets]:
    """One batch through the student, with what ``obj`` needs, from as few forwards as possible:
    the act sequence (prompt + the response the teacher's activations were taken on) carries the
    captures and, when it is also the tok sequence, the logits; the forward stops after the last
    aligned layer when no logits are needed."""
    cfg, dev = run.config, run.device
    act_src = _act_source(run.cache)
    tok_src = "icl" if cfg.labels == "icl" else "target"
    pad = run.tokenizer.pad_token_id
    out = StudentOut()
    tgt = Targets(mask=batch.position_mask.to(dev))
    tok_seq: _Seq | None = None
    if obj.needs_acts or obj.needs_topk:
        act_seq = _sequence(batch, act_src, pad, dev)
        # With T=1 (or ICL labels) the tok sequence is this very sequence: one forward serves both.
        share = obj.needs_logits and not obj.needs_topk and (
            tok_src == act_src or int(batch.response_len.max()) == 1 == int(batch.target_len.max()))
        want_logits = obj.needs_topk or share
        run.capture.on = obj.needs_acts
        run.capture.stop_at = run.layers[-1] if not want_logits else None
        pos = batch.student_positions.to(dev) + run.offset
        try:
            logits = _forward(run, act_seq, (pos if obj.needs_topk else act_seq.label_pos + run.offset)
                              if want_logits else None)
        except StopForward:
            logits = None
        run.capture.on = False
        if obj.needs_acts:
            bi = torch.arange(len(batch.rows), device=dev)[:, None]
            out.acts = {i: run.capture.out[i][bi, pos] for i in run.layers}
            tgt.acts = batch.activations(dev)  # stored bytes moved, converted on the device
        if obj.needs_topk:
            out.topk_logits = logits
            tgt.topk_values, tgt.topk_ids = batch.topk_values.to(dev), batch.topk_ids.to(dev)
        elif share:
            # Shared only when the tok sequence is this one, or both are one token long (then the
            # ids and positions agree and only the labels may differ: gold vs the teacher's).
            out.logits = logits
            tok_seq = act_seq if tok_src == act_src else _sequence(batch, tok_src, pad, dev)
    if obj.needs_logits and not obj.needs_topk and tok_seq is None:
        tok_seq = _sequence(batch, tok_src, pad, dev)
        out.logits = _forward(run, tok_seq, tok_seq.label_pos + run.offset)
    if tok_seq is not None:
        tgt.labels, tgt.label_mask = tok_seq.labels, tok_seq.label_mask
    return out, tgt


def _forward(run: _Run, seq: _Seq, logits_at: torch.Tensor | None) -> torch.Tensor | None:
    """The student forward over ``seq``; the logits at positions ``logits_at`` (B, P), as (B, P, V).

    The LM head runs only at the positions some row needs (transformers' ``logits_to_keep``): at
    T=1 that is a few positions instead of every one, a quarter of SmolLM2's forward. With
    ``logits_at`` None only the capture hooks matter (they may stop the forward early)."""
    if logits_at is None:
        run.model(input_ids=seq.ids, attention_mask=seq.mask)
        return None
    keep = torch.unique(logits_at)  # sorted
    out = run.model(input_ids=seq.ids, attention_mask=seq.mask, logits_to_keep=keep)
    bi = torch.arange(logits_at.shape[0], device=logits_at.device)[:, None]
    return out.logits[bi, torch.searchsorted(keep, logits_at)]


@torch.no_grad()
def _tna_scale(run: _Run) -> float:
    """tok/act, each the mean over the training rows at the phase's start (row order, no grad):
    the act term times this equals the tok term at step 0, so w=0.5 weighs them equally."""
    run.model.eval()
    sums = {"act": 0.0, "tok": 0.0}
    n = 0
    run.train.set_epoch(0)
    mix = _objective(run, "tna")
    assert isinstance(mix, Mix)
    for batch in run.train:
        parts = mix.terms(*_student_out(run, batch, mix))
        rows = len(batch.rows)
        for k in sums:
            sums[k] += float(parts[k]) * rows
        n += rows
    act, tok = distributed.all_reduce_sum([sums["act"], sums["tok"]])
    if not (math.isfinite(act) and math.isfinite(tok)) or act <= 0:
        raise IA2Error(f"--method tna: the act loss at step 0 is {act:g} (tok {tok:g}); cannot weigh "
                       "the two terms; check the cache with `ia2cache verify`")
    return tok / act


@torch.no_grad()
def _dev_loss(run: _Run, objective: str) -> float | None:
    if len(run.dev.rows) == 0:
        return None
    run.model.eval()
    total, n = 0.0, 0
    run.dev.load_state_dict({"epoch": 0, "position": 0, "seed": run.config.seed})
    for batch in run.dev:
        rows = len(batch.rows)
        total += float(_loss(run, batch, objective)) * rows
        n += rows
    return total / n


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _trainable(model).items()}


def _restore(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = _trainable(model)
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# ----------------------------------------------------------------------------- checkpoints


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoint"


def _save_checkpoint(run: _Run, state: dict[str, Any], opt: torch.optim.Optimizer | None,
                     best: dict[str, torch.Tensor] | None) -> None:
    """Tensors in safetensors, counters in JSON; ``state.json`` is renamed in last, so a kill
    at any moment leaves the previous checkpoint whole. Under torchrun only rank 0 writes.

    ``state``: the phase in progress (``phase``, ``step``, ``best_loss``, ``best_step``, ``bad``,
    the train loader's ``loader`` position); ``step`` 0 with no ``loader`` is a phase not begun."""
    if not distributed.is_main():
        return

    d = _ckpt_dir(run.out)
    ensure_dir_beneath(run.out, d, follow_root=False)  # a symlinked checkpoint folder is refused
    tag = f"{state['phase']}-{state['step']}"
    current = {k: v.contiguous().cpu() for k, v in _snapshot(run.model).items()}
    save_tensors(current, d / f"adapter-{tag}.safetensors")
    fault_point("distill.mid_checkpoint")  # a kill here must leave the previous checkpoint usable
    if best is not None:
        save_tensors({k: v.contiguous().cpu() for k, v in best.items()}, d / f"best-{tag}.safetensors")
    osd = opt.state_dict() if opt is not None else {"state": {}, "param_groups": []}
    flat = _flat_optim(osd["state"])
    if flat:
        save_tensors(flat, d / f"optim-{tag}.safetensors")
    meta = {**state, "tag": tag, "param_groups": osd["param_groups"], "has_best": best is not None,
            "config_fingerprint": run.config.fingerprint(), "cache_key": run.cache.key,
            "has_optim": bool(flat), "history": run.history, "initial": run.initial,
            "phases": run.phases, "tna_scale": run.tna_scale}
    write_json_atomic(d / "state.json", meta, indent=1)
    for p in d.iterdir():  # drop older checkpoints only after the new state.json is in place
        if p.suffix == ".safetensors" and not p.stem.endswith(tag):
            p.unlink()


def _load_checkpoint(run: _Run) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict | None] | None:
    from safetensors.torch import load_file

    d = _ckpt_dir(run.out)
    if not (d / "state.json").is_file():
        return None
    meta = json.loads((d / "state.json").read_text())
    if meta.get("config_fingerprint") != run.config.fingerprint() or meta.get("cache_key") != run.cache.key:
        raise IA2Error(
            f"--out {run.out}: holds a checkpoint of a different run (configuration or cache); "
            "choose another --out or delete it"
        )
    tag = meta["tag"]
    _restore(run.model, load_file(d / f"adapter-{tag}.safetensors"))
    best = load_file(d / f"best-{tag}.safetensors") if meta["has_best"] else None
    optim = None
    if meta["has_optim"]:
        optim = {"state": _unflat_optim(load_file(d / f"optim-{tag}.safetensors")),
                 "param_groups": meta["param_groups"]}
    run.history = meta["history"]
    run.initial = meta.get("initial", {})
    run.phases = meta.get("phases", [])
    run.tna_scale = meta.get("tna_scale")
    return meta, best, optim


def _flat_optim(state: dict[int, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter tensors as ``{"<param>.<name>": tensor}`` (safetensors keys)."""
    return {f"{i}.{k}": v.contiguous().cpu() for i, st in state.items() for k, v in st.items()
            if isinstance(v, torch.Tensor)}


def _unflat_optim(flat: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    st: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        i, name = k.split(".", 1)
        st.setdefault(int(i), {})[name] = v
    return st


def _resume(run: _Run) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict | None] | None:
    """The checkpoint to resume from, if ``<out>/checkpoint`` holds one.

    Under torchrun only rank 0 reads it (only it writes ``--out``); every rank then gets its
    counters and history as JSON, its best and optimizer tensors as safetensors buffers, and
    rank 0's adapter weights. An unreadable or foreign checkpoint fails every rank at once.
    """
    if distributed.world_size() == 1:
        return _load_checkpoint(run)
    read: dict[str, Any] = {}

    def meta_of_rank0() -> dict[str, Any] | None:
        read["ckpt"] = _load_checkpoint(run)
        return None if read["ckpt"] is None else read["ckpt"][0]

    meta = distributed.rank0_call(meta_of_rank0)
    run.history, run.initial, run.phases, run.tna_scale = distributed.broadcast_object(
        [run.history, run.initial, run.phases, run.tna_scale])
    if meta is None:  # rank 0's adapter weights reach every rank when DDP wraps the step
        return None
    _, best, optim = read.get("ckpt") or (None, None, None)
    if meta["has_best"]:
        best = distributed.broadcast_tensors(best)
    if meta["has_optim"]:
        flat = distributed.broadcast_tensors(_flat_optim(optim["state"]) if optim else None)
        optim = {"state": _unflat_optim(flat), "param_groups": meta["param_groups"]}
    return meta, best, optim


# ----------------------------------------------------------------------------- setup


def _locate(config: DistillConfig) -> tuple[Cache, Path]:
    """The cache to train from and the output directory (cheap: no model is loaded)."""
    store = location(config.store or default_store())
    cache = Cache.open(resolve_cache(store, config.cache))
    out = Path(config.out).expanduser() if config.out else home() / "runs" / cache.key / config.run_name()
    return cache, out


def _preflight(config: DistillConfig, cache: Cache) -> list[int]:
    """Every check the cache alone can answer, before --out is touched or a model loaded.
    Returns the layers to align."""
    manifest = cache.manifest
    if cache.status != "complete":
        raise IA2Error(f"--cache {cache.path}: is {cache.status}, not complete; run `ia2cache collect` again")
    phases = SCHEDULES[config.method]
    if any(OBJECTIVES[p].needs_topk for p in phases) and not manifest.get("topk_logits"):
        raise IA2Error(
            f"--method {config.method}: the cache has no top-k logits; collect with --topk-logits K"
        )
    if config.layers is None:
        return list(manifest["layers"])
    layers = parse_layers(config.layers, manifest["model"]["layers_total"])
    missing = sorted(set(layers) - set(manifest["layers"]))
    if missing:
        raise IA2Error(f"--layers {config.layers}: layer {missing[0]} is not in the cache "
                       f"(it holds {manifest['layers']})")
    return layers


def _setup(config: DistillConfig, loaded: LoadedModel | None) -> _Run:
    distributed.init()  # no-op unless launched by torchrun with WORLD_SIZE > 1
    cache, out = _locate(config)
    manifest = cache.manifest
    layers = _preflight(config, cache)
    spec = config.model or manifest.get("about", {}).get("model_spec", "default")
    device = torch.device(config.device) if config.device else None
    if loaded is None:
        loaded = load_model(spec, device=device)
    torch.manual_seed(config.seed)  # the adapter's initialisation
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    aspec = AdapterSpec(config.lora_r, config.lora_alpha, config.target_modules, config.num_virtual_tokens)
    model = attach(loaded.model, config.adapter, aspec)  # every rank gets rank 0's start from DDP
    micro = config.batch_size // config.grad_accum
    common = dict(batch_size=micro, layers=tuple(layers), seed=config.seed, skip_damaged=config.skip_damaged)
    checks = dict(model_info=loaded.info, allow_model_mismatch=config.allow_model_mismatch,
                  pad_id=loaded.tokenizer.pad_token_id)
    # Data parallel (torchrun): each global batch is split across ranks; dev is evaluated whole
    # on every rank, so early stopping decides the same everywhere.
    ranks = dict(rank=distributed.rank(), world_size=distributed.world_size())
    train = CacheLoader(cache, LoaderConfig(split="train", **common, **ranks), **checks)
    dev = CacheLoader(cache, LoaderConfig(split="dev", shuffle=False, **common), **checks)
    everything = None
    if manifest.get("n_unlabelled"):
        everything = CacheLoader(cache, LoaderConfig(split="train+unlabelled", **common, **ranks), **checks)
    variances = None
    if config.normalize:
        site = manifest["site"]
        variances = {i: float(cache.stats(act_path(site), i)["var"]) for i in layers}
    if len(train) == 0:
        raise IA2Error(f"--cache {cache.path}: no training rows to train on")
    if distributed.is_main():  # only rank 0 writes --out
        out.mkdir(parents=True, exist_ok=True)
    return _Run(config=config, cache=cache, model=model, tokenizer=loaded.tokenizer, layers=layers,
                capture=_quiet(capture(model, manifest["site"], layers)), labelled=train, dev=dev,
                offset=position_offset(config.adapter, aspec), variances=variances, out=out,
                device=loaded.device, everything=everything)


# ----------------------------------------------------------------------------- train


def _diverged(run: _Run, phase: int, objective: str, step: int, lr: float, value: float) -> IA2Error:
    epoch = step // run.steps_per_epoch
    flag = "--lr" if phase == 0 else "--lr2"
    return IA2Error(
        f"diverged at phase {phase + 1} ({objective}), epoch {epoch}, step {step}: the loss became "
        f"{value} with lr {lr:g}; lower {flag}. Nothing was saved as a finished adapter"
    )


@dataclass
class _Phase:
    """One phase's training state: what a checkpoint keeps and early stopping reads."""

    phase: int
    objective: str
    lr: float
    step: int = 0
    bad: int = 0
    """Evaluations since the last significant improvement (patience's count)."""
    best_step: int = 0
    best_loss: float = float("inf")
    mark: float = float("inf")
    """The score at the last significant improvement (patience's reference)."""
    best: dict[str, torch.Tensor] | None = None
    """The best step's trainable weights."""
    since: float = 0.0
    since_rows: int = 0

    def checkpoint(self, loader: dict[str, Any]) -> dict[str, Any]:
        return {"phase": self.phase, "step": self.step, "best_loss": self.best_loss, "mark": self.mark,
                "best_step": self.best_step, "bad": self.bad, "loader": loader}


def _train_phase(run: _Run, phase: int, objective: str, lr: float, state: dict[str, Any],
                 best: dict[str, torch.Tensor] | None, optim_state: dict | None,
                 progress: Progress | None) -> dict[str, Any]:
    """Train one objective until early stopping or the step cap; restore its best dev state.

    ``state`` is a fresh phase (``step`` 0, no ``loader``) or a checkpoint's. Returns the
    phase's record: lr, best_step (0: the initial state), steps_run, capped, epochs."""
    cfg = run.config
    run.use_rows(objective)  # with unlabelled rows: act phases read them, tok phases never
    opt = torch.optim.Adam(list(_trainable(run.model).values()), lr=lr)  # fresh per phase (a2t, t2a)
    if optim_state is not None:
        opt.load_state_dict(optim_state)
    ph = _begin_phase(run, _Phase(phase, objective, lr), state, best)
    acc = 0
    t_loop = time.perf_counter()
    while ph.step < run.max_steps and ph.bad < cfg.patience:
        run.model.train()
        opt.zero_grad(set_to_none=True)
        for batch in run.train:
            # The last micro-batch of a step: DDP reduces gradients in its backward only.
            sync = acc + 1 >= cfg.grad_accum or run.train.position == len(run.train)
            value = _backward(run, ph, batch, sync)
            acc += 1
            if not sync:
                continue
            opt.step()
            opt.zero_grad(set_to_none=True)
            acc = 0
            ph.step += 1
            if progress:
                progress({"phase": phase, "objective": objective, "step": ph.step, "steps": run.max_steps,
                          "epoch": ph.step // run.steps_per_epoch, "loss": value})
            if ph.step % cfg.eval_every and ph.step < run.max_steps:
                continue
            run.loop_seconds += time.perf_counter() - t_loop
            _evaluate(run, ph, opt, progress)  # early stopping's clock, and a checkpoint
            run.model.train()
            t_loop = time.perf_counter()
            if ph.bad >= cfg.patience or ph.step >= run.max_steps:
                break
    run.loop_seconds += time.perf_counter() - t_loop
    if ph.best is not None:
        _restore(run.model, ph.best)  # really restore the best step's weights
    spe = run.steps_per_epoch
    return {"objective": objective, "lr": lr, "best_step": ph.best_step, "steps_run": ph.step,
            "capped": ph.bad < cfg.patience, "best_epoch": (ph.best_step - 1) // spe if ph.best_step else -1,
            "epochs_run": math.ceil(ph.step / spe), "max_steps": run.max_steps,
            "eval_every": cfg.eval_every, "patience": cfg.patience, "min_delta": cfg.min_delta}


def _begin_phase(run: _Run, ph: _Phase, state: dict[str, Any],
                 best: dict[str, torch.Tensor] | None) -> _Phase:
    """A phase not begun: weigh tna, score the initial state (a candidate: a phase that never
    helps dev restores it, best_step 0). A resumed phase: its checkpoint's state."""
    if state.get("loader") is not None:
        run.train.load_state_dict(state["loader"])
        ph.step, ph.bad, ph.best_step = int(state["step"]), int(state["bad"]), int(state["best_step"])
        ph.best_loss, ph.mark, ph.best = float(state["best_loss"]), float(state["mark"]), best
        return ph
    if ph.objective == "tna":
        run.tna_scale = _tna_scale(run)
    init = distributed.broadcast_object(_dev_loss(run, ph.objective))
    run.initial[str(ph.phase)] = init
    if init is not None and not math.isfinite(init):
        raise _diverged(run, ph.phase, ph.objective, 0, ph.lr, init)
    ph.best_loss = ph.mark = init if init is not None else float("inf")
    ph.best = _snapshot(run.model)
    run.history.append({"phase": ph.phase, "objective": ph.objective, "step": 0, "epoch": 0,
                        "train_loss": None, "dev_loss": init})
    run.train.set_epoch(ph.phase * _EPOCH_STRIDE)
    return ph


def _backward(run: _Run, ph: _Phase, batch: Batch, sync: bool) -> float:
    """One micro-batch's forward and backward (DDP's gradient reduce only when ``sync``); returns
    its loss."""
    quiet = run.step.no_sync() if not sync and hasattr(run.step, "no_sync") else contextlib.nullcontext()
    with quiet:
        loss = run.step(batch, ph.objective)
        value = loss.item()
        if not math.isfinite(value):
            raise _diverged(run, ph.phase, ph.objective, ph.step + 1, ph.lr, value)
        # This rank's share of the global batch, weighted so that the rank-averaged gradient is
        # the gradient of the global batch's mean loss (1 with equal shares).
        share = len(batch.rows) * distributed.world_size() / batch.global_rows
        (loss * share / run.config.grad_accum).backward()
    ph.since += value * len(batch.rows)
    ph.since_rows += len(batch.rows)
    return value


def _evaluate(run: _Run, ph: _Phase, opt: torch.optim.Optimizer, progress: Progress | None) -> None:
    """Score dev (the train loss without dev rows), keep the best state, count patience, record
    the history and write a checkpoint."""
    cfg = run.config
    total, rows = distributed.all_reduce_sum([ph.since, ph.since_rows])
    train_loss = total / max(rows, 1)
    ph.since, ph.since_rows = 0.0, 0
    dev_loss = distributed.broadcast_object(_dev_loss(run, ph.objective))
    score = dev_loss if dev_loss is not None else train_loss
    if not math.isfinite(score):
        raise _diverged(run, ph.phase, ph.objective, ph.step, ph.lr, score)
    if score < ph.best_loss:
        ph.best_loss, ph.best_step, ph.best = score, ph.step, _snapshot(run.model)
    if score < ph.mark * (1.0 - cfg.min_delta) or math.isinf(ph.mark):
        ph.mark, ph.bad = score, 0
    else:
        ph.bad += 1
    epoch = (ph.step - 1) // run.steps_per_epoch
    run.history.append({"phase": ph.phase, "objective": ph.objective, "step": ph.step, "epoch": epoch,
                        "train_loss": train_loss, "dev_loss": dev_loss})
    if progress:
        progress({"phase": ph.phase, "objective": ph.objective, "step": ph.step, "epoch": epoch,
                  "train_loss": train_loss, "dev_loss": dev_loss, "evaluation": True})
    _save_checkpoint(run, ph.checkpoint(run.train.state_dict()), opt, ph.best)
    fault_point("distill.after_checkpoint")


def _take_first_phase(run: _Run) -> None:
    """a2t/t2a with ``first_phase_from``: load that finished run's adapter and record as this
    run's phase 1, after checking that it is exactly the run phase 1 would be."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = run.config
    src = Path(str(cfg.first_phase_from)).expanduser()
    flag = f"--first-phase-from {src}"
    try:
        record = json.loads((src / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IA2Error(f"{flag}: no readable run.json ({type(exc).__name__}: {exc})") from None
    want = cfg.first_phase_config()
    if record.get("cache_key") != run.cache.key or record.get("config_fingerprint") != want.fingerprint():
        theirs = record.get("config") or {}
        diff = [k for k, v in asdict(want).items()
                if k not in ("out", "store", "device", "cache") and theirs.get(k) != v]
        what = f"settings differ: {', '.join(diff)}" if diff else "another cache"
        raise IA2Error(f"{flag}: is not this run's phase 1 ({what})")
    set_peft_model_state_dict(run.model, load_file(src / "adapter_model.safetensors"))
    run.history = [h for h in record["history"] if h["phase"] == 0]
    run.initial = {"0": (record.get("initial_dev_loss") or [None])[0]}
    run.phases = [dict(record["phases"][0], first_phase_from=str(src))]


def distill(config: DistillConfig, loaded: LoadedModel | None = None,
            progress: Progress | None = None) -> DistillResult:
    """Train an adapter from a cache; resume from ``<out>/checkpoint`` if one is there.

    Args:
        config: the run.
        loaded: a loaded base model (it is wrapped in place by peft); loaded on demand otherwise.
        progress: called after every optimizer step and every dev evaluation.

    Returns:
        The adapter directory (loadable with ``peft.PeftModel.from_pretrained``), per phase the
        best step, steps run, whether the cap ended it and its lr, final losses and wall time.

    Raises:
        IA2Error: bad settings, an unusable cache or output folder, or a diverged loss (nothing
            is then saved as a finished adapter).
    """
    t0 = time.perf_counter()
    distributed.init()  # no-op unless launched by torchrun with WORLD_SIZE > 1
    cache, out = _locate(config)
    done = out / "run.json"
    # Checked before any model is loaded: a finished run costs nothing. Under torchrun rank 0
    # decides for all (only it writes --out; other nodes may not even see that directory).
    prev = distributed.rank0_call(lambda: _read_record(done)) or {}
    if prev.get("config_fingerprint") == config.fingerprint() and prev.get("cache_key") == cache.key:
        log.info("%s already holds this finished run: reused", out)
        return _result(prev, str(out), reused=True)

    distributed.rank0_call(lambda: _preflight(config, cache))  # bad input: nothing written yet
    held = contextlib.ExitStack()

    def claim_out() -> None:  # only now: a finished run in a read-only folder is reused above
        check_writable_dir(out, "--out")
        settings = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_FINGERPRINT}
        settings = {**json.loads(json.dumps(settings)), "cache_key": cache.key}
        claim_output_dir(out, "--out", "distill", settings=settings, writes=WRITES,
                         overwrite=config.overwrite)
        held.enter_context(OutputLock(out / LOCK, "--out"))  # for the whole run

    distributed.rank0_call(claim_out)  # only rank 0 writes --out; its refusal stops every rank
    with held:
        try:
            return _distill(config, loaded, progress, t0)
        except BaseException:
            if distributed.is_main():
                release_if_unused(out)  # nothing written but the marker: a corrected rerun may use it
            raise


def _distill(config: DistillConfig, loaded: LoadedModel | None, progress: Progress | None,
             t0: float) -> DistillResult:
    run = _setup(config, loaded)
    phases = SCHEDULES[config.method]
    lrs = config.phase_lrs()
    resumed = _resume(run)
    state: dict[str, Any] = {"phase": 0, "step": 0}
    best, optim = None, None
    if resumed is not None:
        state, best, optim = resumed
        log.info("resuming %s at phase %d step %d", run.out, state["phase"], state["step"])
    elif config.first_phase_from:
        _take_first_phase(run)
        state = {"phase": 1, "step": 0}
    run.step = _wrap_step(run)  # under torchrun: DDP, which broadcasts rank 0's weights now
    for i in range(int(state["phase"]), len(phases)):
        fresh = i != state["phase"]
        run.phases.append(_train_phase(run, i, phases[i], lrs[i], {"phase": i, "step": 0} if fresh else state,
                                       None if fresh else best, None if fresh else optim, progress))
        if i + 1 < len(phases):  # the next phase starts from this phase's best state
            _save_checkpoint(run, {"phase": i + 1, "step": 0}, None, None)
    final = _final_losses(run)
    seconds = round(time.perf_counter() - t0, 3)
    record = _save_outputs(run, final, seconds)
    run.capture.close()
    distributed.barrier()  # rank 0 has written the adapter and run.json
    return _result(record, str(run.out), reused=False)


def _read_record(path: Path) -> dict[str, Any] | None:
    """A finished run's run.json, or None when there is none (or it is not this toolkit's:
    unreadable, not an object). A link or special file there is refused, never followed."""
    import stat as stat_

    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat_.S_ISREG(st.st_mode):
        from ia2cache._io import file_kind, refusal

        raise refusal(path, file_kind(st.st_mode))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _result(record: dict[str, Any], adapter: str, reused: bool) -> DistillResult:
    """A DistillResult from a run.json record (what a finished run wrote, or is writing)."""
    ph = record.get("phases") or []
    return DistillResult(
        adapter, record["config"]["method"], [p["best_epoch"] for p in ph], [p["epochs_run"] for p in ph],
        record["final"], record["seconds"], reused=reused,
        initial_dev_loss=record.get("initial_dev_loss", []), history=record.get("history", []),
        best_step=[p["best_step"] for p in ph], steps_run=[p["steps_run"] for p in ph],
        capped=[p["capped"] for p in ph], lrs=[p["lr"] for p in ph],
    )


def _final_losses(run: _Run) -> dict[str, float | None]:
    """The last phase's losses at its best step (its initial state when that was best)."""
    last = len(run.phases) - 1
    best_step = run.phases[-1]["best_step"]
    entry = next((h for h in run.history if h["phase"] == last and h["step"] == best_step), None)
    if entry is None:
        return {"train_loss": None, "dev_loss": None}
    return {"train_loss": entry["train_loss"], "dev_loss": entry["dev_loss"]}


def _save_outputs(run: _Run, final: dict[str, float | None], seconds: float) -> dict[str, Any]:
    m = run.cache.manifest
    n_phases = len(run.phases)
    record = {
        "config": asdict(run.config),
        "config_fingerprint": run.config.fingerprint(),
        "cache_key": run.cache.key,
        "cache": str(run.cache.path),
        "cache_manifest": {k: m.get(k) for k in ("task", "n", "k", "seed", "site", "layers", "dtype",
                                                  "response", "max_new_tokens", "positions", "model",
                                                  "n_train", "n_dev", "n_unlabelled", "distinct_unlabelled",
                                                  "sft_labels")},
        "model_spec": run.config.model or m.get("about", {}).get("model_spec", "default"),
        "task_spec": m.get("about", {}).get("task_spec", m.get("task")),
        "phases": run.phases,
        "history": run.history,
        "initial_dev_loss": [run.initial.get(str(i)) for i in range(n_phases)],
        "best_epoch": [p["best_epoch"] for p in run.phases],
        "epochs_run": [p["epochs_run"] for p in run.phases],
        "best_step": [p["best_step"] for p in run.phases],
        "steps_run": [p["steps_run"] for p in run.phases],
        "capped": [p["capped"] for p in run.phases],
        "tna_scale": run.tna_scale,
        "final": final,
        "seconds": seconds,
        "data_wait_seconds": round(run.labelled.wait_seconds + (run.everything.wait_seconds
                                                              if run.everything else 0.0), 4),
        "skipped_damaged_rows": {"train": run.labelled.skipped_rows, "dev": run.dev.skipped_rows,
                                 **({"unlabelled": run.everything.skipped_rows - run.labelled.skipped_rows}
                                    if run.everything else {})},
        "train_loop_seconds": round(run.loop_seconds, 4),
    }
    if not distributed.is_main():
        return record
    # peft writes by name (it would follow a link planted in --out): save into a fresh folder of
    # our own, then rename each file into place (a rename replaces a link, never follows it).
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=run.out))
    run.model.save_pretrained(tmp)
    move_into(tmp, run.out)
    write_json_atomic(run.out / "run.json", record, indent=1)
    shutil.rmtree(_ckpt_dir(run.out), ignore_errors=True)
    return record
