"""Report: paired statistics (bootstrap CIs by hand), the paper-shaped tables with sample std,
and the plots, from results written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ia2cache.report import markdown, report, summarize
from tests.conftest import mark_as_sweep


def test_report_table_and_plots(tmp_path: Path) -> None:
    rows = [{"task": "t", "n": n, "seed": s, "method": m, "accuracy": acc, "ece_equal_mass": 0.1 * s,
             "ece_equal_width": 0.2, "agreement_with_icl": None}
            for n in (4, 8) for s in (0, 1, 2) for m, acc in (("tok", 0.5 + 0.1 * s), ("a2t", 0.9))]
    rows.append({"task": "t", "n": 0, "seed": 0, "method": "base", "accuracy": 0.1, "ece_equal_mass": 0.3,
                 "ece_equal_width": 0.3})
    s = summarize(rows)
    assert s["t"][4]["tok"]["accuracy"] == pytest.approx([0.5, 0.6, 0.7])
    assert s["t"][8]["base"]["accuracy"] == [0.1]  # base repeats in every N row
    md = markdown(rows)
    assert "| N | base | SFT | IA2→SFT |" in md
    assert "| 4 | 0.100 ± 0.000 | 0.600 ± 0.100 | 0.900 ± 0.000 |" in md
    mark_as_sweep(tmp_path)
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "t__tok__n4__s0.json").write_text(json.dumps({"confidence": [0.9, 0.2], "correct": [1, 0]}))
    res = report(tmp_path)
    text = Path(res["report"]).read_text()
    assert text.startswith("## Paired comparisons") and "**t: accuracy**" in text
    assert "| 4 | 3 | +0.300 [" in text  # IA2→SFT − SFT at N=4 over 3 seeds: +0.3 on average
    assert {Path(p).name for p in res["plots"]} == {"t_vs_n.png", "t_reliability.png"}
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in res["plots"])


def test_bootstrap_ci_matches_the_exact_bootstrap_distribution() -> None:
    import itertools

    from ia2cache.report import bootstrap_ci, win_tie_loss

    diffs = [0.1, -0.05, 0.2]
    # By hand: all 3^3 equally likely resamples and their means; the 2.5% quantile is the smallest
    # mean whose cumulative probability reaches 2.5% (the 97.5% one likewise).
    means = sorted(sum(c) / 3 for c in itertools.product(diffs, repeat=3))
    exact_lo = next(m for i, m in enumerate(means, start=1) if i / 27 >= 0.025)
    exact_hi = next(m for i, m in enumerate(means, start=1) if i / 27 >= 0.975)
    mean, lo, hi = bootstrap_ci(diffs, n_boot=200_000)
    assert mean == pytest.approx(0.25 / 3)
    assert lo == pytest.approx(exact_lo, abs=0.01) and hi == pytest.approx(exact_hi, abs=0.01)
    assert bootstrap_ci([0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
    assert win_tie_loss([0.1, 0.0, -0.2]) == (1, 1, 1)
    assert win_tie_loss([0.1, 0.0, -0.2], lower_is_better=True) == (1, 1, 1)
    assert win_tie_loss([-0.1, -0.2], lower_is_better=True) == (2, 0, 0)


def test_report_pairs_seeds_and_uses_sample_std(tmp_path: Path) -> None:
    from ia2cache.report import paired

    rows = [{"task": "t", "n": 4, "seed": s, "method": m, "accuracy": acc, "ece_equal_mass": ece,
             "ece_equal_width": ece, "settings": "x"}
            for s, (a, b) in enumerate([(0.8, 0.7), (0.9, 0.6), (0.5, 0.5)])
            for m, acc, ece in (("a2t", a, 0.1), ("tok", b, 0.2))]
    p = paired(rows, "a2t", "tok", "accuracy", "t", 4)
    assert p is not None and p["diffs"] == pytest.approx([0.1, 0.3, 0.0])
    assert (p["win"], p["tie"], p["loss"]) == (2, 1, 0) and p["mean"] == pytest.approx(0.4 / 3)
    md = markdown(rows)
    sd = float(np.std([0.8, 0.9, 0.5], ddof=1))
    assert f"{np.mean([0.8, 0.9, 0.5]):.3f} ± {sd:.3f}" in md
