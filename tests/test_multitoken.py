"""Multi-token tasks: the parser-scored generation path, the built-in arith_word task, OOD
evaluation, and collect -> distill a2t -> eval end to end on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ia2cache.answers import parse_hash
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.evaluate import EvalConfig, evaluate, load_adapter, ood_task
from ia2cache.models import load_model
from ia2cache.store import Cache
from ia2cache.tasks import Example, Task, load_task
from tests.conftest import write_task


class Scripted(torch.nn.Module):
    """Generates the same text for every row; records the generation budget it was given."""

    def __init__(self, tok: Any, text: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids = tok(text, add_special_tokens=False).input_ids
        self.vocab = len(tok)
        self.budgets: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_: Any) -> Any:
        self.budgets.append(max_new_tokens)
        new = torch.tensor(self.ids[:max_new_tokens]).repeat(input_ids.shape[0], 1)
        scores = [torch.nn.functional.one_hot(new[:, i], self.vocab).float() * 10
                  for i in range(new.shape[1])]
        return type("Gen", (), {"sequences": torch.cat([input_ids, new], 1), "scores": scores})()


def _task(card: dict[str, Any]) -> Task:
    targets = ["1 + 1 = 2. #### 2", "3 - 1 = 2. #### 2", "2 + 2 = 4. #### 4", "5 - 3 = 2. #### 2,0"]
    rows = tuple(Example(id=f"e{i}", input=f"q {i}", target=t) for i, t in enumerate(targets))
    return Task(name="t", pool=rows, eval=rows, template="Q: {input}\nA:", separator="\n\n", stop="\n",
                source="test", card=card)


def test_generation_applies_the_tasks_parser(tiny_tok: Any) -> None:
    model = Scripted(tiny_tok, " 2 + 0 = 2. #### 2\nQ: more")
    parsed = evaluate(model, tiny_tok, _task({"parser": "hash", "max_new_tokens": 30}),
                      EvalConfig(mode="base", n_eval=4))
    # "#### 2" matches the two golds whose answer is 2 ("2,0" is not a thousands number: wrong)
    assert parsed["accuracy"] == pytest.approx(2 / 4) and parsed["parser"] == "hash"
    assert model.budgets == [30]  # the card's T, not the longest target + 4
    exact = evaluate(model, tiny_tok, _task({}), EvalConfig(mode="base", n_eval=4))
    assert exact["accuracy"] == 0.0 and exact["parser"] is None  # raw text never matches here
    evaluate(model, tiny_tok, _task({"parser": "hash"}), EvalConfig(mode="base", n_eval=4, max_new_tokens=9))
    assert model.budgets[-1] == 9


def test_builtin_arith_word_task() -> None:
    t = load_task("arith_word")
    assert t.card["parser"] == "hash" and t.card["max_new_tokens"] == 24 and t.stop == "\n"
    assert len(t.pool) >= 100 and len(t.eval) >= 100
    for e in t.pool + t.eval:
        lhs, rhs = e.target.split(" = ")
        a, op, b = lhs.split()
        assert parse_hash(e.target) == str(int(a) + int(b) if op == "+" else int(a) - int(b))


def test_ood_task_takes_queries_from_one_task_and_demos_from_the_other(tmp_path: Path, tiny_tok: Any,
                                                                       tiny_model: Any) -> None:
    a = load_task(str(write_task(tmp_path / "a.jsonl", [(f"a{i}", "hot") for i in range(20)])))
    b = load_task(str(write_task(tmp_path / "b.jsonl", [(f"b{i}", "up") for i in range(20)])))
    t = ood_task(a, b)
    assert t.pool == a.pool and t.eval == b.eval and t.name == "b" and t.card["train_task"] == "a"
    assert ood_task(a, a) is a
    r = evaluate(tiny_model, tiny_tok, t, EvalConfig(mode="icl", k=2, n=4, n_eval=4))
    assert r["icl_demos"] == "train" and r["n"] == 4
    assert r["task"] == "b" and r["train_task"] == "a"


def test_sweep_with_an_eval_task_records_both(tmp_path: Path, tiny_model_dir: Path) -> None:
    from ia2cache.report import report
    from ia2cache.sweep import SweepConfig, read_results, sweep

    a = write_task(tmp_path / "ta.jsonl", [(f"word {i}", ("hot", "up")[i % 2]) for i in range(24)])
    b = write_task(tmp_path / "tb.jsonl", [(f"other {i}", ("hot", "up")[i % 2]) for i in range(24)])
    out = tmp_path / "sweep"
    cfg = SweepConfig(task=str(a), eval_task=str(b), out=str(out), ns=(2,), seeds=(0,), methods=("tok",),
                      lrs=(1e-3,), max_steps=2, eval_every=1, dev="2", n_eval=4, model=str(tiny_model_dir),
                      store=str(tmp_path / "store"))
    res = sweep(cfg)
    assert res["cells_done"] == 3
    rows = read_results(out)
    assert {(r["task"], r["eval_task"]) for r in rows} == {("ta", "tb")}
    assert sweep(cfg)["cells_skipped"] == 3  # finished cells are found again by (task, eval_task, ...)
    md = report(out)["markdown"]
    assert "ta->tb" in md


def test_collect_distill_eval_multitoken_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = str(tmp_path / "store")
    res = collect(CollectConfig(model=str(tiny_model_dir), task="arith_word", n=4, seed=0, store=store,
                                max_new_tokens=6, shard_rows=2, chunk_rows=1))
    cache = Cache.open(res.cache)
    assert res.status == "complete" and res.rows == 4 + 16 and cache.verify() == []  # N + D dev rows
    assert cache.manifest["max_new_tokens"] == 6
    assert cache.read("acts/attn", 0, 6, layers=[0]).shape[:3] == (6, 1, 6)
    # SFT labels end with the stop string, as the teacher's responses do: SFT learns to stop.
    tok = load_model(str(tiny_model_dir), device="cpu").tokenizer
    ids, lens = cache.read("tokens/target_ids", 0, 4), cache.read("tokens/target_len", 0, 4)
    assert all(tok.decode(ids[r, : lens[r]].tolist()).endswith("\n") for r in range(4))
    assert cache.manifest["sft_labels"] == "target+stop"
    # without --max-new-tokens the task card's T (24) is used
    auto = CollectConfig(model=str(tiny_model_dir), task="arith_word", n=2, seed=0, store=store)
    assert Cache.open(collect(auto).cache).manifest["max_new_tokens"] == 24
    out = tmp_path / "run"
    d = distill(DistillConfig(cache=res.cache, method="a2t", lr=1e-3, epochs=1, out=str(out)))
    assert d.epochs_run == [1, 1] and d.steps_run == [1, 1]
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["method"] == "a2t" and record["cache_manifest"]["max_new_tokens"] == 6
    model, tok, _ = load_adapter(out)
    r = evaluate(model, tok, load_task("arith_word"), EvalConfig(mode="adapter", n_eval=4, max_new_tokens=8))
    assert r["n_eval"] == 4 and r["parser"] == "hash" and r["single_token"] is False
    assert 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0


def test_cli_eval_task_reports_both(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    a = write_task(tmp_path / "ca.jsonl", [(f"a{i}", "hot") for i in range(20)])
    b = write_task(tmp_path / "cb.jsonl", [(f"b{i}", "up") for i in range(20)])
    r = CliRunner().invoke(app, ["eval", "--task", str(a), "--eval-task", str(b), "--icl", "--k", "2",
                                 "--n", "4", "--n-eval", "4", "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert (obj["train_task"], obj["task"], obj["n_eval"]) == ("ca", "cb", 4)
