"""Report: the paper-shaped comparison table and plots from a sweep directory.

Rows are N, columns ICL / base / SFT / IA2 / IA2->SFT / IA2+SFT (and any other method swept),
cells mean +- std over data seeds of accuracy and ECE (equal-mass bins, the paper's; the
equal-width table follows). Plots (PNG, matplotlib): accuracy vs N and ECE vs N per method,
and one reliability diagram per method pooling every seed and N. When ``<DIR>/analysis/`` holds
``ia2cache analyze`` outputs, the report adds their tables and plots and a scatter of activation
similarity vs accuracy and ECE (see ``ia2cache.analyze.report_section``).

Launch: ``ia2cache report DIR``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ia2cache.errors import IA2Error
from ia2cache.sweep import read_results

COLUMNS: dict[str, str] = {
    "icl": "ICL", "base": "base", "tok": "SFT", "act": "IA2", "a2t": "IA2→SFT", "tna": "IA2+SFT",
    "tokl": "KL", "t2a": "SFT→IA2",
}


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


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


def markdown(rows: list[dict[str, Any]]) -> str:
    summary = summarize(rows)
    methods = [m for m in COLUMNS if any(r["method"] == m for r in rows)]
    lines: list[str] = []
    for task, by_n in sorted(summary.items()):
        seeds = sorted({r["seed"] for r in rows if r["task"] == task and r["method"] not in ("base",)})
        for metric, title in (("accuracy", "accuracy"), ("ece_equal_mass", "ECE, 15 equal-mass bins"),
                              ("ece_equal_width", "ECE, 15 equal-width bins")):
            lines.append(f"**{task}: {title}** (mean ± std over seeds {seeds})\n")
            lines.append("| N | " + " | ".join(COLUMNS[m] for m in methods) + " |")
            lines.append("|---|" + "---|" * len(methods))
            for n in sorted(by_n):
                cells = [_fmt(by_n[n].get(m, {}).get(metric, [])) for m in methods]
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
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
                std = [np.std(v) if v else np.nan for v in vals]
                ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=COLUMNS[m])
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("N (training examples)")
            ax.set_ylabel("accuracy" if metric == "accuracy" else "ECE (15 equal-mass bins)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task}: accuracy and calibration vs N (mean ± std over seeds)")
        fig.tight_layout()
        path = folder / f"{task}_vs_n.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if preds is not None and preds.is_dir():
        for task in sorted(summary):
            path = _reliability(preds, task, folder, plt)
            if path is not None:
                written.append(path)
    return written


def _reliability(preds: Path, task: str, folder: Path, plt: Any, n_bins: int = 15) -> Path | None:
    pooled: dict[str, tuple[list[float], list[int]]] = defaultdict(lambda: ([], []))
    for f in sorted(preds.glob(f"{task}__*.json")):
        method = f.stem.split("__")[1]
        d = json.loads(f.read_text())
        pooled[method][0].extend(d["confidence"])
        pooled[method][1].extend(d["correct"])
    if not pooled:
        return None
    methods = [m for m in COLUMNS if m in pooled]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells scored on another task (``sweep --eval-task``) are shown as ``train->eval``."""
    return [dict(r, task=f"{r['task']}->{r['eval_task']}") if r.get("eval_task") not in (None, r["task"])
            else r for r in rows]


def report(folder: str | Path) -> dict[str, Any]:
    """Write ``report.md`` and PNG plots into the sweep directory; return their paths."""
    out = Path(folder).expanduser()
    rows = read_results(out)
    if not rows:
        raise IA2Error(f"{out}: no results.jsonl with finished cells (run `ia2cache sweep` first)")
    from ia2cache.analyze import report_section

    md = markdown(_labelled(rows))
    # <out>/analysis/ (ia2cache analyze ... --out <out>/analysis): similarity tables, plots, scatter.
    # The rows as read (not relabelled train->eval): the scatter keeps in-distribution rows only.
    analysis_md, analysis_pngs = report_section(out, rows)
    if analysis_md:
        md = md + "\n" + analysis_md
    (out / "report.md").write_text(md + "\n")
    pngs = plots(_labelled(rows), out, out / "preds") + analysis_pngs
    return {"report": str(out / "report.md"), "plots": [str(p) for p in pngs], "cells": len(rows),
            "markdown": md}
