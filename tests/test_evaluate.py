from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ia2cache.errors import IA2Error
from ia2cache.evaluate import (
    EvalConfig,
    _score_generate,
    agreement_rate,
    answer_confidence,
    answer_ends,
    effective_max_new,
    evaluate,
    generation_scores,
    load_adapter,
    read_run_record,
)
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
    pairs = build_eval_pairs(task, tok, k=k, seed=0, n_eval=20, n=8)
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
        r = evaluate(tiny_model, tiny_tok, task,
                     EvalConfig(mode=mode, k=max(k, 1), n=8, n_eval=20, batch_size=7))
        preds, conf, gold = _manual(tiny_model, tiny_tok, task, k, mode == "icl")
        correct = preds == gold
        assert r["n_eval"] == 20
        assert r["accuracy"] == pytest.approx(correct.mean())
        assert r["confidence"] == pytest.approx(conf.mean(), rel=1e-4)
        assert r["ece_equal_mass"] == pytest.approx(ece_equal_mass(conf, correct), abs=1e-5)
        assert r["ece_equal_width"] == pytest.approx(ece_equal_width(conf, correct), abs=1e-5)


def test_agreement_with_icl(task: Task, tiny_tok: Any, tiny_model: Any) -> None:
    r = evaluate(tiny_model, tiny_tok, task, EvalConfig(mode="base", k=3, n=8, n_eval=20, agreement=True))
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


# ----------------------------------------------------------------------------- review fixes


def _multi_task(tmp_path: Path, card: dict[str, Any], name: str = "m.jsonl") -> Task:
    """A multi-token task (targets of 2-3 words) with ``card`` merged into its card."""
    words = ["hot", "up", "big", "go", "ocean", "paper", "music"]
    lines = [json.dumps({"input": f"{words[i % 7]} {i}", "target": f"{words[(i * 3) % 7]} {words[i % 5]} x"})
             for i in range(40)]
    t = load_task(str(write_jsonl(tmp_path / name, lines)))
    return dataclasses.replace(t, card={**t.card, **card})


def test_context_check_uses_the_generated_length(tiny_tok: Any, tiny_model: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A card's max_new_tokens (hf:gsm8k: 256) is what generation uses, so the context check must
    count it too: a prompt that fits with 1 new token but not with 256 is refused up front."""
    task = _multi_task(tmp_path, {"max_new_tokens": 256})
    assert not is_single_token(task, tiny_tok)
    pairs = build_eval_pairs(task, tiny_tok, k=0, seed=0, n_eval=6)
    longest = max(len(p.student_ids) for p in pairs)
    assert effective_max_new(task, pairs) == 256
    assert effective_max_new(task, pairs, 5) == 5
    plain = _multi_task(tmp_path, {}, "plain.jsonl")
    assert effective_max_new(plain, pairs) == max(len(p.target_ids) for p in pairs) + 4
    monkeypatch.setattr(tiny_model.config, "max_position_embeddings", longest + 10)
    with pytest.raises(IA2Error, match=r"\+ 256 new token\(s\) exceeds the model's context"):
        evaluate(tiny_model, tiny_tok, task, EvalConfig(mode="base", n_eval=6))
    # --max-new-tokens 4 fits: the same check lets it through and generation runs.
    r = evaluate(tiny_model, tiny_tok, task, EvalConfig(mode="base", n_eval=6, max_new_tokens=4))
    assert r["n_eval"] == 6


def test_agreement_rate_never_counts_unparsable_answers() -> None:
    res = {"answers": np.array([None, "1", "2", None], dtype=object)}
    teacher = {"answers": np.array([None, "1", "3", "4"], dtype=object)}
    assert agreement_rate(res, teacher) == pytest.approx(0.25)  # only row 1
    assert agreement_rate({"pred": np.array([3, 4])}, {"pred": np.array([3, 5])}) == pytest.approx(0.5)


def test_agreement_with_a_parser_excludes_rows_both_fail_to_parse(tiny_tok: Any, tiny_model: Any,
                                                                  tmp_path: Path) -> None:
    """The tiny random model never writes '#### n': its answers and the teacher's are all None,
    which must not count as agreeing."""
    lines = [json.dumps({"input": f"what is {i} plus one", "target": f"#### {i + 1}"}) for i in range(30)]
    task = load_task(str(write_jsonl(tmp_path / "h.jsonl", lines)))
    task = dataclasses.replace(task, card={**task.card, "parser": "hash"})
    cfg = EvalConfig(mode="base", k=2, n=4, n_eval=8, agreement=True, max_new_tokens=3, batch_size=4)
    r = evaluate(tiny_model, tiny_tok, task, cfg)
    dev = next(tiny_model.parameters()).device
    base_pairs = build_eval_pairs(task, tiny_tok, k=0, seed=0, n_eval=8)
    icl_pairs = build_eval_pairs(task, tiny_tok, k=2, seed=0, n_eval=8, n=4)
    mine = _score_generate(tiny_model, tiny_tok, task, base_pairs, "base", 4, dev, 3)["answers"]
    theirs = _score_generate(tiny_model, tiny_tok, task, icl_pairs, "icl", 4, dev, 3)["answers"]
    both_none = sum(a is None and b is None for a, b in zip(mine, theirs, strict=True))
    assert both_none > 0  # the case under test occurs
    want = np.mean([a is not None and a == b for a, b in zip(mine, theirs, strict=True)])
    assert r["agreement_with_icl"] == pytest.approx(want)
    assert r["agreement_with_icl"] <= 1 - both_none / 8


def test_a_torn_run_json_is_an_ia2error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "run.json").write_text('{"model_spec": ')
    with pytest.raises(IA2Error, match=r"run\.json: not a readable JSON file"):
        load_adapter(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(IA2Error, match="expected a JSON object"):
        read_run_record(tmp_path)
    (tmp_path / "run.json").unlink()
    assert read_run_record(tmp_path) == {}
    with pytest.raises(IA2Error, match="no run.json"):
        read_run_record(tmp_path, required=True)


def test_eval_adapter_with_model_reports_that_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--model X with --adapter: X (same weights, another path) is what was loaded and reported."""
    from peft import LoraConfig, TaskType, get_peft_model
    from typer.testing import CliRunner

    from cli.main import app
    from ia2cache.models import load_model

    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, copy)
    lm = load_model(str(tiny_model_dir), device="cpu")
    adapter = tmp_path / "adapter"
    get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"], task_type=TaskType.CAUSAL_LM)
                   ).save_pretrained(adapter)
    (adapter / "run.json").write_text(json.dumps({
        "model_spec": str(tiny_model_dir),
        "cache_manifest": {"model": {"name": "tiny", "fingerprint": lm.info.fingerprint}}}))
    task = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"input": f"x{i}", "target": "hot"})
                                              for i in range(20)])
    runner = CliRunner()
    argv = ["eval", "--task", str(task), "--adapter", str(adapter), "--n-eval", "4", "--json"]
    r = runner.invoke(app, argv)
    assert r.exit_code == 0, r.output
    # The model's resolved name and fingerprint, and the spec it was loaded from.
    got = json.loads(r.stdout)["model"]
    want = ("tiny", str(tiny_model_dir), lm.info.fingerprint)
    assert (got["name"], got["spec"], got["fingerprint"]) == want
    r = runner.invoke(app, [*argv, "--model", str(copy)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == {"name": "tiny", "spec": str(copy), "adapter": str(adapter),
                                             "fingerprint": lm.info.fingerprint}


def test_eval_model_help_is_one_clear_sentence() -> None:
    import typer.main

    from cli.main import app

    cmd = typer.main.get_command(app).commands["eval"]  # type: ignore[attr-defined]
    text = next(p.help for p in cmd.params if p.name == "model")
    assert "default and required" not in text and "(when not given)" not in text
    assert "With --adapter: default the adapter's own base model" in text


class _Vocab:
    """A tokenizer of single-token texts: what answer_ends reads (special tokens decode to "")."""

    def __init__(self, texts: list[str], eos: int | None) -> None:
        self.texts, self.eos_token_id = texts, eos

    def __len__(self) -> int:
        return len(self.texts)

    def batch_decode(self, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        self.decoded = getattr(self, "decoded", 0) + len(seqs)
        return ["".join(self.texts[i] for i in s) for s in seqs]


#            0    1     2       3      4      5    6 (EOS)
_TEXTS = ["a", "\n", "\n\n", " \n", ".\n", "b", ""]


def test_answer_ends_are_eos_and_the_stop_after_whitespace_only() -> None:
    ends = answer_ends(_Vocab(_TEXTS, eos=6), "\n", vocab=9)  # the model's vocab may exceed the tokenizer's
    assert ends.tolist() == [False, True, True, True, False, False, True, False, False]
    assert answer_ends(_Vocab(_TEXTS, eos=6), "", vocab=7).tolist() == [False] * 6 + [True]
    assert answer_ends(_Vocab(_TEXTS, eos=None), "\n\n", vocab=7).tolist() == [
        False, False, True, False, False, False, False]


def test_answer_ends_decodes_a_vocabulary_once_per_tokenizer_stop_and_size() -> None:
    vocab = _Vocab(_TEXTS, eos=6)
    first = answer_ends(vocab, "\n", vocab=9)
    assert answer_ends(vocab, "\n", vocab=9) is first and vocab.decoded == 7
    assert answer_ends(vocab, "\n\n", vocab=9) is not first and vocab.decoded == 14
    other = _Vocab(["\n", "a"], eos=None)  # another tokenizer is never served the first one's mask
    assert answer_ends(other, "\n", vocab=9).tolist()[:2] == [True, False]


def _steps(rows: list[dict[int, float]], vocab: int = 7) -> torch.Tensor:
    """Log-probabilities of generation steps from {token: probability} (the rest spread evenly)."""
    out = torch.empty(len(rows), vocab)
    for i, r in enumerate(rows):
        rest = (1 - sum(r.values())) / (vocab - len(r))
        out[i] = torch.tensor([r.get(t, rest) for t in range(vocab)]).log()
    return out


def _conf(lp: torch.Tensor, ids: list[int], n_resp: int, ends: torch.Tensor) -> float:
    """answer_confidence of one generated row, through generation_scores as _score_generate does."""
    chosen, end_mass = generation_scores(lp[None], torch.tensor([ids]), ends)
    return answer_confidence(chosen[0], end_mass[0], ids, n_resp, ends)


def test_answer_confidence_counts_every_way_of_ending_the_same_answer() -> None:
    """P(answer) x P(it ends there): 0.5 x (0.3 + 0.2 + 0.05 + 0.1), whichever terminator the
    greedy pass happened to take; a stop fused with text, or no end, is the tokens' product."""
    ends = answer_ends(_Vocab(_TEXTS, eos=6), "\n", vocab=7)
    lp = _steps([{0: 0.5, 5: 0.3}, {1: 0.3, 2: 0.2, 3: 0.05, 6: 0.1, 0: 0.3}, {1: 0.9}])
    want = 0.5 * (0.3 + 0.2 + 0.05 + 0.1)
    for last in (1, 2, 3, 6):  # "\n", "\n\n", " \n", EOS
        assert _conf(lp, [0, last, 1], 2, ends) == pytest.approx(want, rel=1e-5)
    assert _conf(lp, [0, 4, 1], 2, ends) == pytest.approx(0.5 * lp[1, 4].exp().item(), rel=1e-5)
    assert _conf(lp, [0, 0, 5], 3, ends) == pytest.approx(
        0.5 * 0.3 * lp[2, 5].exp().item(), rel=1e-5)  # cut at the token limit
    # A "\n\n" stop written as two "\n" tokens: no single token ends the answer, so the product.
    ends2 = answer_ends(_Vocab(_TEXTS, eos=6), "\n\n", vocab=7)
    assert _conf(lp, [0, 1, 1], 3, ends2) == pytest.approx(
        0.5 * 0.3 * lp[2, 1].exp().item(), rel=1e-5)
    # An answer that is only its end (an empty answer) is as sure as the end is.
    assert _conf(lp, [6, 1, 1], 1, ends) == pytest.approx(
        lp[0, ends].exp().sum().item(), rel=1e-5)


def _two_token_row(tiny_tok: Any, tiny_model: Any, task: Task) -> tuple[Any, ...]:
    """An eval row whose greedy output starts with two different tokens t1, t2 (t2's text not in
    t1's, not whitespace, neither EOS): (pair, p1, t1, p2, t2), p1 and p2 the next-token
    distributions of the two steps, by hand."""
    with torch.no_grad():
        for pair in build_eval_pairs(task, tiny_tok, k=0, seed=0, n_eval=20):
            prompt = list(pair.student_ids)
            p1 = tiny_model(input_ids=torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
            t1 = int(p1.argmax())
            p2 = tiny_model(input_ids=torch.tensor([prompt + [t1]])).logits[0, -1].float().softmax(-1)
            t2 = int(p2.argmax())
            stop = tiny_tok.decode([t2])
            if (stop.strip() and stop not in tiny_tok.decode([t1])
                    and tiny_tok.eos_token_id not in (t1, t2)):
                return pair, p1, t1, p2, t2
    raise AssertionError("no eval row of the tiny model has the case under test")


def test_generated_confidence_is_the_answer_then_any_end(tiny_tok: Any, tiny_model: Any,
                                                         tmp_path: Path) -> None:
    """Through _score_generate: on an eval row whose greedy output starts with two different
    tokens, with the stop set to the second one's text, the answer is the first token and its
    confidence is P(first token) x the mass of every token that ends it, by hand."""
    task = _multi_task(tmp_path, {})
    pair, p1, t1, p2, t2 = _two_token_row(tiny_tok, tiny_model, task)
    stop = tiny_tok.decode([t2])
    task = dataclasses.replace(task, stop=stop)
    ends = answer_ends(tiny_tok, stop, p2.shape[-1])
    assert ends[t2] and not ends[t1]
    dev = next(tiny_model.parameters()).device
    got = _score_generate(tiny_model, tiny_tok, task, [pair], "base", 1, dev, 4)
    assert got["answers"][0] == tiny_tok.decode([t1]).strip()
    assert got["confidence"][0] == pytest.approx(float(p1[t1] * p2[ends].sum()), rel=1e-4)
    # In a batch with other rows (generated side by side, left-padded), the same number.
    rows = build_eval_pairs(task, tiny_tok, k=0, seed=0, n_eval=3)
    both = _score_generate(tiny_model, tiny_tok, task, [pair, *rows[:2]], "base", 3, dev, 4)
    assert both["confidence"][0] == pytest.approx(got["confidence"][0], rel=1e-4)
    # EOS always ends an answer, so the mass counted exceeds the greedy end token's alone.
    assert got["confidence"][0] > float(p1[t1] * p2[t2])


def test_an_eos_of_the_generation_config_ends_the_answer_too(tiny_tok: Any, tiny_model: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose generation config stops on another id than the tokenizer's EOS (several EOS
    ids): generation stops there, the answer is cut there and that id counts as an end."""
    task = _multi_task(tmp_path, {})
    pair, p1, t1, p2, t2 = _two_token_row(tiny_tok, tiny_model, task)
    monkeypatch.setattr(tiny_model.generation_config, "eos_token_id", [tiny_tok.eos_token_id, t2])
    task = dataclasses.replace(task, stop="\x00")  # a stop the model never writes
    dev = next(tiny_model.parameters()).device
    got = _score_generate(tiny_model, tiny_tok, task, [pair], "base", 1, dev, 4)
    assert got["answers"][0] == tiny_tok.decode([t1]).strip()
    ends = answer_ends(tiny_tok, "\x00", p2.shape[-1], [tiny_tok.eos_token_id, t2])
    assert ends[t2] and ends[tiny_tok.eos_token_id]
    assert got["confidence"][0] == pytest.approx(float(p1[t1] * p2[ends].sum()), rel=1e-4)
