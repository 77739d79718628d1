"""Report: paired statistics (bootstrap CIs by hand, t CIs against published t quantiles, sign-flip
p by enumeration, the star rule), the fairness counts, the paper-shaped tables with sample std
and their seeds footnote, and the plots, from results written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ia2cache.report import (
    MIN_SEEDS_FOR_CLAIM,
    bootstrap_ci,
    fairness,
    markdown,
    paired,
    paired_markdown,
    report,
    signflip_p,
    summarize,
    t_ci,
    t_quantile,
)
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
    # IA2→SFT − SFT at N=4 over 3 seeds: diffs 0.4, 0.3, 0.2, so +0.3 ± t(0.975, 2) · 0.1/√3 with
    # t(0.975, 2) = 4.3026527 (tables): [+0.052, +0.548]; 3 seeds: no star.
    assert "| 4 | 3 | +0.300 | [+0.052, +0.548] | [" in text
    entry = next(e for e in json.loads(Path(res["json"]).read_text())["paired"]
                 if (e["method"], e["baseline"], e["metric"], e["n"]) == ("a2t", "tok", "accuracy", 4))
    assert entry["ci95_t"] == pytest.approx([0.3 - 4.3026527 * 0.1 / 3**0.5, 0.3 + 4.3026527 * 0.1 / 3**0.5])
    assert entry["p_signflip"] == pytest.approx(2 / 8) and entry["claim"] is False
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


# ----------------------------------------------------------------------------- t CI, sign-flip p, star


def test_t_quantile_matches_published_values() -> None:
    # Student-t 97.5% quantiles from printed tables; the normal's 1.959964 as df grows.
    for df, want in ((1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=5e-7), df
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764451, abs=5e-7)
    assert t_quantile(0.995, 4) == pytest.approx(4.6040949, abs=5e-7)
    assert t_quantile(0.975, 1_000_000) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.51, 0.999), df=st.integers(1, 60))
def test_t_quantile_inverts_the_t_density_integrated_numerically(p: float, df: int) -> None:
    import mpmath

    t = t_quantile(p, df)

    def density(x: float) -> float:
        return (mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2))
                * (1 + x * x / df) ** (-(df + 1) / 2))

    assert float(0.5 + mpmath.quad(density, [0, t])) == pytest.approx(p, abs=1e-9)


def test_t_ci_by_hand() -> None:
    mean, lo, hi = t_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * np.sqrt(2.5) / np.sqrt(5)  # sd (ddof=1) of 1..5 is √2.5
    assert mean == 3.0 and lo == pytest.approx(3 - half, abs=1e-6) and hi == pytest.approx(3 + half, abs=1e-6)
    mean, lo, hi = t_ci([0.1, 0.3])  # two seeds: t(0.975, 1) = 12.7062047, sd = 0.1·√2
    assert (lo, hi) == pytest.approx((0.2 - 12.7062047 * 0.1, 0.2 + 12.7062047 * 0.1), abs=1e-6)
    one = t_ci([0.4])
    assert one[0] == 0.4 and np.isnan(one[1]) and np.isnan(one[2])
    assert t_ci([0.3] * 4) == pytest.approx((0.3, 0.3, 0.3))
    assert all(np.isnan(x) for x in t_ci([]))


def test_t_ci_covers_the_mean_95_percent_of_the_time_with_5_seeds() -> None:
    rng = np.random.default_rng(1)
    draws = rng.normal(0.0, 1.0, size=(4000, 5))
    covered = [lo <= 0 <= hi for _, lo, hi in (t_ci(d) for d in draws)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.012)


def test_signflip_p_by_hand() -> None:
    assert signflip_p([0.1, 0.2, 0.05, 0.3, 0.01]) == pytest.approx(2 / 32)  # the least with 5 seeds
    assert signflip_p([-0.1, -0.2, -0.05, -0.3, -0.01]) == pytest.approx(2 / 32)
    # ±1 ±2 ±3: sums 6 4 2 0 0 -2 -4 -6; |sum| >= 6 in 2 of 8
    assert signflip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # ±3 ±1 ±1: sums 5 3 3 1 -1 -3 -3 -5; the observed 3 - 1 + 1 = 3 is reached by 6 of 8
    assert signflip_p([3.0, -1.0, 1.0]) == pytest.approx(6 / 8)
    assert signflip_p([1.0, -1.0]) == 1.0 and signflip_p([0.0, 0.0, 0.0]) == 1.0
    assert signflip_p([0.1, 0.1, 0.1, 0.1, 0.0]) == pytest.approx(4 / 32)  # a zero diff: 2 patterns each
    assert np.isnan(signflip_p([]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=8))
def test_signflip_p_is_the_enumerated_share_and_symmetric(ints: list[int]) -> None:
    import itertools

    d = [x / 10 for x in ints]
    observed = abs(sum(ints))
    hits = sum(abs(sum(s * x for s, x in zip(signs, ints, strict=True))) >= observed
               for signs in itertools.product((1, -1), repeat=len(ints)))  # in integers: exact ties
    p = signflip_p(d)
    assert p == pytest.approx(hits / 2 ** len(ints))
    assert signflip_p([-x for x in d]) == pytest.approx(p)
    assert signflip_p(d[::-1]) == pytest.approx(p)


def test_signflip_p_monte_carlo_beyond_the_exact_limit() -> None:
    d = [0.3, -0.1, 0.2, 0.25, -0.05, 0.15, 0.1]
    exact = signflip_p(d)
    assert signflip_p(d, exact_max=4, n_mc=40_000) == pytest.approx(exact, abs=0.01)
    p = signflip_p([0.1] * 20)  # 2/2^20 exactly; Monte Carlo: (1 + hits) / (1 + 100000)
    assert 1 / 100_001 <= p < 1e-3


def _rows_with_diffs(diffs: list[float], metric: str = "accuracy") -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for s, d in enumerate(diffs):
        rows.append({"task": "t", "n": 4, "seed": s, "method": "tok", metric: 0.5})
        rows.append({"task": "t", "n": 4, "seed": s, "method": "a2t", metric: 0.5 + d})
    return rows


def test_star_needs_five_seeds_and_a_t_ci_that_excludes_zero() -> None:
    assert MIN_SEEDS_FOR_CLAIM == 5
    big = [0.40, 0.42, 0.41, 0.43, 0.44]
    four = paired(_rows_with_diffs(big[:4]), "a2t", "tok", "accuracy", "t", 4)
    assert four is not None and four["ci95_t"][0] > 0 and four["claim"] is False  # large, but 4 seeds
    md, _ = paired_markdown(_rows_with_diffs(big[:4]))
    assert "| 4 | 4 | +0.415 |" in md and " * " not in md
    five = paired(_rows_with_diffs(big), "a2t", "tok", "accuracy", "t", 4)
    assert five is not None and five["claim"] is True
    md, stats = paired_markdown(_rows_with_diffs(big))
    assert "| 4 | 5 | +0.420 * |" in md and stats[0]["claim"] is True
    assert "at least 5 seeds and the t CI excludes 0" in md and "2/32 = 0.0625" in md
    two = paired(_rows_with_diffs([0.5, 0.5001]), "a2t", "tok", "accuracy", "t", 4)
    assert two is not None and two["claim"] is False  # the old rule starred this
    # the bootstrap CI excludes 0 here but the t CI does not: no star
    shaky = [0.05, 0.06, 0.07, 0.08, -0.02]
    _, b_lo, _ = bootstrap_ci(shaky)
    p = paired(_rows_with_diffs(shaky), "a2t", "tok", "accuracy", "t", 4)
    assert b_lo > 0 and p is not None and p["ci95_t"][0] < 0 < p["ci95_t"][1] and p["claim"] is False
    one = paired(_rows_with_diffs([0.3]), "a2t", "tok", "accuracy", "t", 4)
    assert one is not None and one["ci95_t"] is None and one["claim"] is False
    md, _ = paired_markdown(_rows_with_diffs([0.3]))
    assert "| 4 | 1 | +0.300 | – | [+0.300, +0.300] | 1 | 1/0/0 |" in md


# ----------------------------------------------------------------------------- fairness


def _phase_rows() -> list[dict[str, object]]:
    base = {"task": "t", "n": 4, "seed": 0, "settings": "h"}
    return [
        # act's chosen phase: early-stopped at step 100, its best at that last evaluation
        dict(base, method="act", capped=[False], lr_edge=[True], best_step=[100], steps_run=[100]),
        # a2t: phase 1 IS act's chosen run (same record), phase 2 its own, stopped well after its best
        dict(base, method="a2t", capped=[False, False], lr_edge=[True, False], best_step=[100, 50],
             steps_run=[100, 80]),
        dict(base, method="tok", capped=[False], lr_edge=[False], best_step=[60], steps_run=[60]),
        dict(base, method="tna", capped=[True], lr_edge=[True], best_step=[1000], steps_run=[1000]),
        dict(base, method="icl"),
    ]


def test_fairness_counts_a2t_first_phase_once_overall() -> None:
    f = fairness(_phase_rows())
    # distinct chosen phases: act/a2t phase 1, a2t phase 2, tok, tna = 4 (the per-method lists hold 5)
    assert f["capped_chosen"]["overall"] == [1, 4]
    assert f["lr_edge_chosen"]["overall"] == [2, 4]  # act/a2t phase 1 and tna
    assert f["capped_chosen"]["a2t"] == [0, 2] and f["lr_edge_chosen"]["a2t"] == [1, 2]
    assert f["lr_edge_chosen"]["act"] == [1, 1] and f["capped_chosen"]["tna"] == [1, 1]
    # another seed's act phase is another phase
    more = _phase_rows() + [dict(r, seed=1) for r in _phase_rows()]
    assert fairness(more)["lr_edge_chosen"]["overall"] == [4, 8]


def test_fairness_all_runs_keeps_runs_of_other_m_and_settings_apart() -> None:
    """Every run trained: the same (task, N, seed, method, lr) with another M or other sweep
    settings is another run; a2t's phase 1 is still its act cell's."""
    run = {"lr": 0.001, "capped": True}
    act = {"task": "t", "n": 4, "seed": 0, "settings": "h", "method": "act", "runs": [[run]]}
    a2t = dict(act, method="a2t", runs=[[run], [dict(run, capped=False)]])
    rows = [act, a2t, dict(act, unlabelled=64), dict(act, settings="h2")]
    f = fairness(rows)["capped_all_runs"]
    assert f["act"] == [3, 3] and f["a2t"] == [0, 1] and f["overall"] == [3, 4]


def test_fairness_still_improving_count() -> None:
    f = fairness(_phase_rows())
    # act/a2t phase 1 and tok: best at the last step; a2t phase 2: 30 steps after; tna: capped
    assert f["improving_chosen"]["overall"] == [2, 4]
    assert f["improving_chosen"]["a2t"] == [1, 2] and f["improving_chosen"]["act"] == [1, 1]
    assert f["improving_chosen"]["tok"] == [1, 1] and f["improving_chosen"]["tna"] == [0, 1]
    # one evaluation after the best is not "still improving"
    rows = [dict(r, best_step=[90], steps_run=[100]) if r["method"] == "tok" else r for r in _phase_rows()]
    assert fairness(rows)["improving_chosen"]["tok"] == [0, 1]


def test_report_shows_the_fairness_rows(tmp_path: Path) -> None:
    rows = [dict(r, accuracy=0.5, ece_equal_mass=0.1, ece_equal_width=0.1) for r in _phase_rows()]
    mark_as_sweep(tmp_path)
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = report(tmp_path)
    assert res["fairness"]["improving_chosen"]["overall"] == [2, 4]
    assert "| still improving when stopped | 2/4 (50%) | 1/2 (50%) | 1/1 (100%) | 0/1 (0%) | 1/1 (100%) |" \
        in res["markdown"]
    assert "| capped, chosen runs | 1/4 (25%) |" in res["markdown"]


# ----------------------------------------------------------------------------- seeds footnote


def test_per_method_table_names_each_columns_seeds_where_they_differ() -> None:
    rows = [{"task": "t", "n": n, "seed": s, "method": m, "accuracy": 0.5, "ece_equal_mass": 0.1,
             "ece_equal_width": 0.1}
            for n in (4, 8) for m in ("tok", "a2t") for s in (0, 1, 2)
            if not (n == 8 and m == "a2t" and s == 2)]  # a2t's N=8 seed 2 cell failed
    rows.append({"task": "t", "n": 0, "seed": 0, "method": "base", "accuracy": 0.1, "ece_equal_mass": 0.1,
                 "ece_equal_width": 0.1})
    md = markdown(rows)
    assert "| 8 † |" in md and "| 4 |" in md and "| 4 †" not in md
    assert md.count("† N=8: the columns averaged different seeds: SFT [0, 1, 2]; IA2→SFT [0, 1].") == 3
    assert "N=4:" not in md
    same = [r for r in rows if not (r["n"] == 8 and r["seed"] == 2)]
    assert "†" not in markdown(same)  # N=4 has seeds 0-2, N=8 seeds 0-1: each row's columns agree
