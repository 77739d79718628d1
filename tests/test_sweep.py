from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import ia2cache.sweep as sweep_mod
from ia2cache.errors import IA2Error
from ia2cache.report import markdown, report, summarize
from ia2cache.sweep import SweepConfig, parse_ints, read_results, select_lr, sweep
from tests.conftest import write_task

WORDS = ["hot", "up", "big", "go", "ocean", "paper"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, str]:
    d = tmp_path_factory.mktemp("sweep")
    task = write_task(d / "task.jsonl", ((f"{WORDS[i % 6]} {i}", WORDS[(i * 5) % 6]) for i in range(40)))
    return {"model": str(tiny_model_dir), "task": str(task), "store": str(d / "store")}


def _config(env: dict[str, str], out: Path) -> SweepConfig:
    return SweepConfig(task=env["task"], out=str(out), ns=(4,), seeds=(0, 1), methods=("tok", "a2t"),
                       lrs=(3e-2, 1e-3), epochs=2, n_eval=6, model=env["model"], store=env["store"])


def test_sweep_runs_cells_selects_on_dev_and_resumes(env: dict[str, str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    evals: list[str] = []
    real_eval = sweep_mod.evaluate

    def counting_eval(model: Any, tok: Any, task: Any, config: Any, **kw: Any) -> Any:
        evals.append(config.mode)
        return real_eval(model, tok, task, config, **kw)

    monkeypatch.setattr(sweep_mod, "evaluate", counting_eval)
    out = tmp_path / "sw"
    first = sweep(_config(env, out))
    assert first == {**first, "cells_total": 7, "cells_done": 7, "cells_skipped": 0}
    rows = read_results(out)
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        [("base", 0)] + [(m, s) for s in (0, 1) for m in ("icl", "tok", "a2t")])
    # Two learning rates were trained per method cell, but only the chosen adapter was evaluated.
    assert evals.count("adapter") == 4 and evals.count("icl") == 2 and evals.count("base") == 1
    for r in rows:
        if r["method"] in ("tok", "a2t"):
            assert set(r["grid"]) == {"0.03", "0.001"}
            assert r["lr"] == min((loss, float(lr)) for lr, loss in r["grid"].items())[1]
            assert r["dev_loss"] == r["grid"][f"{r['lr']:g}"]
    evals.clear()
    again = sweep(_config(env, out))
    assert again["cells_skipped"] == 7 and again["cells_done"] == 0 and evals == []
    assert len(read_results(out)) == 7


def test_select_lr_sees_only_dev_losses() -> None:
    assert select_lr([(1e-3, 0.5), (1e-4, 0.2), (3e-4, None)]) == 1e-4
    assert select_lr([(1e-3, 0.2), (1e-4, 0.2)]) == 1e-4  # ties: the smaller rate


def test_cut_line_in_results_is_skipped_and_that_cell_reruns(tmp_path: Path) -> None:
    good = {"task": "t", "n": 4, "seed": 0, "method": "tok", "accuracy": 1.0}
    twice = {**good, "accuracy": 0.5}
    (tmp_path / "results.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps(twice) + "\n" + '{"task": "t", "n": 4, "se')
    assert read_results(tmp_path) == [twice]


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
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "t__tok__n4__s0.json").write_text(json.dumps({"confidence": [0.9, 0.2], "correct": [1, 0]}))
    res = report(tmp_path)
    assert Path(res["report"]).read_text().startswith("**t: accuracy**")
    assert {Path(p).name for p in res["plots"]} == {"t_vs_n.png", "t_reliability.png"}
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in res["plots"])


def test_bad_sweep_input() -> None:
    with pytest.raises(IA2Error, match="--methods"):
        SweepConfig(task="x", out="o", methods=("nope",))
    with pytest.raises(IA2Error, match="--seeds x"):
        parse_ints("x", "--seeds")
    assert parse_ints("0-2,5", "--seeds") == (0, 1, 2, 5)
    with pytest.raises(IA2Error, match="results.jsonl"):
        report("/nonexistent-dir-xyz")
