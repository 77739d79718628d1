from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ia2cache.evaluate import EvalConfig, evaluate
from ia2cache.metrics import ece_equal_mass, ece_equal_width
from ia2cache.prompts import build_eval_pairs
from ia2cache.tasks import Task, is_single_token, load_task
from tests.conftest import write_jsonl


@pytest.fixture
def task(tmp_path: Path, tiny_tok: Any) -> Task:
    words = [w for w in ["hot", "up", "big", "go", "ocean", "paper", "music", "yes", "no"]
             if len(tiny_tok(" " + w).input_ids) == 1]
    assert len(words) >= 4
    lines = [json.dumps({"input": f"{words[i % len(words)]} {i} {words[(i * 5) % len(words)]}",
                         "target": words[(i * 3) % len(words)]}) for i in range(60)]
    t = load_task(str(write_jsonl(tmp_path / "t.jsonl", lines)))
    assert is_single_token(t, tiny_tok)
    return t


def _manual(model: Any, tok: Any, task: Task, k: int, use_teacher: bool) -> tuple[np.ndarray, ...]:
    pairs = build_eval_pairs(task, tok, k=k, seed=0, n_eval=20)
    preds, conf, gold = [], [], []
    with torch.no_grad():
        for p in pairs:
            ids = list(p.teacher_ids if use_teacher else p.student_ids)
            probs = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
            preds.append(int(probs.argmax()))
            conf.append(float(probs.max()))
            gold.append(p.target_ids[0])
    return np.array(preds), np.array(conf), np.array(gold)


def test_single_token_metrics_match_a_bs1_hand_loop(task: Task, tiny_tok: Any, tiny_model: Any) -> None:
    for mode, k in (("base", 0), ("icl", 3)):
        r = evaluate(tiny_model, tiny_tok, task, EvalConfig(mode=mode, k=max(k, 1), n_eval=20, batch_size=7))
        preds, conf, gold = _manual(tiny_model, tiny_tok, task, k, mode == "icl")
        correct = preds == gold
        assert r["n_eval"] == 20
        assert r["accuracy"] == pytest.approx(correct.mean())
        assert r["confidence"] == pytest.approx(conf.mean(), rel=1e-4)
        assert r["ece_equal_mass"] == pytest.approx(ece_equal_mass(conf, correct), abs=1e-5)
        assert r["ece_equal_width"] == pytest.approx(ece_equal_width(conf, correct), abs=1e-5)


def test_agreement_with_icl(task: Task, tiny_tok: Any, tiny_model: Any) -> None:
    r = evaluate(tiny_model, tiny_tok, task, EvalConfig(mode="base", k=3, n_eval=20, agreement=True))
    base, _, _ = _manual(tiny_model, tiny_tok, task, 0, False)
    icl, _, _ = _manual(tiny_model, tiny_tok, task, 3, True)
    assert r["agreement_with_icl"] == pytest.approx((base == icl).mean())


def test_accuracy_on_a_constructed_case(tiny_tok: Any, tmp_path: Path) -> None:
    """A model that always puts all mass on one token is right exactly on rows with that target."""
    words = ["hot", "up", "go"]
    lines = [json.dumps({"input": f"x{i}", "target": words[i % 3]}) for i in range(30)]
    task = load_task(str(write_jsonl(tmp_path / "c.jsonl", lines)))
    hot = tiny_tok(" hot").input_ids[0]

    class Always(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
            logits = torch.full((*input_ids.shape, len(tiny_tok)), -1e4)
            logits[..., hot] = 0.0
            return type("Out", (), {"logits": logits})()

    r = evaluate(Always(), tiny_tok, task, EvalConfig(mode="base", n_eval=15))
    gold_hot = sum(e.target == "hot" for e in task.eval[:15]) / 15
    assert r["accuracy"] == pytest.approx(gold_hot)
    assert r["confidence"] == pytest.approx(1.0)
    assert r["ece_equal_width"] == pytest.approx(1.0 - gold_hot)
