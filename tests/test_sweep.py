from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import ia2cache.sweep as sweep_mod
from ia2cache.errors import IA2Error
from ia2cache.prompts import DEFAULT_DEV
from ia2cache.report import report
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
                       lrs=(3e-2, 1e-3), max_steps=8, eval_every=4, n_eval=6, dev="4", model=env["model"],
                       store=env["store"])


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
            # One lr per phase, each chosen on that phase's own dev loss (a2t: act, then tok).
            assert len(r["grid"]) == len(r["lr"]) == (2 if r["method"] == "a2t" else 1)
            for grid, lr in zip(r["grid"], r["lr"], strict=True):
                assert set(grid) == {"0.03", "0.001"}
                assert lr == min((loss, float(x)) for x, loss in grid.items())[1]
            assert r["dev_loss"] == r["grid"][-1][f"{r['lr'][-1]:g}"]
            assert len(r["capped"]) == len(r["steps_run"]) == len(r["lr"])
            assert r["dev"] == 4 and r["n_train"] == 4 and r["n_dev"] == 4
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


def test_bad_sweep_input() -> None:
    with pytest.raises(IA2Error, match="--methods"):
        SweepConfig(task="x", out="o", methods=("nope",))
    with pytest.raises(IA2Error, match="--seeds x"):
        parse_ints("x", "--seeds")
    assert parse_ints("0-2,5", "--seeds") == (0, 1, 2, 5)
    # Ranges are bounded before they are built: a huge one costs nothing and is refused.
    for spec, match in (("0-99999999999", "must be in"), ("0-20000", "more than"), ("5-2", "backwards"),
                        ("1,1", "repeated"), ("-3", "must be in")):
        with pytest.raises(IA2Error, match=match):
            parse_ints(spec, "--seeds")
    with pytest.raises(IA2Error, match=r"no results\*.jsonl"):
        report("/nonexistent-dir-xyz")


def _small(env: dict[str, str], out: Path, **kw: Any) -> SweepConfig:
    base = dict(task=env["task"], out=str(out), ns=(4,), seeds=(0, 1), methods=("tok",), lrs=(1e-2,),
                max_steps=4, eval_every=2, n_eval=4, dev="4", model=env["model"], store=env["store"],
                threads=1)
    return SweepConfig(**{**base, **kw})


def _cells(out: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    keep = ("accuracy", "ece_equal_mass", "nll", "lr", "best_step", "steps_run", "capped", "dev_loss")
    return {(r["n"], r["seed"], r["method"]): {k: r.get(k) for k in keep} for r in read_results(out)}


def test_two_workers_give_the_rows_of_one(env: dict[str, str], tmp_path: Path) -> None:
    one = sweep(_small(env, tmp_path / "one"))
    two = sweep(_small(env, tmp_path / "two", workers=2))
    assert one["cells_done"] == two["cells_done"] == 5 and two["cells_failed"] == 0
    a, b = _cells(tmp_path / "one"), _cells(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        for field, value in a[key].items():
            want = pytest.approx(value) if isinstance(value, float) else value
            assert b[key][field] == want, (key, field)
    # Only the parent wrote the results file: one line per cell, none torn.
    lines = (tmp_path / "two" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x) for x in lines)


def test_shards_together_run_exactly_the_cells_of_one_run(env: dict[str, str], tmp_path: Path) -> None:
    cfg = dict(ns=(4, 6), seeds=(0, 1, 2), methods=("tok",), max_steps=2, eval_every=2)
    from ia2cache.sweep import _plan

    whole = _plan(_small(env, tmp_path / "x", **cfg))
    shards = [_plan(_small(env, tmp_path / "x", shard=f"{i}/3", **cfg)) for i in range(3)]
    mine = sorted(j for p in shards for j in p.mine)
    assert mine == whole.mine == list(range(len(whole.units)))  # each unit in exactly one shard
    # Run two shards of a small grid into one --out: each writes its own file; together = one run.
    small = dict(ns=(4,), seeds=(0, 1), methods=("tok",))
    for i in range(2):
        sweep(_small(env, tmp_path / "sharded", shard=f"{i}/2", **small))
    sweep(_small(env, tmp_path / "single", **small))
    files = sorted(p.name for p in (tmp_path / "sharded").glob("results*.jsonl"))
    assert files == ["results-0of2.jsonl", "results-1of2.jsonl"]
    assert _cells(tmp_path / "sharded").keys() == _cells(tmp_path / "single").keys()
    assert report(tmp_path / "sharded")["cells"] == 5


@pytest.mark.parametrize("change", [
    {"max_steps": 6}, {"lrs": (3e-2,)}, {"eval_every": 1}, {"patience": 2}, {"n_eval": 3}, {"dev": "6"},
    {"icl_k": 2}, {"icl_demos": "pool"}, {"labels": "icl"}, {"adapter": "ia3"}, {"lora_r": 4},
    {"model": "other"}, {"task": "edited"}, {"min_delta": 0.0}, {"positions": "query+response"},
])
def test_a_rerun_with_a_changed_setting_is_refused_naming_it(env: dict[str, str], tmp_path: Path,
                                                            change: dict[str, Any], tiny_tok: Any) -> None:
    from ia2cache.testing import tiny_llama

    out = tmp_path / "sw"
    first = _plan_only(_small(env, out, seeds=(0,)), out)
    if "model" in change:  # another model folder: other weights, so another fingerprint
        other = tmp_path / "other-model"
        tiny_llama(len(tiny_tok), seed=3).save_pretrained(other)
        tiny_tok.save_pretrained(other)
        change = {"model": str(other)}
    if "task" in change:  # the same file name, edited content
        edited = tmp_path / "copy" / Path(env["task"]).name
        edited.parent.mkdir()
        edited.write_text(Path(env["task"]).read_text().replace("hot", "cold"))
        change = {"task": str(edited)}
    flag = "--" + next(iter(change)).replace("_", "-")
    with pytest.raises(IA2Error, match=flag):
        _plan_only(_small(env, out, seeds=(0,), **change), out)
    assert first  # the first settings stay what sweep-<task>.json describes
    assert json.loads((out / f"sweep-{Path(env['task']).stem}.json").read_text())["settings_hash"] == first


def _plan_only(config: SweepConfig, out: Path) -> str:
    """What a sweep checks and records before running any cell (its settings hash)."""
    from ia2cache.sweep import _check_settings, _plan, _write_settings

    out.mkdir(exist_ok=True)
    plan = _plan(config)
    _check_settings(out, plan)
    _write_settings(out, plan)
    return plan.settings_hash


def test_positions_reach_the_caches_and_enter_the_settings_only_when_changed(env: dict[str, str],
                                                                           tmp_path: Path) -> None:
    """--positions query+response collects caches that align every query token too; at its
    default the settings (and so the cells of every sweep run before it existed) are unchanged.
    Both share one runs folder (as docs/results' scripts do): neither meets the other's runs."""
    from ia2cache.store import Cache
    from ia2cache.sweep import _plan

    runs = str(tmp_path / "runs")
    default, ablation = (_small(env, tmp_path / p, seeds=(0,), methods=("act",), runs=runs)
                         for p in ("a", "b"))
    ablation = dataclasses.replace(ablation, positions="query+response")
    assert "positions" not in _plan(default).settings
    assert _plan(ablation).settings["positions"] == "query+response"
    rows = {}
    for name, config in (("response", default), ("query+response", ablation)):
        sweep(config)
        (row,) = [r for r in read_results(Path(config.out)) if r["method"] == "act"]
        assert row["status"] == "ok", row
        assert row.get("positions", "response") == name and ("positions" in row) == (name != "response")
        cache = Cache.open(Path(env["store"]) / row["cache"])
        assert cache.manifest["positions"] == name
        assert json.loads((Path(row["adapter"]) / "run.json").read_text())["cache_key"] == row["cache"]
        rows[name] = cache.read("tokens/positions_len", 0, cache.n_rows)
    # One aligned position a row (T=1) against the query's tokens too: strictly more each row.
    assert (rows["response"] == 1).all() and (rows["query+response"] > 1).all()
    with pytest.raises(IA2Error, match="--positions all: choose response or query"):
        dataclasses.replace(default, positions="all")


def test_sweeps_of_pool_and_file_unlabelled_queries_share_a_runs_folder(env: dict[str, str],
                                                                        tmp_path: Path) -> None:
    """M unlabelled queries from the pool or from a file are other caches: their act runs go to
    their own folders, so neither sweep fails. M = 0 is the same labelled-only cache in both (the
    file's lines are not read there) and so the same run, reused."""
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"input": f"query {i}"}) + "\n" for i in range(6)))
    runs = str(tmp_path / "runs")
    common = dict(seeds=(0,), methods=("act",), unlabelled=(0, 4), runs=runs)
    adapters = {}
    for name, extra in (("pool", {}), ("file", {"unlabelled_file": str(queries)})):
        sweep(_small(env, tmp_path / name, **common, **extra))
        rows = [r for r in read_results(tmp_path / name) if r["method"] == "act"]
        assert sorted(r["unlabelled"] for r in rows) == [0, 4], rows
        assert all(r["status"] == "ok" for r in rows), rows
        adapters[name] = {r["unlabelled"]: r["adapter"] for r in rows}
    assert adapters["pool"][0] == adapters["file"][0]  # the same cache: one run, reused
    assert adapters["pool"][4] != adapters["file"][4]
    from ia2cache.store import Cache

    m0 = json.loads((Path(adapters["file"][0]) / "run.json").read_text())["cache_key"]
    assert Cache.open(Path(env["store"]) / m0).manifest["n_unlabelled"] == 0


def test_a_dev_half_sweep_shares_a_runs_folder_with_the_default_one(env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """docs/results/rerun.sh's last step: --dev half beside the default dev size, one --runs. The
    dev rows are part of the cache, so each sweep's runs have their own folder; the default's
    keep the name they always had (n<N>-s<seed>), so earlier runs are still found."""
    runs, units, caches = tmp_path / "runs", {}, {}
    for name, dev in (("default", str(DEFAULT_DEV)), ("half", "half")):
        sweep(_small(env, tmp_path / name, seeds=(0,), methods=("act",), runs=str(runs), dev=dev))
        (row,) = [r for r in read_results(tmp_path / name) if r["method"] == "act"]
        assert row["status"] == "ok", row
        units[name], caches[name] = Path(row["adapter"]).parent.name, row["cache"]
    assert caches["default"] != caches["half"]  # 16 dev rows against 2
    # (This test's model is not the default one: both folders name it.)
    assert units["default"].startswith("n4-s0-model") and "dev" not in units["default"]
    assert units["half"] == f"{units['default']}-dev2"


def test_an_unlabelled_file_without_an_m_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"input": "a"}) + "\n")
    with pytest.raises(IA2Error, match="--unlabelled-file .*give an M > 0"):
        _small(env, tmp_path / "x", unlabelled_file=str(queries))


def test_more_seeds_or_methods_extend_a_sweep(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "sw"
    a = _plan_only(_small(env, out, seeds=(0,)), out)
    b = _plan_only(_small(env, out, seeds=(0, 1, 2), methods=("tok", "act")), out)
    assert a == b
    grid = json.loads((out / f"sweep-{Path(env['task']).stem}.json").read_text())["grid"]
    assert grid == {"ns": [4], "seeds": [0, 1, 2], "methods": ["act", "tok"]}



def test_status_names_the_cells_left_runs_nothing_and_writes_nothing(env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """sweep --status: the cells done and left, what a run would refuse refused, nothing written."""
    from typer.testing import CliRunner

    from cli.main import app
    from ia2cache.sweep import sweep_status

    out = tmp_path / "st"
    cfg = _small(env, out, seeds=(0,))
    fresh = sweep_status(cfg)
    assert not out.exists()  # nothing written, not even the folder
    assert (fresh["cells_total"], fresh["cells_done"], fresh["cells_left"]) == (3, 0, 3)  # base, icl, tok
    assert {c["method"] for c in fresh["left"]} == {"base", "icl", "tok"} and not fresh["complete"]
    sweep(cfg)
    done = sweep_status(cfg)
    assert done["complete"] and (done["cells_done"], done["cells_left"]) == (3, 0)
    # The tok cell failed after all (its line replaced by a failed one): left, and marked failed.
    results = out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    rows = [dict(r, status="failed", error="RuntimeError: x") if r["method"] == "tok" else r for r in rows]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    left = sweep_status(cfg)
    assert (left["cells_done"], left["cells_left"], left["cells_failed"]) == (2, 1, 1)
    assert left["left"] == [{"n": 4, "seed": 0, "unlabelled": 0, "method": "tok", "failed": True}]
    flags = ["sweep", "--task", env["task"], "--out", str(out), "--n", "4", "--seeds", "0",
             "--methods", "tok", "--lrs", "1e-2", "--max-steps", "4", "--eval-every", "2", "--n-eval", "4",
             "--dev", "4", "--model", env["model"], "--store", env["store"], "--status"]
    r = CliRunner().invoke(app, flags)
    assert r.exit_code == 3, r.output
    assert "2 of 3 cells done, 1 left (1 failed" in r.output and "N=4 seed=0 tok (failed)" in r.output
    r = CliRunner().invoke(app, [*flags, "--json"])
    assert r.exit_code == 3 and json.loads(r.stdout)["cells_left"] == 1
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # still nothing written
    # Other settings: refused as a run would be, naming the flag.
    r = CliRunner().invoke(app, [*flags[:-1], "--max-steps", "6", "--status"])
    assert r.exit_code == 2 and "--max-steps" in r.output
    # What a run would refuse, status refuses: a folder someone else filled, one another command
    # made, a symlink to a sweep's folder; a folder holding only a lock is a new one.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(IA2Error, match="not a folder ia2cache sweep made"):
        sweep_status(_small(env, tmp_path / "mine", seeds=(0,)))
    from ia2cache.outputs import LOCK, claim_output_dir

    claim_output_dir(tmp_path / "distilled", "--out", kind="distill")
    with pytest.raises(IA2Error, match="made by `ia2cache distill`"):
        sweep_status(_small(env, tmp_path / "distilled", seeds=(0,)))
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(IA2Error, match="link"):
        sweep_status(_small(env, tmp_path / "link", seeds=(0,)))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / LOCK).write_text("")
    assert sweep_status(_small(env, tmp_path / "locked", seeds=(0,)))["cells_left"] == 3


def test_status_counts_shards_and_unlabelled_cells_as_a_run_does(env: dict[str, str], tmp_path: Path) -> None:
    """base once; per (N, seed): ICL and every method at M = 0, at M > 0 only the methods that
    read unlabelled rows (a2t, not tok); n shards together hold the cells of one run."""
    from ia2cache.sweep import sweep_status

    kw = dict(seeds=(0, 1), methods=("tok", "a2t"), unlabelled=(0, 8))
    whole = sweep_status(_small(env, tmp_path / "u", **kw))
    assert whole["cells_total"] == 1 + 2 * (3 + 1)
    assert sorted((c["seed"], c["unlabelled"], c["method"]) for c in whole["left"] if c["unlabelled"]) == [
        (0, 8, "a2t"), (1, 8, "a2t")]
    parts = [sweep_status(_small(env, tmp_path / "u", shard=f"{i}/3", **kw)) for i in range(3)]
    assert sum(p["cells_total"] for p in parts) == whole["cells_total"]
    cells = sorted(tuple(sorted(c.items())) for p in parts for c in p["left"])
    assert cells == sorted(tuple(sorted(c.items())) for c in whole["left"])
