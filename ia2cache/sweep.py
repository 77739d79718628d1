"""Sweep: the paper's comparison (methods x N x seeds) from caches collected once.

The work comes in units: the base model once, then one unit per (N, data seed). A unit
collects its cache once (or reuses it) and runs its cells in order: the ICL teacher (demos from
the N training rows, the teacher's k), then each method. A method trains one adapter per
learning rate of the grid and keeps the one with the lowest **dev** loss (the eval split is
never read for selection); two-phase methods choose each phase's lr on its own dev loss:
a2t's IA2 phase is the act cell's chosen run itself (``first_phase_from``), and its SFT phase is
chosen on dev cross-entropy. Every finished cell is appended at once to the shard's results
file; a rerun skips finished cells.

Cells are identified by everything that changes their result (``settings``: model and task
fingerprints, budgets, lr grid, adapter, labels, dev size, n_eval, ICL options, eval task).
A rerun into the same ``--out`` with other settings is refused, naming the setting, so
``sweep-<task>.json`` and the results only ever describe rows these settings produced. The
grid axes (N, seeds, methods) may grow between runs.

Parallel: ``workers`` processes take units (one torch thread each by default on CPU; one GPU
each, round robin, where several are visible). Several machines: ``shard="i/n"`` runs a
deterministic 1/n of the units into ``results-<i>of<n>.jsonl``; ``report`` reads them all.

Launch: ``ia2cache sweep --task antonyms --n 4,8,16 --seeds 0-4 --workers 2``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ia2cache._io import write_json_atomic
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.errors import IA2Error
from ia2cache.evaluate import EvalConfig, evaluate, load_adapter, ood_task
from ia2cache.objectives import OBJECTIVES, SCHEDULES
from ia2cache.outputs import OutputLock, claim_output_dir, json_safe
from ia2cache.prompts import DEFAULT_DEV, DEFAULT_POSITIONS, ICL_DEMOS, check_positions, check_seed

log = logging.getLogger(__name__)

SWEEP_METHODS: dict[str, tuple[str, str | None]] = {
    **{m: (m, None) for m in SCHEDULES},
    "tok_icl": ("tok", "icl"),
}
"""Sweep method name -> (distill method, labels override). ``tok_icl`` is SFT on the teacher's
own responses (``--labels icl``), which the paper also reports."""
FIRST_PHASE = {"a2t": "act", "t2a": "tok"}
"""Two-phase methods whose first phase is a single-phase method's chosen run."""
MAX_CELLS = 100_000
"""A grid larger than this is refused before anything runs (a typo like --seeds 0-99999999)."""

Event = dict[str, Any]


@dataclass(frozen=True)
class SweepConfig:
    """A grid of cells: task x N x data seed x method, and how each cell is trained."""

    task: str
    """Built-in task name, hf:NAME or .jsonl file."""
    out: str
    """Directory for results, per-row predictions, adapters and sweep-<task>.json."""
    ns: tuple[int, ...] = (4, 8, 16)
    """Training set sizes N."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Data seeds (they pick the N examples and the demos; the adapter seed follows them)."""
    methods: tuple[str, ...] = ("tok", "act", "a2t", "tna", "tok_icl")
    """Methods to compare: any distill method, and tok_icl (SFT on the teacher's responses)."""
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    """Learning-rate grid (the paper's); each method and phase picks one on its dev loss."""
    lr_search: str = "grid"
    """grid: train every lr; descend: from the largest lr down, stop at the first that does not
    improve the dev loss (saves the slow small rates where they cannot win)."""
    max_steps: int = 1000
    """Optimizer steps per phase at most; the rows record when it binds (capped)."""
    eval_every: int = 10
    """Steps between dev evaluations (early stopping's clock)."""
    patience: int = 5
    """Dev evaluations without a min_delta improvement before a phase stops."""
    min_delta: float = 0.01
    """Relative dev improvement that resets patience."""
    batch_size: int = 4
    """Rows per optimizer step (the paper's 4)."""
    n_eval: int = 100
    """Eval-split rows scored per cell."""
    dev: str = str(DEFAULT_DEV)
    """Dev rows D per cell: a count, or 'half' for N//2; extra labelled data ("N train + D dev")."""
    icl_k: int | None = None
    """Demos for the ICL baseline; None: the teacher's own k, min(N-1, 8)."""
    icl_demos: str = "train"
    """Where the ICL baseline's demos come from: train (the N rows: the teacher) or pool."""
    model: str = "default"
    """Base model."""
    store: str | None = None
    """Cache store; default $IA2CACHE_HOME/store."""
    labels: str = "gt"
    """Labels for tok phases (tok_icl always uses the teacher's responses)."""
    adapter: str = "lora"
    """PEFT adapter type."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 8
    """LoRA alpha."""
    target_modules: str = "q,k,o"
    """Modules the adapter changes."""
    eval_task: str | None = None
    """Score every cell on this task's eval split instead (out of distribution, e.g. train
    hf:sst2, eval hf:fins); caches, adapters and ICL demos still come from ``task``."""
    unlabelled: tuple[int, ...] = (0,)
    """M values (a grid axis): unlabelled teacher rows the phases whose objective reads no labels
    (act, tokl) also train on (``collect --unlabelled M``). Methods without such a phase (tok,
    tna, ICL) run at M=0 only."""
    unlabelled_file: str | None = None
    """JSONL of {"input": ...} lines to draw the unlabelled queries from (default: the pool rows
    after train and dev, targets dropped)."""
    positions: str = DEFAULT_POSITIONS
    """Aligned positions of the caches, as ``collect --positions`` (response is the paper's;
    query+response an ablation)."""
    runs: str | None = None
    """Folder for the trained adapters; default <out>/adapters. Sweeps that share one share every
    identical run (distill reuses a finished run of the same settings and cache), e.g. a full-grid
    check after a --lr-search descend run trains only the rates the first one skipped. Runs of
    other caches (model, dev size, unlabelled file, positions) get folders of their own; sweeps
    with other training settings (budgets, adapter) need their own --runs."""
    workers: int = 1
    """Processes running units at once (one torch thread each on CPU by default)."""
    threads: int | None = None
    """Torch threads per worker process; default 1 when workers > 1 on CPU."""
    shard: str | None = None
    """'i/n': run only units j with j % n == i (for Slurm arrays, torchrun ranks, indexed jobs)."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in SWEEP_METHODS]
        if bad:
            raise IA2Error(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(SWEEP_METHODS)}")
        if not self.methods:
            raise IA2Error("--methods: give at least one method")
        if not self.ns or min(self.ns) < 2:
            raise IA2Error(f"--n {','.join(map(str, self.ns))}: every N must be at least 2")
        if not self.seeds:
            raise IA2Error("--seeds: give at least one seed")
        bad_m = [x for x in self.unlabelled if isinstance(x, bool) or not 0 <= x <= 1_000_000]
        if not self.unlabelled or bad_m:
            raise IA2Error(f"--unlabelled {','.join(map(str, self.unlabelled))}: give row counts 0..1000000")
        for s in self.seeds:
            check_seed(s, "--seeds")
        if not self.lrs or any(not (math.isfinite(x) and 0 < x <= 10) for x in self.lrs):
            raise IA2Error(f"--lrs {','.join(map(str, self.lrs))}: give finite learning rates in (0, 10]")
        cells = len(self.ns) * len(self.seeds) * (len(self.methods) + 1) * len(self.unlabelled)
        if cells > MAX_CELLS:
            raise IA2Error(f"--n/--seeds/--methods: {cells} cells is more than {MAX_CELLS}; split the sweep")
        if self.lr_search not in ("grid", "descend"):
            raise IA2Error(f"--lr-search {self.lr_search}: choose grid or descend")
        if self.icl_demos not in ICL_DEMOS:
            raise IA2Error(f"--icl-demos {self.icl_demos}: choose train or pool")
        if self.icl_k is not None and not 1 <= self.icl_k <= min(self.ns):
            raise IA2Error(f"--icl-k {self.icl_k}: must be 1..N (the smallest N is {min(self.ns)})")
        if not 1 <= self.workers <= 256:
            raise IA2Error(f"--workers {self.workers}: must be 1..256")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise IA2Error(f"--threads {self.threads}: must be 1..256")
        if self.dev != "half":
            try:
                if not 1 <= int(self.dev) <= 100_000:
                    raise ValueError
            except ValueError:
                raise IA2Error(f"--dev {self.dev}: a row count 1..100000, or 'half' (N//2)") from None
        parse_shard(self.shard)
        if self.unlabelled_file and not any(self.unlabelled):
            raise IA2Error(f"--unlabelled-file {self.unlabelled_file}: give an M > 0 in --unlabelled "
                           "(M = 0 cells are the labelled-only reference and read no file)")
        check_positions(self.positions)
        self.distill_template(4, 0, "tok", 1e-3)  # the shared training settings are valid

    def dev_rows(self, n: int) -> int:
        """D for training set size N."""
        return max(1, n // 2) if self.dev == "half" else int(self.dev)

    def distill_template(self, n: int, seed: int, method: str, lr: float, **kw: Any) -> Any:
        dmethod, labels = SWEEP_METHODS[method]
        kw.setdefault("cache", "-")
        return DistillConfig(method=dmethod, labels=labels or self.labels, adapter=self.adapter,
                             lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                             target_modules=self.target_modules,
                             lr=lr, max_steps=self.max_steps, eval_every=self.eval_every,
                             patience=self.patience, min_delta=self.min_delta, batch_size=self.batch_size,
                             seed=seed, **kw)


NON_SETTINGS = frozenset({"task", "out", "ns", "seeds", "methods", "store", "workers", "threads", "shard",
                          "model", "eval_task", "runs", "unlabelled", "unlabelled_file", "positions"})
"""SweepConfig fields that do not change a cell's result (grid axes, where and how it runs), or
that enter the settings resolved (model -> fingerprint, tasks -> content hashes) or only when not
at their default (:func:`_settings`). Every other field is a setting: a new field is one unless it
is declared here."""


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise IA2Error(f"--shard {spec}: expected i/n, e.g. 0/4") from None
    if not (1 <= n <= 100_000 and 0 <= i < n):
        raise IA2Error(f"--shard {spec}: need 0 <= i < n")
    return i, n


def parse_ints(spec: str, flag: str, lo: int = 0, hi: int = 2**32 - 1, most: int = 10_000) -> tuple[int, ...]:
    """``4,8,16`` or ``0-4`` -> a tuple of ints in [lo, hi], at most ``most`` of them. Ranges are
    checked before they are expanded, so ``0-99999999999`` costs nothing."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                first, last = int(a), int(b)
                if last < first:
                    raise IA2Error(f"{flag} {spec}: range {part} runs backwards")
                ends = (first, last)
            else:
                first = last = int(part)
                ends = (first,)
            if any(not lo <= x <= hi for x in ends):
                raise IA2Error(f"{flag} {spec}: values must be in [{lo}, {hi}]")
            if len(out) + (last - first + 1) > most:
                raise IA2Error(f"{flag} {spec}: more than {most} values")
            out.extend(range(first, last + 1))
    except ValueError:
        raise IA2Error(f"{flag} {spec}: expected integers like 4,8,16 or ranges like 0-4") from None
    if len(set(out)) != len(out):
        raise IA2Error(f"{flag} {spec}: a value is repeated")
    return tuple(out)


def parse_floats(spec: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise IA2Error(f"{flag} {spec}: expected numbers like 1e-4,3e-4,1e-3") from None
    if len(values) > 100:
        raise IA2Error(f"{flag} {spec}: at most 100 values")
    return values


# ----------------------------------------------------------------------------- results


def _cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["task"], row.get("eval_task", row["task"]), row["n"], row["seed"], row["method"],
            row.get("unlabelled", 0), row.get("settings"))


def results_files(out: Path) -> list[Path]:
    """Every shard's results file in a sweep directory (``results.jsonl``, ``results-<i>of<n>.jsonl``)."""
    return sorted(p for p in out.glob("results*.jsonl") if p.is_file() and not p.is_symlink())


def read_results(out: Path, failed: bool = False) -> list[dict[str, Any]]:
    """Finished cells of every results file in ``out`` (a cell finished twice counts once). With
    ``failed``, the cells that failed instead (their error recorded) and have not succeeded since.
    A torn line (not JSON) is skipped with a warning naming the file and line.

    Raises:
        IA2Error: a line that is JSON but not a results row, naming the file and line.
    """
    ok: dict[tuple[Any, ...], dict[str, Any]] = {}
    bad: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in results_files(Path(out)):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A line cut by a kill mid-write (a later append may have continued it): skipped,
                # that cell simply reruns. A JSON line of the wrong shape is refused below.
                log.warning("%s:%d: unreadable (torn) line skipped", path, i)
                continue
            _check_row(row, path, i)
            key = _cell_key(row)
            if row.get("status", "ok") == "failed":
                bad[key] = row
            else:
                ok[key] = row  # a cell finished twice counts once (the later line)
    if failed:
        return [r for k, r in bad.items() if k not in ok]
    return list(ok.values())


_ROW_FIELDS = {"task": str, "n": int, "seed": int, "method": str}


def _check_row(row: Any, path: Path, line: int) -> None:
    if not isinstance(row, dict):
        raise IA2Error(f"{path}:{line}: a results row must be a JSON object")
    for name, kind in _ROW_FIELDS.items():
        v = row.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise IA2Error(f"{path}:{line}: field {name!r} must be {kind.__name__}, got {v!r}")
    for name in ("task", "eval_task", "method"):
        v = row.get(name)
        if isinstance(v, str) and (not v or "/" in v or "\\" in v or v.startswith(".") or "\0" in v):
            raise IA2Error(f"{path}:{line}: field {name!r} {v!r} is not a plain name")


def select_lr(candidates: Iterable[tuple[float, float | None]]) -> float | None:
    """The learning rate with the lowest dev loss; ties go to the smaller rate. Only dev losses
    are passed in, so selection cannot see the eval split. Non-finite or missing losses (a
    diverged run) are skipped; None when every rate was."""
    scored = [(loss, lr) for lr, loss in candidates if loss is not None and math.isfinite(loss)]
    return min(scored)[1] if scored else None


def _metrics(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "confidence", "ece_equal_mass", "ece_equal_width", "nll", "agreement_with_icl",
            "n_eval", "k", "icl_demos")
    return {k: r.get(k) for k in keys}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class _Plan:
    """What a sweep run will do: its settings, label, units and results file."""

    config: SweepConfig
    label: str
    task_name: str
    eval_name: str
    settings: dict[str, Any]
    settings_hash: str
    units: list[tuple[int, int, int]]
    """(N, seed, M) units in canonical order; unit (0, 0, 0) is the base model."""
    mine: list[int] = field(default_factory=list)
    """Indices of the units this shard runs."""


def _settings(config: SweepConfig, task: Any, target: Any, model_fp: dict[str, str]) -> dict[str, Any]:
    d = {k: v for k, v in asdict(config).items() if k not in NON_SETTINGS}
    d.update(model=model_fp, task=task.content_hash, lrs=[float(x) for x in config.lrs],
             eval_task=target.content_hash if config.eval_task else None)
    # Settings added later enter only when not at their default, so that every sweep run before
    # keeps its settings (and its finished cells).
    if config.unlabelled_file:
        from ia2cache.tasks import load_unlabelled

        d["unlabelled_file"] = load_unlabelled(config.unlabelled_file)[1]
    if config.positions != DEFAULT_POSITIONS:
        d["positions"] = config.positions
    return d


def _plan(config: SweepConfig) -> _Plan:
    from ia2cache._fs import is_url
    from ia2cache._io import check_writable_dir
    from ia2cache.models import load_tokenizer
    from ia2cache.tasks import load_task

    check_writable_dir(config.out, "--out")
    if config.store and not is_url(config.store):
        check_writable_dir(config.store, "--store")
    task = load_task(config.task)
    target = ood_task(task, load_task(config.eval_task)) if config.eval_task else task
    label = task.name if target is task else f"{task.name}->{target.name}"
    for n in config.ns:
        if n + 1 > len(task.pool):
            raise IA2Error(f"--n {n}: task {task.name!r} has {len(task.pool)} pool examples; "
                           "N + dev rows must fit")
    _, info = load_tokenizer(config.model)
    model_fp = {"name": info.name, "fingerprint": info.fingerprint, "tokenizer": info.tokenizer_fingerprint,
                "random": info.random}
    settings = _settings(config, task, target, model_fp)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    ms = sorted(set(config.unlabelled) | {0})  # M=0 always: tok, tna and ICL run there
    units = [(0, 0, 0)] + [(n, s, m) for n in config.ns for s in config.seeds for m in ms]
    i, k = parse_shard(config.shard)
    mine = [j for j in range(len(units)) if j % k == i]
    return _Plan(config, label, task.name, target.name, settings, digest, units, mine)


def _check_settings(out: Path, plan: _Plan) -> None:
    """Refuse a rerun into ``out`` with other settings, naming the first one that differs."""
    path = out / f"sweep-{plan.label}.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IA2Error(f"{path}: unreadable ({type(exc).__name__}); it describes this --out's cells"
                       ) from None
    prev = old.get("settings") if isinstance(old, dict) else None
    if not isinstance(prev, dict):
        raise IA2Error(f"--out {out}: {path.name} was written by an older ia2cache sweep (no settings); "
                       "use a new --out")
    for key in sorted(set(prev) | set(plan.settings)):
        if prev.get(key) != plan.settings.get(key):
            flag = {"model": "--model", "task": "--task (its content)",
                    "eval_task": "--eval-task (its content)"}
            raise IA2Error(
                f"{flag.get(key, '--' + key.replace('_', '-'))}: {path} was made with {prev.get(key)!r}, "
                f"this run has {plan.settings.get(key)!r}; its rows would mix settings. Use another --out"
            )


def _write_settings(out: Path, plan: _Plan) -> None:
    path = out / f"sweep-{plan.label}.json"
    old: dict[str, Any] = {}
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
    grid = old.get("grid", {"ns": [], "seeds": [], "methods": []})
    c = plan.config
    merged = {"ns": sorted(set(grid["ns"]) | set(c.ns)), "seeds": sorted(set(grid["seeds"]) | set(c.seeds)),
              "methods": [m for m in SWEEP_METHODS if m in set(grid["methods"]) | set(c.methods)]}
    write_json_atomic(path, {"task": c.task, "eval_task": c.eval_task, "label": plan.label,
                             "settings": plan.settings, "settings_hash": plan.settings_hash,
                             "grid": merged}, indent=1)


def _results_path(out: Path, config: SweepConfig) -> Path:
    i, n = parse_shard(config.shard)
    return out / ("results.jsonl" if config.shard is None else f"results-{i}of{n}.jsonl")


# ----------------------------------------------------------------------------- cells


class _Unit:
    """Runs the cells of one unit in a worker: loads what it needs once, yields rows."""

    def __init__(self, config: SweepConfig, plan: dict[str, Any], out: Path, m: int = 0) -> None:
        self.config, self.plan, self.out, self.m = config, plan, out, m
        self._base: Any = None

    def base_model(self) -> Any:
        from ia2cache.models import load_model

        if self._base is None:
            self._base = load_model(self.config.model)
        return self._base

    def row(self, n: int, seed: int, method: str) -> dict[str, Any]:
        ablation = {"positions": self.config.positions} if self.config.positions != DEFAULT_POSITIONS else {}
        return {"task": self.plan["task"], "eval_task": self.plan["eval_task"], "n": n, "seed": seed,
                "method": method, "settings": self.plan["settings_hash"], "status": "ok",
                "model": self.plan["model"], "unlabelled": self.m,
                "dev": self.config.dev_rows(n) if n else 0, **ablation}

    def cells(self, n: int, seed: int, todo: list[str]) -> Iterator[dict[str, Any]]:
        c = self.config
        target = self._target()
        if n == 0:
            lm = self.base_model()
            r = evaluate(lm.model, lm.tokenizer, target, EvalConfig(mode="base", n_eval=c.n_eval, seed=0),
                         details=True)
            yield {**self.row(0, 0, "base"), **_metrics(r), "preds": r["rows"]}
            return
        cache = self._collect(n, seed)
        k = c.icl_k or cache.manifest["k"]
        teacher: list[Any] | None = None  # the ICL teacher's answers, for every cell's agreement
        for method in todo:
            try:
                if method == "icl" or teacher is None:
                    lm = self.base_model()
                    ec = EvalConfig(mode="icl", k=k, n=n, n_eval=c.n_eval, seed=seed, icl_demos=c.icl_demos)
                    r = evaluate(lm.model, lm.tokenizer, target, ec, details=True)
                    teacher = r["rows"]["answer"]
                if method == "icl":
                    yield {**self.row(n, seed, method), **_metrics(r), "cache": cache.key, "preds": r["rows"]}
                else:
                    yield self._method_cell(n, seed, method, cache, k, teacher)
            except IA2Error as exc:
                yield {**self.row(n, seed, method), "status": "failed", "error": str(exc)}
            except Exception as exc:  # recorded, so that one bad cell does not stop the others
                tb = traceback.format_exc(limit=8)
                yield {**self.row(n, seed, method), "status": "failed",
                       "error": f"{type(exc).__name__}: {exc}", "traceback": tb}

    def _target(self) -> Any:
        from ia2cache.tasks import load_task

        task = load_task(self.config.task)
        return ood_task(task, load_task(self.config.eval_task)) if self.config.eval_task else task

    def _collect(self, n: int, seed: int) -> Any:

        c = self.config
        from ia2cache.store import Cache

        # M = 0 is the labelled-only reference: no file (collect reads "--unlabelled 0" with a
        # file as one row per line), so it is the same cache as a sweep's without a file.
        res = collect(CollectConfig(model=c.model, task=c.task, n=n, seed=seed, dev=c.dev_rows(n),
                                    store=c.store, unlabelled=self.m,
                                    unlabelled_file=c.unlabelled_file if self.m else None,
                                    positions=c.positions))
        return Cache.open(res.cache)

    def _run_dir(self, n: int, seed: int, name: str) -> Path:
        """The folder of one run: ``<runs>/<task>/n<N>-s<seed>[-u<M>]`` and the run's name, plus a
        part for each sweep setting off its default that changes the cache (another model, dev
        size, unlabelled file or positions), so that sweeps sharing ``runs`` never meet a run of
        another cache (distill would refuse its folder, and the cell fail). Defaults add nothing:
        the folders of earlier sweeps keep their names, and their runs are found and reused.
        (An edited task file under the same name still meets its old runs: the cell fails, naming
        the cache key.)"""
        c = self.config
        root = Path(c.runs).expanduser() if c.runs else self.out / "adapters"
        unit = f"n{n}-s{seed}" + (f"-u{self.m}" if self.m else "")
        if c.model != "default":
            unit += f"-model{self.plan['model']['fingerprint'][:8]}"
        if c.dev_rows(n) != DEFAULT_DEV:
            unit += f"-dev{c.dev_rows(n)}"
        if self.m and self.plan.get("unlabelled_file"):
            unit += f"-file{self.plan['unlabelled_file'][:8]}"
        if c.positions != DEFAULT_POSITIONS:
            unit += "-" + c.positions.replace("+", "-")
        return root / self.plan["label"] / unit / name

    def _choose(self, runs: list[tuple[float, Any]], what: str) -> tuple[float, Any, dict[str, Any]]:
        grid = {f"{lr:g}": (None if isinstance(r, Exception) else r.final["dev_loss"]) for lr, r in runs}
        lr = select_lr((float(k), v) for k, v in grid.items())
        if lr is None:
            errors = "; ".join(str(r) for _, r in runs if isinstance(r, Exception))
            raise IA2Error(f"{what}: every learning rate of the grid diverged ({errors})")
        chosen = next(r for x, r in runs if x == lr)
        lrs = sorted(self.config.lrs)
        phase = -1  # the phase this choice is about: the last one of the runs
        trained = [{"lr": x, "capped": r.capped[phase], "steps_run": r.steps_run[phase],
                    "best_step": r.best_step[phase], "dev_loss": r.final["dev_loss"]}
                   for x, r in runs if not isinstance(r, Exception)]
        info = {"grid": grid, "diverged": [x for x, r in runs if isinstance(r, Exception)],
                "edge": len(lrs) > 1 and lr in (lrs[0], lrs[-1]), "runs": trained}
        return lr, chosen, info

    def _sweep_phase(self, n: int, seed: int, method: str, cache: Any,
                     first: Any | None = None) -> tuple[float, Any, dict[str, Any]]:
        """Train the grid for ``method`` (or for the second phase after ``first``) and choose.

        ``lr_search="descend"`` tries the rates from the largest down and stops at the first one
        whose dev loss is no better than the best so far (the small rates, which cost the most
        steps, are tried only while they help)."""
        runs: list[tuple[float, Any]] = []
        best = math.inf
        for lr in sorted(self.config.lrs, reverse=True):
            if first is None:
                name, kw = f"{method}-lr{lr:g}", {"lr": lr}
            else:
                name = f"{method}-lr{first.lrs[0]:g}-lr2{lr:g}"
                kw = {"lr": first.lrs[0], "lr2": lr, "first_phase_from": first.adapter}
            lr1 = kw.pop("lr")
            dc = self.config.distill_template(n, seed, method, lr1, cache=str(cache.path),
                                              out=str(self._run_dir(n, seed, name)), **kw)
            try:
                res = distill(dc)
            except IA2Error as exc:
                if "diverged" not in str(exc):
                    raise
                runs.append((lr, exc))
                continue
            runs.append((lr, res))
            loss = res.final["dev_loss"]
            loss = math.inf if loss is None or not math.isfinite(loss) else loss
            if self.config.lr_search == "descend" and len(runs) > 1 and loss >= best:
                break
            best = min(best, loss)
        return self._choose(runs, f"{method} N={n} seed={seed}")

    def _method_cell(self, n: int, seed: int, method: str, cache: Any, k: int,
                     teacher: list[Any]) -> dict[str, Any]:
        c = self.config
        phases: list[dict[str, Any]] = []
        if method in FIRST_PHASE:
            lr1, first, info1 = self._sweep_phase(n, seed, FIRST_PHASE[method], cache)
            lr2, chosen, info2 = self._sweep_phase(n, seed, method, cache, first=first)
            phases = [info1, info2]
        else:
            _, chosen, info = self._sweep_phase(n, seed, method, cache)
            phases = [info]
        model, tok, _ = load_adapter(chosen.adapter)
        ec = EvalConfig(mode="adapter", k=k, n=n, n_eval=c.n_eval, seed=seed, agreement=True,
                        icl_demos=c.icl_demos)
        r = evaluate(model, tok, self._target(), ec, details=True, teacher_answers=teacher)
        return {**self.row(n, seed, method), **_metrics(r), "preds": r["rows"],
                "lr": chosen.lrs, "grid": [p["grid"] for p in phases], "lr_edge": [p["edge"] for p in phases],
                "diverged": [p["diverged"] for p in phases], "dev_loss": chosen.final["dev_loss"],
                "runs": [p["runs"] for p in phases], "lr_search": c.lr_search,
                "best_step": chosen.best_step, "steps_run": chosen.steps_run, "capped": chosen.capped,
                "best_epoch": chosen.best_epoch, "adapter": _relative(Path(chosen.adapter), self.out),
                "cache": cache.key, "n_train": cache.manifest["n_train"], "n_dev": cache.manifest["n_dev"],
                "distinct_unlabelled": cache.manifest.get("distinct_unlabelled", 0)}


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to the sweep folder when inside it (the folder moves as a whole)."""
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path.resolve())


def uses_unlabelled(method: str) -> bool:
    """Whether a sweep method has a phase that trains on unlabelled rows: one whose objective
    reads no labels (act, tokl), as distill decides (``Objective.reads_labels``)."""
    return any(not OBJECTIVES[o].reads_labels() for o in SCHEDULES[SWEEP_METHODS[method][0]])


def _order(methods: tuple[str, ...]) -> list[str]:
    """The methods in an order where each two-phase method follows its first phase's method."""
    return sorted(methods, key=lambda m: (m in FIRST_PHASE, list(SWEEP_METHODS).index(m)))


# ----------------------------------------------------------------------------- workers


def _init_worker(threads: int | None, counter: Any, lock: Any) -> None:
    """Pin a worker to one GPU (round robin) where several are visible; set its torch threads."""
    import torch

    with lock:
        index = counter.value
        counter.value += 1
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(index % torch.cuda.device_count())
    elif threads:
        torch.set_num_threads(threads)


def _work(config: SweepConfig, plan: dict[str, Any], out: str, unit: tuple[int, int, int],
          todo: list[str], events: Any) -> int:
    """Run one unit in a worker process; every finished cell goes to ``events`` at once."""
    logging.getLogger("ia2cache").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library chatter, not the user's
    runner = _Unit(config, plan, Path(out), m=unit[2])
    n = 0
    try:
        for row in runner.cells(unit[0], unit[1], todo):
            events.put(("row", row))
            n += 1
    except Exception as exc:  # the collect of the unit failed: every cell of it is failed
        for method in todo[n:]:
            events.put(("row", {**runner.row(unit[0], unit[1], method), "status": "failed",
                                "error": f"{type(exc).__name__}: {exc}"}))
    return n


def sweep(config: SweepConfig, progress: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Run every missing cell of this shard's units; returns counts of cells total/done/skipped/failed.

    Args:
        config: the grid and the training settings.
        progress: called with ``{"done", "total", "cell", "status", "elapsed"}`` after each cell.

    Raises:
        IA2Error: bad settings, an --out made by something else or with other settings, or
            another process running the same shard into the same --out.
    """
    plan = _plan(config)  # every input checked before anything is written
    out = claim_output_dir(config.out, "--out", kind="sweep")
    results = _results_path(out, config)
    with OutputLock(results.with_name(results.name + ".lock"), "--out"):
        _check_settings(out, plan)
        _write_settings(out, plan)
        work, total, skipped = _work_left(config, plan, _cells(out, plan))
        counts = {"done": 0, "failed": 0}
        t0 = time.perf_counter()

        def record(row: dict[str, Any]) -> None:
            preds = row.pop("preds", None)
            if preds is not None:
                u = f"__u{row['unlabelled']}" if row.get("unlabelled") else ""
                name = f"{plan.label}__{row['method']}__n{row['n']}__s{row['seed']}{u}.json"
                write_json_atomic(out / "preds" / name, preds)
            _append(results, json_safe(row))
            counts["failed" if row["status"] == "failed" else "done"] += 1
            if row["status"] == "failed":
                log.warning("cell %s N=%d seed=%d %s failed: %s", plan.label, row["n"], row["seed"],
                            row["method"], row.get("error"))
            if progress:
                u = f" M={row['unlabelled']}" if row.get("unlabelled") else ""
                progress({"done": skipped + counts["done"] + counts["failed"], "total": total,
                          "cell": f"{plan.label} N={row['n']} seed={row['seed']}{u} {row['method']}",
                          "status": row["status"], "elapsed": time.perf_counter() - t0})

        pdict = {"task": plan.task_name, "eval_task": plan.eval_name, "label": plan.label,
                 "settings_hash": plan.settings_hash, "model": plan.settings["model"],
                 "unlabelled_file": plan.settings.get("unlabelled_file")}
        if progress:
            progress({"done": skipped, "total": total, "cell": None, "status": "start", "elapsed": 0.0})
        if config.workers == 1 or len(work) <= 1:
            if config.threads:  # asked for explicitly: this process is the worker
                import torch

                torch.set_num_threads(config.threads)
            sink = _Sink(record)
            for unit, todo in work:
                _work(config, pdict, str(out), unit, todo, sink)
        else:
            _run_pool(config, pdict, out, work, record)
    return {"out": str(out), "label": plan.label, "settings": plan.settings_hash, "cells_total": total,
            "cells_done": counts["done"], "cells_failed": counts["failed"], "cells_skipped": skipped,
            "results": str(results), "seconds": round(time.perf_counter() - t0, 1)}


Work = list[tuple[tuple[int, int, int], list[str]]]


def _cells(out: Path, plan: _Plan, failed: bool = False) -> set[tuple[int, int, int, str]]:
    """(N, seed, M, method) of this sweep's finished cells in ``out``; with ``failed``, of its
    cells that failed and have not succeeded since."""
    return {(r["n"], r["seed"], r.get("unlabelled", 0), r["method"]) for r in read_results(out, failed=failed)
            if r.get("settings") == plan.settings_hash and r["task"] == plan.task_name
            and r.get("eval_task", r["task"]) == plan.eval_name}


def sweep_status(config: SweepConfig) -> dict[str, Any]:
    """What :func:`sweep` with ``config`` would still run, found without running, locking or
    writing anything: this shard's cells, those finished, and those left (a failed cell is left:
    a rerun retries it). ``complete``: none is left.

    Raises:
        IA2Error: bad settings, an --out that is not a sweep's, or one made with other settings
            (what ``sweep`` itself would refuse).
    """
    from ia2cache.outputs import check_output_dir

    plan = _plan(config)
    out = check_output_dir(config.out, "--out", kind="sweep")  # what sweep() would refuse
    done: set[tuple[int, int, int, str]] = set()
    failed: set[tuple[int, int, int, str]] = set()
    if out.is_dir():
        _check_settings(out, plan)
        done, failed = _cells(out, plan), _cells(out, plan, failed=True)
    work, total, finished = _work_left(config, plan, done)
    left = [{"n": n, "seed": s, "unlabelled": m, "method": x, "failed": (n, s, m, x) in failed}
            for (n, s, m), todo in work for x in todo]
    return {"out": str(out), "label": plan.label, "settings": plan.settings_hash, "cells_total": total,
            "cells_done": finished, "cells_left": len(left), "cells_failed": sum(c["failed"] for c in left),
            "complete": not left, "left": left}


def _work_left(config: SweepConfig, plan: Any, done: set[tuple[int, int, int, str]]) -> tuple[Work, int, int]:
    """This shard's units with the cells still to run, and the counts of its cells and of those
    already done (base at the N=0 unit, ICL and every method at M=0, only the methods with a
    label-free phase at M>0: only they read unlabelled rows)."""
    order = _order(config.methods)
    work: Work = []
    total = skipped = 0
    for j in plan.mine:
        n, s, m = plan.units[j]
        if n == 0:
            cells = ["base"]
        else:
            cells = ["icl", *order] if m == 0 else [x for x in order if uses_unlabelled(x)]
        todo = [x for x in cells if (n, s, m, x) not in done]
        total += len(cells)
        skipped += len(cells) - len(todo)
        if todo:
            work.append(((n, s, m), todo))
    return work, total, skipped


def _run_pool(config: SweepConfig, pdict: dict[str, Any], out: Path, work: Work,
              record: Callable[[dict[str, Any]], None]) -> None:
    """Units in ``config.workers`` processes; rows stream back over a queue as cells finish, and
    only this process writes the results file (so no line is ever torn or written twice)."""
    ctx = mp.get_context("spawn")  # fork after torch threads exist can deadlock
    threads = config.threads or 1
    with ctx.Manager() as manager:
        events = manager.Queue()
        counter, lock = manager.Value("i", 0), manager.Lock()
        env_before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned workers
        try:
            with ProcessPoolExecutor(max_workers=config.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(threads, counter, lock)) as pool:
                pending = {pool.submit(_work, config, pdict, str(out), unit, todo, events): unit
                           for unit, todo in work}
                while pending:
                    finished, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                    while True:
                        try:
                            record(events.get_nowait()[1])
                        except queue.Empty:
                            break
                    for fut in finished:
                        unit = pending.pop(fut)
                        exc = fut.exception()
                        if exc is not None:  # a worker died (killed, out of memory)
                            log.warning("unit N=%d seed=%d M=%d: worker failed: %s", *unit, exc)
                while True:
                    try:
                        record(events.get_nowait()[1])
                    except queue.Empty:
                        break
        finally:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_before


class _Sink:
    """In one process, a cell's row is recorded as soon as it is put (no queue in between)."""

    def __init__(self, record: Callable[[dict[str, Any]], None]) -> None:
        self.record = record

    def put(self, item: tuple[str, dict[str, Any]]) -> None:
        self.record(item[1])


def _append(path: Path, row: dict[str, Any]) -> None:
    """One line, written with one ``write`` on an O_APPEND descriptor, then fsynced."""
    data = (json.dumps(row, sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
