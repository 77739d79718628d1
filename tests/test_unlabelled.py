"""IA2 on unlabelled queries: M extra teacher rows whose demos come only from the N labelled
rows; only activation phases train on them; they never reach a tok loss or an lr chosen by
labels; a file of queries with targets is refused; a killed collect of many rows resumes
bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import ia2cache.distill as distill_mod
from cli.main import app
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.errors import IA2Error
from ia2cache.store import Cache
from ia2cache.sweep import SWEEP_METHODS
from tests.conftest import write_jsonl, write_task

WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("unlabelled")
    task = write_task(d / "task.jsonl", ((f"{WORDS[i % 8]} {i}", WORDS[(i * 3) % 8]) for i in range(60)))
    common = dict(model=str(tiny_model_dir), task=str(task), n=4, k=3, dev=4, store=str(d / "store"),
                  max_new_tokens=2, dtype="fp32", shard_rows=8, chunk_rows=4)
    res = collect(CollectConfig(**common, unlabelled=40))
    return {"dir": d, "model": str(tiny_model_dir), "task": str(task), "common": common, "cache": res.cache}


def _read(cache: str, path: str) -> np.ndarray:
    c = Cache.open(cache)
    return c.read(path, 0, c.n_rows)


def test_unlabelled_rows_sit_between_train_and_dev_with_demos_from_the_n(env: dict[str, Any]) -> None:
    c = Cache.open(env["cache"])
    m = c.manifest
    assert (m["n_train"], m["n_unlabelled"], m["n_dev"]) == (4, 40, 4) and c.n_rows == 48
    assert m["distinct_unlabelled"] == 22  # 30 pool rows - 4 train - 4 dev, then repeated
    split = _read(env["cache"], "rows/split")
    assert split.tolist() == [0] * 4 + [3] * 40 + [1] * 4
    example, demos = _read(env["cache"], "rows/example_index"), _read(env["cache"], "rows/demo_index")
    train = set(example[:4].tolist())
    assert all(set(demos[r].tolist()) <= train for r in range(48))  # every row's demos: the N rows
    assert not set(example[4:44].tolist()) & (train | set(example[44:].tolist()))
    # No target is stored for an unlabelled row: nothing could read one.
    assert (_read(env["cache"], "tokens/target_len")[4:44] == 0).all()
    # Without unlabelled rows the key is the one a plain cache has; with them it differs.
    plain = collect(CollectConfig(**env["common"]))
    assert plain.key != Path(env["cache"]).name
    assert Cache.open(plain.cache).n_rows == 8


def test_act_trains_on_train_and_unlabelled_rows_tok_on_labelled_rows_only(
        env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, set[int]] = {}
    real = distill_mod._loss

    def spy(run: Any, batch: Any, objective: str) -> Any:
        kind = "train" if run.model.training else "dev"
        seen.setdefault(f"{objective}-{kind}", set()).update(batch.rows.tolist())
        return real(run, batch, objective)

    monkeypatch.setattr(distill_mod, "_loss", spy)
    res = distill(DistillConfig(cache=env["cache"], model=env["model"], method="a2t", lr=1e-2,
                                max_steps=16, eval_every=4, patience=100, out=str(tmp_path / "a2t")))
    assert seen["act-train"] == set(range(44))  # the 4 labelled rows and the 40 unlabelled ones
    assert seen["tok-train"] == set(range(4))  # labelled rows only
    # Early stopping (and so lr selection in a sweep) reads the labelled dev rows only.
    assert seen["act-dev"] == seen["tok-dev"] == set(range(44, 48))
    run = json.loads((tmp_path / "a2t" / "run.json").read_text())
    assert run["cache_manifest"]["n_unlabelled"] == 40 and res.steps_run == [16, 16]
    # An epoch of the act phase covers 44 rows (11 steps of 4), of the tok phase 4 rows (1 step).
    assert run["phases"][0]["epochs_run"] == 2 and run["phases"][1]["epochs_run"] == 16


def test_an_unlabelled_file_with_a_target_is_refused_with_exit_2(env: dict[str, Any], tmp_path: Path) -> None:
    lines = [json.dumps({"input": "a"}), json.dumps({"input": "b", "target": "c"})]
    bad = write_jsonl(tmp_path / "u.jsonl", lines)
    r = CliRunner().invoke(app, ["collect", "--model", env["model"], "--task", env["task"], "--n", "4",
                                 "--store", str(tmp_path / "s"), "--unlabelled-file", str(bad)])
    assert r.exit_code == 2 and "u.jsonl:2: has a 'target' field" in " ".join(r.stderr.split())
    assert not (tmp_path / "s").exists()
    good = write_jsonl(tmp_path / "g.jsonl", [json.dumps({"input": f"query {i}"}) for i in range(10)])
    res = collect(CollectConfig(**{**env["common"], "store": str(tmp_path / "s2")},
                                unlabelled_file=str(good)))
    c = Cache.open(res.cache)
    assert c.manifest["n_unlabelled"] == 10 and (_read(res.cache, "rows/example_index")[4:14] == -1).all()
    with pytest.raises(IA2Error, match="--response target: unlabelled rows have no target"):
        CollectConfig(**{**env["common"], "response": "target"}, unlabelled=4)


_CHILD = """
import sys, json
from ia2cache.collect import CollectConfig, collect
common = json.loads(sys.argv[1])
collect(CollectConfig(**common, unlabelled=120))
"""


def test_a_killed_collect_of_many_unlabelled_rows_resumes_bit_identically(env: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)

    def run(store: Path, fault: str | None) -> subprocess.CompletedProcess:
        e = {k: v for k, v in os.environ.items() if k != "IA2CACHE_FAULT"}
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ["PYTHONPATH"]
        if fault:
            e["IA2CACHE_FAULT"] = fault
        common = {**env["common"], "store": str(store)}
        return subprocess.run([sys.executable, str(script), json.dumps(common)], env=e,
                              capture_output=True, text=True, timeout=600)

    assert run(tmp_path / "clean", None).returncode == 0
    killed = run(tmp_path / "killed", "store.before_ledger:6")  # 128 rows in 16 shards: killed at the 6th
    assert killed.returncode == -signal.SIGKILL
    (cache,) = [p.parent for p in (tmp_path / "killed").glob("*/zarr.json")]
    assert Cache.open(cache).status == "partial"
    assert run(tmp_path / "killed", None).returncode == 0
    (ref,) = [p.parent for p in (tmp_path / "clean").glob("*/zarr.json")]
    a, b = Cache.open(ref), Cache.open(cache)
    assert ref.name == cache.name and a.n_rows == b.n_rows == 128
    for p in a.specs:
        np.testing.assert_array_equal(a.read(p, 0, a.n_rows), b.read(p, 0, b.n_rows), err_msg=p)
    assert b.verify() == [] and b.status == "complete"


@pytest.mark.parametrize("method", sorted(SWEEP_METHODS))
def test_a_sweep_adds_m_cells_exactly_for_methods_whose_distill_reads_unlabelled_rows(method: str) -> None:
    """One rule: the sweep runs a method at M > 0 iff one of its phases trains on the unlabelled
    rows in distill (an objective that reads no labels); the others are M = 0 references."""
    from ia2cache.objectives import OBJECTIVES, SCHEDULES
    from ia2cache.sweep import uses_unlabelled

    schedule = SCHEDULES[SWEEP_METHODS[method][0]]
    rows = []
    for objective in schedule:
        run = distill_mod._Run.__new__(distill_mod._Run)  # only use_rows' choice is exercised
        run.labelled, run.everything = "labelled", "everything"
        run.use_rows(objective)
        rows.append(run.train)
    assert uses_unlabelled(method) == ("everything" in rows)
    assert uses_unlabelled(method) == any(OBJECTIVES[o].name in ("act", "tokl") for o in schedule)
