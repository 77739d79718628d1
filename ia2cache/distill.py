"""Distill: train a PEFT adapter on the no-demo student from a teacher cache.

The training loop reads top to bottom: set up (cache, model + adapter, loaders), then for each
phase of the method's schedule one visible loop over epochs with early stopping on the dev
rows, then save. The teacher is never run: targets stream from the cache.

Launch: ``ia2cache distill --cache KEY --method a2t`` or ``ia2cache.distill(DistillConfig(...))``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ia2cache import distributed
from ia2cache._faults import fault_point
from ia2cache._fs import location
from ia2cache._io import check_writable_dir, write_json_atomic
from ia2cache.adapters import ADAPTERS, AdapterSpec, attach, position_offset
from ia2cache.errors import IA2Error
from ia2cache.loader import Batch, CacheLoader, LoaderConfig
from ia2cache.models import LoadedModel, home, load_model
from ia2cache.objectives import OBJECTIVES, SCHEDULES, act_loss, tna_loss, tok_loss, tokl_loss
from ia2cache.padding import pad as pad_batch
from ia2cache.sites import decoder_layers, get_site, parse_layers
from ia2cache.store import Cache, resolve_cache

log = logging.getLogger(__name__)

LABELS = ("gt", "icl")


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
    """Labels for tok: gt (gold targets) or icl (the teacher's cached responses)."""
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
    """Adam learning rate (constant). The paper's grid: 1e-4, 3e-4, 1e-3."""
    epochs: int = 50
    """Maximum epochs per phase."""
    batch_size: int = 4
    """Rows per optimizer step (micro-batch rows x grad_accum); under torchrun the global batch,
    split across the ranks."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; micro-batch rows = batch_size / grad_accum."""
    patience: int = 5
    """Early stopping: dev evaluations without improvement before a phase ends."""
    seed: int = 0
    """Seed of the adapter's initialisation and of the row order."""
    layers: str | None = None
    """Layers to align (a subset of the cache's); default all the cache holds."""
    normalize: bool = False
    """Divide each layer's act loss by the teacher's variance at that layer (ledger stats)."""
    tna_weight: float = 0.5
    """w in tna = (1-w)*act + w*tok."""
    model: str | None = None
    """Base model; default the one the cache was collected from."""
    allow_model_mismatch: bool = False
    """Train even if the model's fingerprint differs from the cache's."""
    skip_damaged: bool = False
    """Train without the rows of damaged cache chunks (checksum mismatch, unreadable or deleted
    shard files) instead of stopping; how many rows were dropped is logged and kept in run.json."""
    out: str | None = None
    """Output directory; default $IA2CACHE_HOME/runs/<cache key>/<method>-<adapter>-lr<lr>-s<seed>."""
    device: str | None = None
    """cpu or cuda; default cuda when available."""

    def __post_init__(self) -> None:
        if self.method not in SCHEDULES:
            raise IA2Error(f"--method {self.method}: choose one of {', '.join(SCHEDULES)}")
        if self.labels not in LABELS:
            raise IA2Error(f"--labels {self.labels}: choose gt or icl")
        if self.adapter not in ADAPTERS:
            raise IA2Error(f"--adapter {self.adapter}: choose one of {', '.join(ADAPTERS)}")
        for flag, v in (("--lr", self.lr), ("--epochs", self.epochs), ("--batch-size", self.batch_size),
                        ("--grad-accum", self.grad_accum), ("--patience", self.patience),
                        ("--lora-r", self.lora_r)):
            if v <= 0:
                raise IA2Error(f"{flag} {v}: must be positive")
        if self.batch_size % self.grad_accum:
            raise IA2Error(f"--grad-accum {self.grad_accum}: must divide --batch-size {self.batch_size}")
        if not 0.0 <= self.tna_weight <= 1.0:
            raise IA2Error(f"--tna-weight {self.tna_weight}: must be in [0, 1]")

    def run_name(self) -> str:
        return f"{self.method}-{self.adapter}-lr{self.lr:g}-s{self.seed}"

    def fingerprint(self) -> str:
        """Hash of every field that changes the trained weights."""
        d = {k: v for k, v in asdict(self).items() if k not in ("out", "store", "device", "cache")}
        if not self.skip_damaged:  # off, it changes nothing: runs from before it keep their hash
            d.pop("skip_damaged")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DistillResult:
    adapter: str
    method: str
    best_epoch: list[int]
    epochs_run: list[int]
    final: dict[str, float | None]
    seconds: float
    reused: bool = False
    initial_dev_loss: list[float | None] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


Progress = Callable[[dict[str, Any]], None]
"""Called after every optimizer step and every epoch with a dict of counters and losses."""


# ----------------------------------------------------------------------------- student forward


class _StopForward(Exception):
    """Raised by the last needed hook when no logits are needed: skips the rest of the model."""


class _Capture:
    """Forward hooks that keep the site output of each aligned layer."""

    def __init__(self, model: Any, site: str, layers: list[int]) -> None:
        mods = decoder_layers(model)
        self.out: dict[int, torch.Tensor] = {}
        self.on = False
        self.stop_at: int | None = None
        self.handles = [
            get_site(site).module(mods[i]).register_forward_hook(self._hook(i)) for i in layers
        ]

    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(_mod: Any, _args: Any, output: Any) -> None:
            if self.on:
                self.out[layer] = output[0] if isinstance(output, tuple) else output
                if self.stop_at == layer:
                    raise _StopForward

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


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
    capture: _Capture
    train: CacheLoader
    dev: CacheLoader
    offset: int
    variances: dict[int, float] | None
    out: Path
    device: torch.device
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float | None] = field(default_factory=dict)
    """Dev loss of each phase before its first step (keys are phase indices as strings)."""
    loop_seconds: float = 0.0
    """Wall time inside the training loops (steps plus waiting for data)."""


def _act_source(cache: Cache) -> str:
    return "icl" if cache.manifest.get("response") == "icl" else "target"


def _losses(run: _Run, batch: Batch, objective: str) -> torch.Tensor:
    """The loss of one batch under one objective (a registered ``OBJECTIVES`` entry)."""
    obj = OBJECTIVES[objective]
    cfg, dev = run.config, run.device
    act_src = _act_source(run.cache)
    tok_src = "icl" if cfg.labels == "icl" else "target"
    bi = torch.arange(len(batch.rows), device=dev)[:, None]
    losses: dict[str, torch.Tensor] = {}
    if obj.needs_acts or obj.needs_topk:
        act_seq = _sequence(batch, act_src, run.tokenizer.pad_token_id, dev)
        # With T=1 (or ICL labels) the tok sequence is this very sequence: one forward serves both.
        share = obj.needs_logits and not obj.needs_topk and (
            tok_src == act_src or int(batch.response_len.max()) == 1 == int(batch.target_len.max()))
        want_logits = obj.needs_topk or share
        run.capture.on = obj.needs_acts
        run.capture.stop_at = run.layers[-1] if not want_logits else None
        try:
            out = run.model(input_ids=act_seq.ids, attention_mask=act_seq.mask)
        except _StopForward:
            out = None
        run.capture.on = False
        pos = batch.student_positions.to(dev) + run.offset
        pmask = batch.position_mask.to(dev)
        if obj.needs_acts:
            student = {i: run.capture.out[i][bi, pos] for i in run.layers}
            teacher = {i: batch.acts[i].to(dev).float() for i in run.layers}
            losses["act"] = act_loss(student, teacher, pmask, run.variances)
        if obj.needs_topk:
            assert out is not None
            losses["tokl"] = tokl_loss(out.logits[bi, pos], batch.topk_values.to(dev),
                                       batch.topk_ids.to(dev), pmask)
        if share:
            assert out is not None
            pad = run.tokenizer.pad_token_id
            seq = act_seq if tok_src == act_src else _sequence(batch, tok_src, pad, dev)
            lp = seq.label_pos + run.offset
            losses["tok"] = tok_loss(out.logits[bi, lp], seq.labels, seq.label_mask)
    if obj.needs_logits and not obj.needs_topk and "tok" not in losses:
        seq = _sequence(batch, tok_src, run.tokenizer.pad_token_id, dev)
        out = run.model(input_ids=seq.ids, attention_mask=seq.mask)
        losses["tok"] = tok_loss(out.logits[bi, seq.label_pos + run.offset], seq.labels, seq.label_mask)
    if objective == "tna":
        return tna_loss(losses["act"], losses["tok"], cfg.tna_weight)
    return losses[objective]


@torch.no_grad()
def _dev_loss(run: _Run, objective: str) -> float | None:
    if len(run.dev.rows) == 0:
        return None
    run.model.eval()
    total, n = 0.0, 0
    run.dev.load_state_dict({"epoch": 0, "position": 0, "seed": run.config.seed})
    for batch in run.dev:
        rows = len(batch.rows)
        total += float(_losses(run, batch, objective)) * rows
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


def _save_checkpoint(run: _Run, state: dict[str, Any], opt: torch.optim.Optimizer,
                     best: dict[str, torch.Tensor] | None) -> None:
    """Tensors in safetensors, counters in JSON; ``state.json`` is renamed in last, so a kill
    at any moment leaves the previous checkpoint whole. Under torchrun only rank 0 writes."""
    from safetensors.torch import save_file

    if not distributed.is_main():
        return

    d = _ckpt_dir(run.out)
    d.mkdir(parents=True, exist_ok=True)
    tag = f"{state['phase']}-{state['epoch']}"
    current = {k: v.contiguous().cpu() for k, v in _snapshot(run.model).items()}
    save_file(current, d / f"adapter-{tag}.safetensors")
    fault_point("distill.mid_checkpoint")  # a kill here must leave the previous checkpoint usable
    if best is not None:
        save_file({k: v.contiguous().cpu() for k, v in best.items()}, d / f"best-{tag}.safetensors")
    osd = opt.state_dict()
    flat = _flat_optim(osd["state"])
    if flat:
        save_file(flat, d / f"optim-{tag}.safetensors")
    meta = {**state, "tag": tag, "param_groups": osd["param_groups"], "has_best": best is not None,
            "config_fingerprint": run.config.fingerprint(), "cache_key": run.cache.key,
            "has_optim": bool(flat), "history": run.history, "initial": run.initial}
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
    run.history, run.initial = distributed.broadcast_object([run.history, run.initial])
    distributed.broadcast_params(list(_trainable(run.model).values()))
    if meta is None:
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
    from ia2cache.collect import default_store

    store = location(config.store) if config.store else default_store()
    cache = Cache.open(resolve_cache(store, config.cache))
    out = Path(config.out).expanduser() if config.out else home() / "runs" / cache.key / config.run_name()
    return cache, out


def _setup(config: DistillConfig, loaded: LoadedModel | None) -> _Run:
    distributed.init()  # no-op unless launched by torchrun with WORLD_SIZE > 1
    cache, out = _locate(config)
    manifest = cache.manifest
    if cache.status != "complete":
        raise IA2Error(f"--cache {cache.path}: is {cache.status}, not complete; run `ia2cache collect` again")
    phases = SCHEDULES[config.method]
    if any(OBJECTIVES[p].needs_topk for p in phases) and not manifest.get("topk_logits"):
        raise IA2Error(
            f"--method {config.method}: the cache has no top-k logits; collect with --topk-logits K"
        )
    spec = config.model or manifest.get("about", {}).get("model_spec", "default")
    device = torch.device(config.device) if config.device else None
    if loaded is None:
        loaded = load_model(spec, device=device)
    layers = parse_layers(config.layers or "all", manifest["model"]["layers_total"])
    missing = sorted(set(layers) - set(manifest["layers"]))
    if config.layers is None:
        layers = list(manifest["layers"])
    elif missing:
        raise IA2Error(f"--layers {config.layers}: layer {missing[0]} is not in the cache "
                       f"(it holds {manifest['layers']})")
    torch.manual_seed(config.seed)  # the adapter's initialisation
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    aspec = AdapterSpec(config.lora_r, config.lora_alpha, config.target_modules, config.num_virtual_tokens)
    model = attach(loaded.model, config.adapter, aspec)
    distributed.broadcast_params(list(_trainable(model).values()))  # same start on every rank
    micro = config.batch_size // config.grad_accum
    common = dict(batch_size=micro, layers=tuple(layers), seed=config.seed, skip_damaged=config.skip_damaged)
    checks = dict(model_info=loaded.info, allow_model_mismatch=config.allow_model_mismatch,
                  pad_id=loaded.tokenizer.pad_token_id)
    # Data parallel (torchrun): each global batch is split across ranks; dev is evaluated whole
    # on every rank, so early stopping decides the same everywhere.
    ranks = dict(rank=distributed.rank(), world_size=distributed.world_size())
    train = CacheLoader(cache, LoaderConfig(split="train", **common, **ranks), **checks)
    dev = CacheLoader(cache, LoaderConfig(split="dev", shuffle=False, **common), **checks)
    variances = None
    if config.normalize:
        site = manifest["site"]
        variances = {i: float(cache.stats(f"acts/{site}/layer_{i:03d}")["var"]) for i in layers}
    if distributed.is_main():  # only rank 0 writes --out
        out.mkdir(parents=True, exist_ok=True)
    return _Run(config=config, cache=cache, model=model, tokenizer=loaded.tokenizer, layers=layers,
                capture=_Capture(model, manifest["site"], layers), train=train, dev=dev,
                offset=position_offset(config.adapter, aspec), variances=variances, out=out,
                device=loaded.device)


# ----------------------------------------------------------------------------- train


def _train_phase(run: _Run, phase: int, objective: str, start: dict[str, Any] | None,
                 best: dict[str, torch.Tensor] | None, optim_state: dict | None,
                 progress: Progress | None) -> tuple[int, int]:
    """Train one objective to early stopping; restore its best state. Returns (best, epochs run)."""
    cfg = run.config
    params = list(_trainable(run.model).values())
    opt = torch.optim.Adam(params, lr=cfg.lr)  # a fresh optimizer per phase (a2t, t2a)
    if optim_state is not None:
        opt.load_state_dict(optim_state)
    if start is None:
        run.initial[str(phase)] = _dev_loss(run, objective)
    first = start["epoch"] if start else 0
    best_loss = start["best_loss"] if start else float("inf")
    best_epoch = start["best_epoch"] if start else -1
    bad = start["bad"] if start else 0
    epoch = first
    for epoch in range(first, cfg.epochs):
        if bad >= cfg.patience:
            break
        run.model.train()
        run.train.set_epoch(phase * 100_000 + epoch)  # a fresh, reproducible order per epoch
        total, rows = 0.0, 0
        opt.zero_grad(set_to_none=True)
        t_loop = time.perf_counter()
        for step, batch in enumerate(run.train, start=1):
            loss = _losses(run, batch, objective)
            # This rank's share of the global batch, weighted so that the rank-averaged gradient
            # is the gradient of the global batch's mean loss (weight 1 with equal shares).
            share = len(batch.rows) * distributed.world_size() / batch.global_rows
            (loss * share / cfg.grad_accum).backward()
            if step % cfg.grad_accum == 0 or step == len(run.train):
                distributed.all_reduce_grads(params)
                opt.step()
                opt.zero_grad(set_to_none=True)
            total += loss.item() * len(batch.rows)
            rows += len(batch.rows)
            if progress:
                progress({"phase": phase, "objective": objective, "epoch": epoch, "step": step,
                          "steps": len(run.train), "loss": loss.item()})
        run.loop_seconds += time.perf_counter() - t_loop
        total, rows = distributed.all_reduce_sum([total, rows])
        train_loss = total / max(rows, 1)
        dev_loss = distributed.broadcast_object(_dev_loss(run, objective))
        score = dev_loss if dev_loss is not None else train_loss
        if score < best_loss:
            best_loss, best_epoch, bad, best = score, epoch, 0, _snapshot(run.model)
        else:
            bad += 1
        run.history.append({"phase": phase, "objective": objective, "epoch": epoch,
                            "train_loss": train_loss, "dev_loss": dev_loss})
        if progress:
            progress({"phase": phase, "objective": objective, "epoch": epoch, "train_loss": train_loss,
                      "dev_loss": dev_loss, "end_of_epoch": True})
        _save_checkpoint(run, {"phase": phase, "epoch": epoch + 1, "best_loss": best_loss,
                               "best_epoch": best_epoch, "bad": bad}, opt, best)
        fault_point("distill.after_checkpoint")
    if best is not None:
        _restore(run.model, best)  # really restore the best epoch's weights
    return best_epoch, sum(1 for h in run.history if h["phase"] == phase)


def distill(config: DistillConfig, loaded: LoadedModel | None = None,
            progress: Progress | None = None) -> DistillResult:
    """Train an adapter from a cache; resume from ``<out>/checkpoint`` if one is there.

    Args:
        config: the run.
        loaded: a loaded base model (it is wrapped in place by peft); loaded on demand otherwise.
        progress: called after every step and epoch.

    Returns:
        The adapter directory (loadable with ``peft.PeftModel.from_pretrained``), best epochs,
        epochs run per phase, final losses and wall time.
    """
    t0 = time.perf_counter()
    distributed.init()  # no-op unless launched by torchrun with WORLD_SIZE > 1
    cache, out = _locate(config)
    done = out / "run.json"
    # Checked before any model is loaded: a finished run costs nothing. Under torchrun rank 0
    # decides for all (only it writes --out; other nodes may not even see that directory).
    prev = distributed.rank0_call(lambda: json.loads(done.read_text()) if done.is_file() else None) or {}
    if prev.get("config_fingerprint") == config.fingerprint() and prev.get("cache_key") == cache.key:
        log.info("%s already holds this finished run: reused", out)
        return DistillResult(str(out), config.method, prev["best_epoch"], prev["epochs_run"],
                             prev["final"], prev["seconds"], reused=True,
                             initial_dev_loss=prev.get("initial_dev_loss", []), history=prev["history"])

    def check_out() -> None:  # only now: a finished run in a read-only folder is reused above
        check_writable_dir(out, "--out")

    distributed.rank0_call(check_out)  # only rank 0 writes --out; its refusal stops every rank
    run = _setup(config, loaded)
    resumed = _resume(run)
    start_phase, start, best, optim = 0, None, None, None
    if resumed is not None:
        meta, best, optim = resumed
        start_phase, start = meta["phase"], meta
        log.info("resuming %s at phase %d epoch %d", run.out, meta["phase"], meta["epoch"])
    best_epochs, epochs_run = [], []
    phases = SCHEDULES[config.method]
    for i, objective in enumerate(phases):
        if i < start_phase:
            best_epochs.append(_phase_best(run.history, i))
            epochs_run.append(sum(1 for h in run.history if h["phase"] == i))
            continue
        s = start if i == start_phase else None
        b, n = _train_phase(run, i, objective, s, best if s else None, optim if s else None, progress)
        best_epochs.append(b)
        epochs_run.append(n)
        if i + 1 < len(phases):  # the next phase starts from this phase's best state
            _save_checkpoint(run, {"phase": i + 1, "epoch": 0, "best_loss": float("inf"),
                                   "best_epoch": -1, "bad": 0},
                             torch.optim.Adam(list(_trainable(run.model).values()), lr=config.lr), None)
    final = _final_losses(run, len(phases) - 1)
    seconds = round(time.perf_counter() - t0, 3)
    _save_outputs(run, best_epochs, epochs_run, final, seconds)
    run.capture.close()
    distributed.barrier()  # rank 0 has written the adapter and run.json
    initial = [run.initial.get(str(i)) for i in range(len(phases))]
    return DistillResult(str(run.out), config.method, best_epochs, epochs_run, final, seconds,
                         initial_dev_loss=initial, history=run.history)


def _best_entry(history: list[dict[str, Any]], phase: int) -> dict[str, Any] | None:
    """The epoch of ``phase`` that early stopping kept (lowest dev loss, else train loss)."""
    mine = [h for h in history if h["phase"] == phase]
    return min(mine, key=lambda h: h["dev_loss"] if h["dev_loss"] is not None else h["train_loss"],
               default=None)


def _phase_best(history: list[dict[str, Any]], phase: int) -> int:
    best = _best_entry(history, phase)
    return best["epoch"] if best else -1


def _final_losses(run: _Run, last_phase: int) -> dict[str, float | None]:
    best = _best_entry(run.history, last_phase)
    return {"train_loss": best["train_loss"] if best else None,
            "dev_loss": best["dev_loss"] if best else None}


def _save_outputs(run: _Run, best_epochs: list[int], epochs_run: list[int],
                  final: dict[str, float | None], seconds: float) -> None:
    if not distributed.is_main():
        return
    run.model.save_pretrained(run.out)
    m = run.cache.manifest
    record = {
        "config": asdict(run.config),
        "config_fingerprint": run.config.fingerprint(),
        "cache_key": run.cache.key,
        "cache": str(run.cache.path),
        "cache_manifest": {k: m.get(k) for k in ("task", "n", "k", "seed", "site", "layers", "dtype",
                                                  "response", "max_new_tokens", "positions", "model")},
        "model_spec": run.config.model or m.get("about", {}).get("model_spec", "default"),
        "task_spec": m.get("about", {}).get("task_spec", m.get("task")),
        "phases": list(SCHEDULES[run.config.method]),
        "history": run.history,
        "initial_dev_loss": [run.initial.get(str(i)) for i in range(len(best_epochs))],
        "best_epoch": best_epochs,
        "epochs_run": epochs_run,
        "final": final,
        "seconds": seconds,
        "data_wait_seconds": round(run.train.wait_seconds, 4),
        "skipped_damaged_rows": {"train": run.train.skipped_rows, "dev": run.dev.skipped_rows},
        "train_loop_seconds": round(run.loop_seconds, 4),
    }
    write_json_atomic(run.out / "run.json", record, indent=1)
    shutil.rmtree(_ckpt_dir(run.out), ignore_errors=True)
