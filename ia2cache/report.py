"""Report: paired statistics, the paper-shaped tables and plots from a sweep directory.

First the paired comparisons per (task, N): the mean over data seeds of (a2t - tok) with a 95%
paired Student-t CI, a 95% percentile bootstrap CI, an exact two-sided paired sign-flip p-value
and win/tie/loss counts, for accuracy and for ECE, and the same for act vs ICL (the teacher it
distils), a2t vs ICL and tna vs tok. A difference is starred (``claim`` in report.json) only with
at least ``MIN_SEEDS_FOR_CLAIM`` seeds and a t CI that excludes 0. Then how fair the training
was: the share of chosen phases the step cap ended, of chosen learning rates at an edge of the
grid, and of chosen phases still improving when early stopping ended them (each chosen phase
counted once overall: a2t's first phase is act's chosen run). Then per-metric tables (rows N,
columns ICL / base / SFT / IA2 / IA2->SFT / IA2+SFT / ..., cells mean +- std over seeds, ddof=1;
a footnote names each column's seeds where a row's columns used different seeds) and plots:
accuracy and ECE vs N (error bars: std, ddof=1), one reliability diagram per method, and dev-loss
curves of one cell per method. Every table header says how much labelled data a cell
used ("N train + D dev") and where the ICL column's demos come from. When ``<DIR>/analysis/``
holds ``ia2cache analyze`` outputs, their tables and plots follow.

Launch: ``ia2cache report DIR``.
"""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mpmath
import numpy as np

from ia2cache._io import write_json_atomic
from ia2cache.errors import IA2Error
from ia2cache.outputs import claim_output_dir, save_figure, write_bytes_atomic
from ia2cache.sweep import FIRST_PHASE, read_results

COLUMNS: dict[str, str] = {
    "icl": "ICL", "base": "base", "tok": "SFT", "act": "IA2", "a2t": "IA2→SFT", "tna": "IA2+SFT",
    "tok_icl": "SFT (ICL labels)", "tokl": "KL", "t2a": "SFT→IA2",
}
PAIRS: tuple[tuple[str, str], ...] = (("a2t", "tok"), ("act", "icl"), ("a2t", "icl"), ("tna", "tok"))
"""(method, baseline) pairs compared seed by seed; the first is the paper's headline."""
BOOTSTRAP = 10_000
"""Bootstrap resamples for the paired CIs (seeded: the report is reproducible)."""
MIN_SEEDS_FOR_CLAIM = 5
"""A paired difference is starred (a claim) only with at least this many seeds and a 95% t CI
that excludes 0: the project's rule for a headline claim."""
SIGNFLIP_EXACT_MAX = 16
"""Up to this many seeds the sign-flip p enumerates all 2^n sign patterns; beyond, Monte Carlo."""
SIGNFLIP_MC = 100_000
"""Random sign patterns for the Monte Carlo sign-flip p (seeded)."""
_STATS_NOTE = (
    "Δ: mean over seeds of the paired difference; t CI: 95% paired Student-t interval, mean ± "
    "t(0.975, n−1)·sd/√n (sd ddof=1; none with one seed); bootstrap CI: 95% percentile bootstrap, "
    f"{BOOTSTRAP} resamples; p: two-sided paired sign-flip p, exact over all 2^n sign patterns up to "
    f"n = {SIGNFLIP_EXACT_MAX} seeds (with {MIN_SEEDS_FOR_CLAIM} seeds no sign-flip p is below "
    f"2/{2 ** MIN_SEEDS_FOR_CLAIM} = {2 / 2 ** MIN_SEEDS_FOR_CLAIM:g}); *: at least {MIN_SEEDS_FOR_CLAIM} "
    "seeds and the t CI excludes 0; W/T/L: seeds where the first is better / equal / worse; ECE "
    "lower is better")
"""What the paired tables' columns and star mean (each paired table's header says it)."""
METRICS = {"accuracy": "accuracy", "ece_equal_mass": "ECE, 15 equal-mass bins",
           "ece_equal_width": "ECE, 15 equal-width bins"}
LOWER_IS_BETTER = {"ece_equal_mass", "ece_equal_width"}


def _std(a: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1), the one used in tables and plots; 0 for one value."""
    return float(np.std(np.asarray(a, dtype=float), ddof=1)) if len(a) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {_std(values):.3f}"


def bootstrap_ci(diffs: Sequence[float], n_boot: int = BOOTSTRAP, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``diffs`` and its percentile bootstrap CI: resample the values with replacement
    ``n_boot`` times (numpy PCG64, ``seed``), take each resample's mean, and return the
    ``(1-level)/2`` and ``(1+level)/2`` quantiles of those means (numpy's linear interpolation)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.Generator(np.random.PCG64(seed))
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom, exactly (mpmath, 30
    digits): the root in t of the upper tail P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2 (the
    regularized incomplete beta), bracketed by doubling and found by ``mpmath.findroot``.

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df`` < 1.
    """
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    with mpmath.workdps(30):
        nu, tail = mpmath.mpf(df), 1 - mpmath.mpf(p)

        def upper(t: Any) -> Any:
            return mpmath.betainc(nu / 2, mpmath.mpf(1) / 2, 0, nu / (nu + t * t), regularized=True) / 2

        lo, hi = mpmath.mpf(0), mpmath.mpf(1)
        while upper(hi) > tail:
            lo, hi = hi, hi * 2
        return float(mpmath.findroot(lambda t: upper(t) - tail, (lo, hi), solver="anderson"))


def t_ci(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``diffs`` and its paired Student-t CI: mean ± t_{(1+level)/2, n-1} · sd / √n (sd
    with ddof=1). One value gives no interval (nan bounds); equal values a zero-width one."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = t_quantile((1 + level) / 2, d.size - 1) * float(np.std(d, ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def signflip_p(diffs: Sequence[float], exact_max: int = SIGNFLIP_EXACT_MAX, n_mc: int = SIGNFLIP_MC,
               seed: int = 0) -> float:
    """Two-sided paired sign-flip (randomisation) p-value of the mean of ``diffs``: under the null
    each seed's difference is as likely negated, so p is the share of the 2^n sign patterns whose
    |sum| reaches the observed |sum| (float ties within 1e-9 relative count). Exact for n <=
    ``exact_max``: with n seeds no p is below 2/2^n (the observed pattern and its negation).
    Beyond, ``n_mc`` random patterns (numpy PCG64, ``seed``) give (1 + hits) / (1 + n_mc)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if d.size <= exact_max:
        bits = (np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1
        sums = (1 - 2 * bits) @ d
        return float(np.mean(np.abs(sums) >= observed - tol))
    rng = np.random.Generator(np.random.PCG64(seed))
    hits, done = 0, 0
    while done < n_mc:
        k = min(10_000, n_mc - done)
        signs = 1 - 2 * rng.integers(0, 2, size=(k, d.size))
        hits += int((np.abs(signs @ d) >= observed - tol).sum())
        done += k
    return (1 + hits) / (1 + n_mc)


def win_tie_loss(diffs: Sequence[float], lower_is_better: bool = False,
                 tol: float = 1e-12) -> tuple[int, int, int]:
    """Seeds where the method beats, ties or loses to the baseline (a difference within ``tol``
    is a tie; for ECE lower is better)."""
    d = np.asarray(diffs, dtype=float) * (-1 if lower_is_better else 1)
    return int((d > tol).sum()), int((np.abs(d) <= tol).sum()), int((d < -tol).sum())


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, dict[str, list[float]]]]]:
    """task -> N -> method -> metric -> values over seeds. ``base`` does not depend on N or
    seed; it is repeated in every N row."""
    out: dict[str, dict[int, dict[str, dict[str, list[float]]]]] = {}
    ns_by_task: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        if r["method"] != "base":
            ns_by_task[r["task"]].add(r["n"])
    for r in rows:
        ns = ns_by_task[r["task"]] if r["method"] == "base" else {r["n"]}
        for n in ns:
            cell = out.setdefault(r["task"], {}).setdefault(n, {}).setdefault(r["method"], {})
            for metric in ("accuracy", "ece_equal_mass", "ece_equal_width", "agreement_with_icl"):
                if r.get(metric) is not None:
                    cell.setdefault(metric, []).append(float(r[metric]))
    return out


def paired(rows: list[dict[str, Any]], method: str, baseline: str, metric: str,
           task: str, n: int, m: int = 0) -> dict[str, Any] | None:
    """(method - baseline) per seed for one task and N; None when no seed has both. ``m``: the
    method's rows with M unlabelled rows (the baseline's are always M=0's: it reads none).

    Returns the seeds, the diffs, their mean, ``ci95`` (the 95% percentile bootstrap CI),
    ``ci95_t`` (the 95% paired t CI; None with one seed), ``p_signflip`` (two-sided paired
    sign-flip p), ``claim`` (at least ``MIN_SEEDS_FOR_CLAIM`` seeds and ``ci95_t`` excludes 0)
    and win/tie/loss."""
    by = {(r["method"], r["seed"]): r.get(metric) for r in rows if r["task"] == task and r["n"] == n
          and r.get("unlabelled", 0) == (m if r["method"] == method else 0)}
    seeds = sorted(s for (m, s), v in by.items() if m == method and v is not None
                   and by.get((baseline, s)) is not None)
    if not seeds:
        return None
    diffs = [by[(method, s)] - by[(baseline, s)] for s in seeds]
    mean, lo, hi = bootstrap_ci(diffs)
    _, t_lo, t_hi = t_ci(diffs)
    ci_t = None if math.isnan(t_lo) else [t_lo, t_hi]
    claim = len(seeds) >= MIN_SEEDS_FOR_CLAIM and ci_t is not None and (t_lo > 0 or t_hi < 0)
    w, t, lose = win_tie_loss(diffs, metric in LOWER_IS_BETTER)
    return {"task": task, "n": n, "method": method, "baseline": baseline, "metric": metric, "seeds": seeds,
            "diffs": diffs, "mean": mean, "ci95": [lo, hi], "ci95_t": ci_t, "p_signflip": signflip_p(diffs),
            "claim": claim, "win": w, "tie": t, "loss": lose}


def _data_note(rows: list[dict[str, Any]], task: str) -> str:
    """"N train + D dev" and where the ICL demos come from, as the rows say."""
    mine = [r for r in rows if r["task"] == task and r["method"] != "base"]
    devs = sorted({r.get("n_dev", r.get("dev")) for r in mine if r.get("n_dev", r.get("dev")) is not None})
    demos = sorted({r["icl_demos"] for r in mine if r["method"] == "icl" and r.get("icl_demos")})
    dev = f" + {'/'.join(map(str, devs))} dev" if devs else ""
    where = {"train": "k demos from the N train rows (the teacher)", "pool": "k demos from the whole pool"}
    icl = "; ".join(where.get(d, d) for d in demos) or "not run"
    return f"N train{dev} labelled rows per cell; ICL = {icl}"


def paired_markdown(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    lines: list[str] = []
    stats: list[dict[str, Any]] = []
    for task in sorted({r["task"] for r in rows}):
        ns = sorted({r["n"] for r in rows if r["task"] == task and r["method"] != "base"})
        for method, base in PAIRS:
            per_n = [(n, {m: paired(rows, method, base, m, task, n) for m in ("accuracy", "ece_equal_mass")})
                     for n in ns]
            if not any(v for _, d in per_n for v in d.values()):
                continue
            lines.append(f"**{task}: {COLUMNS.get(method, method)} − {COLUMNS.get(base, base)}, paired over "
                         f"seeds** ({_data_note(rows, task)}; {_STATS_NOTE})\n")
            lines.append(f"| N | seeds | {_paired_head('Δ accuracy')} | {_paired_head('Δ ECE equal-mass')} |")
            lines.append("|---|---|" + "---|" * 10)
            for n, d in per_n:
                acc, ece = d["accuracy"], d["ece_equal_mass"]
                if acc is None and ece is None:
                    continue
                stats += [x for x in (acc, ece) if x is not None]
                seeds = len((acc or ece or {}).get("seeds", []))
                lines.append(f"| {n} | {seeds} | {_paired_cells(acc)} | {_paired_cells(ece)} |")
            lines.append("")
    return "\n".join(lines), stats


def _paired_head(what: str) -> str:
    return f"{what} | 95% t CI | 95% bootstrap CI | p (sign-flip) | W/T/L"


def _paired_cells(p: dict[str, Any] | None) -> str:
    """Five cells of a paired table: Δ (starred when ``claim``), t CI, bootstrap CI, p, W/T/L."""
    if p is None:
        return " | ".join(["–"] * 5)
    lo, hi = p["ci95"]
    t = "–" if p.get("ci95_t") is None else f"[{p['ci95_t'][0]:+.3f}, {p['ci95_t'][1]:+.3f}]"
    star = " *" if p.get("claim") else ""
    return (f"{p['mean']:+.3f}{star} | {t} | [{lo:+.3f}, {hi:+.3f}] | {p['p_signflip']:.4g} | "
            f"{p['win']}/{p['tie']}/{p['loss']}")


def _phase_key(r: dict[str, Any], i: int, two_phases: bool) -> tuple[Any, ...]:
    """Phase ``i`` of row ``r``'s cell, as one trained phase: (task, eval task, N, seed, M,
    settings, who, i), where ``who`` is the method that trained it (a two-phase method's first
    phase is its FIRST_PHASE method's: a2t's phase 1 is act's)."""
    who = FIRST_PHASE.get(r["method"], r["method"]) if i == 0 and two_phases else r["method"]
    return (r["task"], r.get("eval_task", r["task"]), r["n"], r["seed"], r.get("unlabelled", 0),
            r.get("settings"), who, i)


def fairness(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How often the step cap ended a phase, how often a chosen lr sits at a grid edge, and how
    often a chosen phase was still improving when early stopping ended it.

    Over the chosen runs (the phases behind the reported rows), per method (a two-phase method's
    column counts both its phases); their ``overall`` counts each distinct chosen phase once: a
    two-phase method's first phase is its FIRST_PHASE method's chosen run (a2t's phase 1 is act's),
    keyed by (task, eval task, N, seed, M, settings, who, phase). And over every run trained (each
    lr tried for each phase, as the rows record them).

    Still improving (``improving_chosen``): a chosen phase the cap did not end whose best step is
    its last step (``best_step == steps_run``): patience ran out on improvements smaller than
    min_delta while the dev loss still fell. (A phase that early stopping ends stops on an
    evaluation, and its best step is an evaluation's, so the equality is exact.)"""
    chosen: dict[str, list[bool]] = defaultdict(list)
    edge: dict[str, list[bool]] = defaultdict(list)
    improving: dict[str, list[bool]] = defaultdict(list)
    distinct: dict[str, dict[tuple[Any, ...], bool]] = {"capped": {}, "edge": {}, "improving": {}}
    for r in rows:
        capped = [bool(c) for c in r.get("capped") or []]
        edges = [bool(e) for e in r.get("lr_edge") or []]
        best, ran = r.get("best_step") or [], r.get("steps_run") or []
        still = []
        if len(best) == len(ran) == len(capped):
            still = [not c and b is not None and b == s
                     for c, b, s in zip(capped, best, ran, strict=True)]
        two = max(len(capped), len(edges)) > 1
        for name, flags, per in (("capped", capped, chosen), ("edge", edges, edge),
                                 ("improving", still, improving)):
            for i, flag in enumerate(flags):
                per[r["method"]].append(flag)
                distinct[name].setdefault(_phase_key(r, i, two), flag)
    everything: dict[str, list[bool]] = defaultdict(list)
    seen: set[tuple[Any, ...]] = set()
    for r in rows:  # every lr each phase trained; a2t's phase 1 is its act cell's, counted once
        phases = r.get("runs") or []
        for i, phase_runs in enumerate(phases):
            phase = _phase_key(r, i, len(phases) > 1)
            for run in phase_runs:
                key = (*phase, run["lr"])
                if key not in seen:
                    seen.add(key)
                    everything[phase[-2]].append(bool(run["capped"]))

    def frac(d: dict[str, list[bool]], overall: list[bool] | None = None) -> dict[str, Any]:
        allv = [x for v in d.values() for x in v] if overall is None else overall
        return {"overall": [sum(allv), len(allv)], **{k: [sum(v), len(v)] for k, v in sorted(d.items())}}

    return {"capped_chosen": frac(chosen, list(distinct["capped"].values())),
            "lr_edge_chosen": frac(edge, list(distinct["edge"].values())),
            "improving_chosen": frac(improving, list(distinct["improving"].values())),
            "capped_all_runs": frac(everything)}


def _fairness_md(f: dict[str, Any]) -> str:
    def pct(x: list[int]) -> str:
        return f"{x[0]}/{x[1]} ({100 * x[0] / x[1]:.0f}%)" if x[1] else "–"

    lines = ["**How the budgets and the grid bound** (chosen phases; capped: the step cap, not early "
             "stopping, ended the phase; edge: the chosen lr is the smallest or largest of the grid; still "
             "improving: not capped, but the best dev loss was at the last evaluation, so patience ran out "
             "on improvements below min_delta while the loss still fell; overall counts each distinct phase "
             "once (a2t's first phase is act's chosen run), a method's column all its phases)\n",
             "| | overall | " + " | ".join(k for k in f["capped_chosen"] if k != "overall") + " |",
             "|---|---|" + "---|" * (len(f["capped_chosen"]) - 1)]
    for key, title in (("capped_chosen", "capped, chosen runs"), ("lr_edge_chosen", "lr at a grid edge"),
                       ("improving_chosen", "still improving when stopped")):
        if key not in f:
            continue
        keys = [k for k in f["capped_chosen"] if k != "overall"]
        lines.append(f"| {title} | {pct(f[key]['overall'])} | "
                     + " | ".join(pct(f[key].get(k, [0, 0])) for k in keys) + " |")
    every = f["capped_all_runs"]
    if every["overall"][1]:
        per = ", ".join(f"{k} {pct(v)}" for k, v in every.items() if k != "overall")
        lines.append(f"\nEvery run trained (each lr of each grid): {pct(every['overall'])} capped ({per}).")
    return "\n".join(lines) + "\n"


def _column_seeds(rows: list[dict[str, Any]], task: str, n: int, metric: str,
                  methods: Sequence[str]) -> dict[str, list[int]]:
    """The seeds each method's cell of one table row averages (``base`` left out: it does not
    depend on N or seed); methods with no value are left out."""
    seeds: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        if r["task"] == task and r["n"] == n and r["method"] != "base" and r.get(metric) is not None:
            seeds[r["method"]].add(r["seed"])
    return {m: sorted(seeds[m]) for m in methods if seeds.get(m)}


def markdown(rows: list[dict[str, Any]]) -> str:
    """Per-metric tables: rows N, columns the methods, cells mean ± std (ddof=1) over seeds.

    Where the columns of one row averaged different seeds (a failed or missing cell), the row's N
    is marked † and a footnote under the table names each column's seeds."""
    summary = summarize(rows)
    methods = [m for m in COLUMNS if any(r["method"] == m for r in rows)]
    lines: list[str] = []
    for task, by_n in sorted(summary.items()):
        seeds = sorted({r["seed"] for r in rows if r["task"] == task and r["method"] not in ("base",)})
        for metric, title in METRICS.items():
            lines.append(f"**{task}: {title}** (mean ± std over seeds {seeds}; {_data_note(rows, task)})\n")
            lines.append("| N | " + " | ".join(COLUMNS[m] for m in methods) + " |")
            lines.append("|---|" + "---|" * len(methods))
            notes: list[str] = []
            for n in sorted(by_n):
                cells = [_fmt(by_n[n].get(m, {}).get(metric, [])) for m in methods]
                used = _column_seeds(rows, task, n, metric, methods)
                mark = ""
                if len({tuple(v) for v in used.values()}) > 1:
                    mark = " †"
                    notes.append(f"† N={n}: the columns averaged different seeds: "
                                 + "; ".join(f"{COLUMNS[m]} {v}" for m, v in used.items()) + ".")
                lines.append(f"| {n}{mark} | " + " | ".join(cells) + " |")
            if notes:
                lines.append("")
                lines += notes
            lines.append("")
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], folder: Path, preds: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    written = []
    for task, by_n in sorted(summary.items()):
        ns = sorted(by_n)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for metric, ax in zip(("accuracy", "ece_equal_mass"), axes, strict=True):
            for m in COLUMNS:
                vals = [by_n[n].get(m, {}).get(metric, []) for n in ns]
                if not any(vals):
                    continue
                mean = [np.mean(v) if v else np.nan for v in vals]
                std = [_std(v) if v else np.nan for v in vals]
                ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=COLUMNS[m])
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("N (training examples)")
            ax.set_ylabel("accuracy" if metric == "accuracy" else "ECE (15 equal-mass bins)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task}: accuracy and calibration vs N (mean ± std over seeds, ddof=1)")
        fig.tight_layout()
        path = folder / f"{task}_vs_n.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        written.append(path)
    if preds is not None and preds.is_dir():
        for task in sorted(summary):
            path = _reliability(preds, task, folder, plt)
            if path is not None:
                written.append(path)
    for task in sorted(summary):
        path = _dev_curves(rows, task, folder, plt)
        if path is not None:
            written.append(path)
    return written


def _dev_curves(rows: list[dict[str, Any]], task: str, folder: Path, plt: Any) -> Path | None:
    """Dev loss against optimizer steps for one cell per method (the smallest N and seed that
    has it), from the chosen run's run.json: where each phase stopped and why."""
    picks: dict[str, dict[str, Any]] = {}
    mine = [r for r in rows if r["task"] == task and r.get("adapter")]
    for r in sorted(mine, key=lambda r: (r["n"], r["seed"])):
        picks.setdefault(r["method"], r)
    curves = []
    for method, r in picks.items():
        try:
            rec = json.loads((folder / r["adapter"] / "run.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        curves.append((method, r, rec))
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.4 * len(curves), 3.2), squeeze=False)
    for ax, (method, r, rec) in zip(axes[0], curves, strict=True):
        offset = 0
        for i, phase in enumerate(rec.get("phases") or []):
            h = [x for x in rec["history"] if x["phase"] == i and x.get("dev_loss") is not None]
            if not h:
                continue
            ax.plot([offset + x["step"] for x in h], [x["dev_loss"] for x in h], marker=".",
                    label=f"{phase['objective']} lr {phase['lr']:g}")
            ax.axvline(offset + phase["best_step"], ls=":", color="grey")
            offset += phase["steps_run"]
        ax.set_title(f"{COLUMNS.get(method, method)} N={r['n']} s{r['seed']}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("dev loss (log)")
    fig.suptitle(f"{task}: dev loss of the chosen runs (dotted: the step kept)")
    fig.tight_layout()
    path = folder / f"{task}_dev_curves.png"
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _reliability(preds: Path, task: str, folder: Path, plt: Any, n_bins: int = 15) -> Path | None:
    pooled: dict[str, tuple[list[float], list[int]]] = defaultdict(lambda: ([], []))
    for f in sorted(preds.glob(f"{task}__*.json")):
        if f.is_symlink() or not f.is_file():
            continue
        method = f.stem.split("__")[1]
        d = json.loads(f.read_text())
        pooled[method][0].extend(d["confidence"])
        pooled[method][1].extend(d["correct"])
    methods = [m for m in COLUMNS if m in pooled]
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        conf, corr = np.asarray(pooled[m][0]), np.asarray(pooled[m][1])
        idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        centers, accs = [], []
        for b in range(n_bins):
            sel = idx == b
            if sel.any():
                centers.append(conf[sel].mean())
                accs.append(corr[sel].mean())
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.plot(centers, accs, marker="o")
        ax.set_title(COLUMNS[m])
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle(f"{task}: reliability (15 equal-width bins, all seeds and N pooled)")
    fig.tight_layout()
    path = folder / f"{task}_reliability.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def unlabelled_section(rows: list[dict[str, Any]],
                       folder: Path) -> tuple[str, list[dict[str, Any]], list[Path]]:
    """IA2 with M unlabelled queries: the paired a2t − tok (and act − ICL) table against M, and
    accuracy and ECE against M for a2t and act, with tok and ICL (M=0 only) as horizontal lines."""
    lines = ["## IA2 on unlabelled queries\n"]
    stats: list[dict[str, Any]] = []
    pngs: list[Path] = []
    for task in sorted({r["task"] for r in rows if r.get("unlabelled", 0)}):
        mine = [r for r in rows if r["task"] == task]
        ns = sorted({r["n"] for r in mine if r.get("unlabelled", 0)})
        ms = sorted({r.get("unlabelled", 0) for r in mine})
        distinct = {r.get("unlabelled", 0): r.get("distinct_unlabelled") for r in mine
                    if r.get("distinct_unlabelled") is not None}
        for method, base in (("a2t", "tok"), ("act", "icl")):
            lines.append(f"**{task}: {COLUMNS[method]} with M unlabelled rows − {COLUMNS[base]}, paired "
                         f"over seeds** ({_data_note(rows, task)}; the baseline reads no unlabelled rows; "
                         f"{_STATS_NOTE})\n")
            lines.append("| N | M (distinct queries) | seeds | " + _paired_head("Δ accuracy") + " | "
                         + _paired_head("Δ ECE") + " |")
            lines.append("|---|---|---|" + "---|" * 10)
            for n in ns:
                for m in ms:
                    acc = paired(rows, method, base, "accuracy", task, n, m)
                    ece = paired(rows, method, base, "ece_equal_mass", task, n, m)
                    if acc is None:
                        continue
                    stats += [dict(x, unlabelled=m) for x in (acc, ece) if x is not None]
                    lines.append(f"| {n} | {m} ({distinct.get(m, m)}) | {len(acc['seeds'])} | "
                                 f"{_paired_cells(acc)} | {_paired_cells(ece)} |")
            lines.append("")
        path = _unlabelled_plot(mine, task, ns, ms, folder)
        pngs.append(path)
        lines.append(f"![{task} vs M]({path.name})\n")
    return "\n".join(lines), stats, pngs


def _values(rows: list[dict[str, Any]], n: int, method: str, m: int, metric: str) -> list[float]:
    return [r[metric] for r in rows if r["n"] == n and r["method"] == method
            and r.get("unlabelled", 0) == m and r.get(metric) is not None]


def _unlabelled_plot(rows: list[dict[str, Any]], task: str, ns: list[int], ms: list[int],
                     folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ns), 2, figsize=(10, 3.6 * len(ns)), squeeze=False)
    xs = [max(m, 1) for m in ms]  # M=0 drawn at 1 on the log axis
    for row_axes, n in zip(axes, ns, strict=True):
        for ax, metric in zip(row_axes, ("accuracy", "ece_equal_mass"), strict=True):
            for method in ("a2t", "act"):
                vals = [_values(rows, n, method, m, metric) for m in ms]
                if any(vals):
                    ax.errorbar(xs, [np.mean(v) if v else np.nan for v in vals],
                                yerr=[_std(v) if v else np.nan for v in vals], marker="o", capsize=3,
                                label=COLUMNS[method])
            for method, style in (("tok", "--"), ("icl", ":")):
                v = _values(rows, n, method, 0, metric)
                if v:
                    ax.axhline(float(np.mean(v)), ls=style, color="grey", label=f"{COLUMNS[method]} (M=0)")
            ax.set_xscale("log")
            ax.set_xticks(xs, [str(m) for m in ms])
            ax.set_xlabel("M unlabelled rows")
            ax.set_ylabel(("accuracy" if metric == "accuracy" else "ECE (equal-mass)") + f", N={n}")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: IA2 with unlabelled queries (mean ± std over seeds, ddof=1)")
    fig.tight_layout()
    path = folder / f"{task}_vs_unlabelled.png"
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _model_banner(rows: list[dict[str, Any]], folder: Path) -> str:
    """Which model(s) the cells ran on (rows, and each sweep-<task>.json's settings); a
    random-weight model is said plainly."""
    found = [r["model"] for r in rows if isinstance(r.get("model"), dict)]
    for f in sorted(folder.glob("sweep-*.json")):
        try:
            found.append(json.loads(f.read_text(encoding="utf-8"))["settings"]["model"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    models = {json.dumps(m, sort_keys=True): m for m in found if isinstance(m, dict)}
    if not models:
        return ""
    lines = [f"Model: {m.get('name')} (fingerprint {m.get('fingerprint')})" for m in models.values()]
    if any(m.get("random") for m in models.values()):
        lines.append("**Random-weight model: these figures test the pipeline only, not the method.**")
    return "\n\n".join(lines) + "\n\n"


def _labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells scored on another task (``sweep --eval-task``) are shown as ``train->eval``."""
    return [dict(r, task=f"{r['task']}->{r['eval_task']}") if r.get("eval_task") not in (None, r["task"])
            else r for r in rows]


def report(folder: str | Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` (the paired statistics and the fairness fractions) and
    PNG plots into the sweep directory; return their paths and the markdown.

    Raises:
        IA2Error: no finished cells, a results line of the wrong shape (naming it), or a folder
            that ``ia2cache sweep`` did not make.
    """
    out = Path(folder).expanduser()
    rows = read_results(out)
    if not rows:
        raise IA2Error(f"{out}: no results*.jsonl with finished cells (run `ia2cache sweep` first)")
    claim_output_dir(out, "report", kind="report", accept=("sweep",))
    from ia2cache.analyze import report_section

    shown = _labelled(rows)
    with_m = [r for r in shown if r.get("unlabelled", 0)]
    shown = [r for r in shown if not r.get("unlabelled", 0)]  # the main tables: no unlabelled rows
    paired_md, stats = paired_markdown(shown)
    fair = fairness(rows)
    failed = read_results(out, failed=True)
    md = _model_banner(rows, out) + "## Paired comparisons\n\n" + paired_md + "\n" + _fairness_md(fair)
    md += "\n## Per-method tables\n\n"
    md += markdown(shown)
    if with_m:
        m_md, m_stats, m_png = unlabelled_section(shown + with_m, out)
        md += "\n" + m_md
        stats += m_stats
    else:
        m_png = []
    if failed:
        md += f"\n**{len(failed)} failed cell(s)** (a rerun of the sweep retries them):\n\n"
        md += "".join(f"- {r['task']} N={r['n']} seed={r['seed']} {r['method']}: {r.get('error')}\n"
                      for r in failed)
    # <out>/analysis/ (ia2cache analyze ... --out <out>/analysis): similarity tables, plots, scatter.
    # The rows as read (not relabelled train->eval): the scatter keeps in-distribution rows only.
    analysis_md, analysis_pngs = report_section(out, rows)
    if analysis_md:
        md = md + "\n" + analysis_md
    write_bytes_atomic(out / "report.md", (md + "\n").encode())
    write_json_atomic(out / "report.json", {"paired": stats, "fairness": fair, "failed": len(failed),
                                            "cells": len(rows)}, indent=1)
    pngs = plots(shown, out, out / "preds") + m_png + analysis_pngs
    return {"report": str(out / "report.md"), "json": str(out / "report.json"),
            "plots": [str(p) for p in pngs], "cells": len(rows), "markdown": md, "fairness": fair}
