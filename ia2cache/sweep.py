"""Sweep: the paper's comparison (methods x N x seeds) from caches collected once.

For each (N, data seed): collect once (or reuse), evaluate the ICL teacher; then for each
method, train one adapter per learning rate of the grid from the same cache, keep the one with
the lowest **dev** loss (the eval split is never read for selection), and evaluate it on the
eval split. The base model (no demos) is evaluated once. Every finished cell is appended to
``<out>/results.jsonl`` at once; a rerun skips finished cells.

Launch: ``ia2cache sweep --task antonyms --n 4,8,16 --seeds 0-2 --methods tok,act,a2t,tna``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ia2cache._io import check_writable_dir
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.errors import IA2Error
from ia2cache.evaluate import EvalConfig, evaluate, load_adapter, ood_task
from ia2cache.models import load_model
from ia2cache.objectives import SCHEDULES
from ia2cache.prompts import PromptConfig
from ia2cache.tasks import load_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """A grid of cells: task x N x data seed x method."""

    task: str
    """Built-in task name or .jsonl file."""
    out: str
    """Directory for results.jsonl, per-row predictions and adapters."""
    ns: tuple[int, ...] = (4, 8, 16)
    """Training set sizes N."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Data seeds (they pick the N examples and the demos; the adapter seed follows them)."""
    methods: tuple[str, ...] = ("tok", "act", "a2t", "tna")
    """Distill methods to compare."""
    lrs: tuple[float, ...] = (1e-3,)
    """Learning-rate grid; one is picked per cell on the dev loss."""
    epochs: int = 40
    """Maximum epochs per phase (early stopping on dev rows, patience 5)."""
    n_eval: int = 100
    """Eval-split rows scored per cell."""
    icl_k: int | None = None
    """Demos for the ICL baseline; None: the teacher's own k, min(N-1, 8)."""
    model: str = "default"
    """Base model."""
    store: str | None = None
    """Cache store; default $IA2CACHE_HOME/store."""
    labels: str = "gt"
    """Labels for tok phases."""
    adapter: str = "lora"
    """PEFT adapter type."""
    eval_task: str | None = None
    """Score every cell on this task's eval split instead (out of distribution, e.g. train
    hf:sst2, eval hf:fins); caches, adapters and ICL demos still come from ``task``."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in SCHEDULES]
        if bad:
            raise IA2Error(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(SCHEDULES)}")
        if not self.ns or min(self.ns) < 2:
            raise IA2Error(f"--n {','.join(map(str, self.ns))}: every N must be at least 2")
        if not self.lrs or min(self.lrs) <= 0:
            raise IA2Error("--lrs: give positive learning rates")


def parse_ints(spec: str, flag: str) -> tuple[int, ...]:
    """``4,8,16`` or ``0-4`` -> a tuple of ints."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise IA2Error(f"{flag} {spec}: expected integers like 4,8,16 or ranges like 0-4") from None
    return tuple(out)


def _cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["task"], row.get("eval_task", row["task"]), row["n"], row["seed"], row["method"])


def read_results(out: Path) -> list[dict[str, Any]]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A line cut by a kill mid-write: that cell simply reruns.
                log.warning("%s:%d: unreadable line skipped", path, i)
                continue
            rows[_cell_key(row)] = row  # a cell finished twice (two workers) counts once
    return list(rows.values())


def _append(out: Path, row: dict[str, Any]) -> None:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def select_lr(candidates: Iterable[tuple[float, float | None]]) -> float:
    """The learning rate with the lowest dev loss; ties go to the smaller rate. Only dev
    losses are passed in, so selection cannot see the eval split."""
    scored = [(loss if loss is not None else float("inf"), lr) for lr, loss in candidates]
    return min(scored)[1]


def _metrics(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "confidence", "ece_equal_mass", "ece_equal_width", "nll", "agreement_with_icl",
            "n_eval")
    return {k: r.get(k) for k in keys}


def _icl_k(config: SweepConfig, n: int) -> int:
    if config.icl_k is not None:
        return config.icl_k
    return PromptConfig(n=n).k_effective if n >= 2 else 1  # base cells (n=0) use no demos


def sweep(config: SweepConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every missing cell of the grid; returns counts of cells total/done/skipped."""
    out = check_writable_dir(config.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(config.task)
    # Out of distribution: queries from eval_task, demos (the teacher) from the training task.
    target = ood_task(task, load_task(config.eval_task)) if config.eval_task else task
    label = task.name if target is task else f"{task.name}->{target.name}"
    (out / f"sweep-{label}.json").write_text(json.dumps(asdict(config), indent=1, sort_keys=True))
    done = {_cell_key(r) for r in read_results(out)}
    say = progress or (lambda msg: log.info("%s", msg))
    cells = [("base", 0, 0)] + [(m, n, s) for n in config.ns for s in config.seeds
                                for m in ("icl", *config.methods)]
    skipped = sum(1 for m, n, s in cells if (task.name, target.name, n, s, m) in done)
    t0 = time.perf_counter()
    base_model = None
    for method, n, seed in cells:
        if (task.name, target.name, n, seed, method) in done:
            continue
        say(f"{label} N={n} seed={seed} {method}")
        row: dict[str, Any] = {"task": task.name, "eval_task": target.name, "n": n, "seed": seed,
                               "method": method}
        if method in ("base", "icl"):
            base_model = base_model or load_model(config.model)
            ec = EvalConfig(mode=method, k=_icl_k(config, n), n_eval=config.n_eval, seed=seed)
            r = evaluate(base_model.model, base_model.tokenizer, target, ec, details=True)
        else:
            cache = collect(CollectConfig(model=config.model, task=config.task, n=n, seed=seed,
                                          store=config.store))
            runs = []
            for lr in config.lrs:
                run_dir = out / "adapters" / task.name / f"n{n}-s{seed}" / f"{method}-lr{lr:g}"
                dc = DistillConfig(cache=cache.cache, method=method, lr=lr, epochs=config.epochs,
                                   seed=seed, labels=config.labels, adapter=config.adapter,
                                   out=str(run_dir))
                runs.append((lr, distill(dc)))
            lr = select_lr((lr_, res.final["dev_loss"]) for lr_, res in runs)
            chosen = next(res for lr_, res in runs if lr_ == lr)
            model, tok, _ = load_adapter(chosen.adapter)
            ec = EvalConfig(mode="adapter", k=_icl_k(config, n), n_eval=config.n_eval, seed=seed,
                            agreement=True)
            r = evaluate(model, tok, target, ec, details=True)
            row.update({"lr": lr, "grid": {f"{lr_:g}": res.final["dev_loss"] for lr_, res in runs},
                        "dev_loss": chosen.final["dev_loss"], "best_epoch": chosen.best_epoch,
                        "adapter": chosen.adapter, "cache": cache.key})
        row.update(_metrics(r))
        preds = out / "preds"
        preds.mkdir(exist_ok=True)
        (preds / f"{label}__{method}__n{n}__s{seed}.json").write_text(json.dumps(r["rows"]))
        _append(out, row)
    total = len(cells)
    return {"out": str(out), "cells_total": total, "cells_done": total - skipped,
            "cells_skipped": skipped, "seconds": round(time.perf_counter() - t0, 1)}

