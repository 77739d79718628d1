from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ia2cache.errors import IA2Error
from ia2cache.prompts import PromptConfig, build_eval_pairs, build_pairs
from ia2cache.tasks import Task, load_task
from tests.conftest import write_jsonl

WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy", "ocean", "paper", "The food"]


def _task(tmp_path: Path, n: int = 60) -> Task:
    lines = [
        json.dumps({"id": f"r{i}", "input": f"{WORDS[i % len(WORDS)]} {i}", "target": WORDS[(i * 7) % 11]})
        for i in range(n)
    ]
    return load_task(str(write_jsonl(tmp_path / "toy.jsonl", lines)))


def test_query_tokens_identical_and_positions_index_same_tokens(tmp_path: Path, tiny_tok: Any) -> None:
    task = _task(tmp_path)
    pairs = build_pairs(task, tiny_tok, PromptConfig(n=12, k=4, seed=3, dev=6))
    assert len(pairs.train) == 12 and len(pairs.dev) == 6
    for p in pairs.rows:
        q = p.query_len
        assert p.teacher_ids[-q:] == p.student_ids[-q:]
        assert p.teacher_ids[p.query_start :] == p.student_ids[p.prefix_len :]
        # Teacher-forced sequences: prompt + response. Aligned positions must predict the same
        # response token and sit on identical tokens.
        resp = p.target_ids
        t_seq, s_seq = p.teacher_ids + resp, p.student_ids + resp
        tp, sp = p.positions(len(resp))
        assert [t_seq[i] for i in tp] == [s_seq[i] for i in sp]
        assert [t_seq[i + 1] for i in tp] == list(resp)
        assert [s_seq[i + 1] for i in sp] == list(resp)
        tq, sq = p.positions(len(resp), "query+response")
        assert len(tq) == q + len(resp) - 1
        assert [t_seq[i] for i in tq] == [s_seq[i] for i in sq]
        assert tq[: q - 1] == list(range(p.query_start, p.query_start + q - 1))


def test_positions_hand_computed(tiny_tok: Any, tmp_path: Path) -> None:
    task = _task(tmp_path)
    p = build_pairs(task, tiny_tok, PromptConfig(n=4, k=2, seed=0)).train[0]
    lt, ls = len(p.teacher_ids), len(p.student_ids)
    assert p.positions(3) == ([lt - 1, lt, lt + 1], [ls - 1, ls, ls + 1])


def test_demos_come_from_other_train_examples(tmp_path: Path, tiny_tok: Any) -> None:
    task = _task(tmp_path)
    ps = build_pairs(task, tiny_tok, PromptConfig(n=8, seed=1))
    assert ps.k == 7  # auto: min(N-1, 8)
    train_ids = {p.example_id for p in ps.train}
    for p in ps.train:
        assert p.example_id not in p.demo_ids
        assert set(p.demo_ids) <= train_ids and len(set(p.demo_ids)) == len(p.demo_ids) == 7
    for p in ps.dev:
        assert p.example_id not in train_ids and set(p.demo_ids) <= train_ids
    other = build_pairs(task, tiny_tok, PromptConfig(n=8, seed=2))
    assert other.digest() != ps.digest()


def test_demo_text_is_template_space_target(tmp_path: Path, tiny_tok: Any) -> None:
    task = _task(tmp_path)
    p = build_pairs(task, tiny_tok, PromptConfig(n=3, k=2, seed=0)).train[0]
    demos = [next(e for e in task.pool if e.id == d) for d in p.demo_ids]
    block = "".join(f"Input: {d.input}\nOutput: {d.target}\n\n" for d in demos)
    assert tiny_tok.decode(p.teacher_ids[: p.query_start]) == block
    assert tiny_tok.decode(p.student_ids) == "Input: " + next(
        e.input for e in task.pool if e.id == p.example_id
    ) + "\nOutput:"


_CHILD = """
import sys, json
from ia2cache.testing import tiny_tokenizer
from ia2cache.tasks import load_task
from ia2cache.prompts import PromptConfig, build_pairs, build_eval_pairs, _digest
t = load_task(sys.argv[1])
tok = tiny_tokenizer()
print(json.dumps([build_pairs(t, tok, PromptConfig(n=10, k=3, seed=5)).digest(),
                  _digest(build_eval_pairs(t, tok, k=3, seed=5, n_eval=10, n=10))]))
"""


def test_deterministic_across_processes(tmp_path: Path) -> None:
    task = _task(tmp_path)
    path = next(tmp_path.glob("*.jsonl"))
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    outs = [
        subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                       check=True, env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout
        for h in (1, 2)
    ]
    assert outs[0] == outs[1]
    assert len(json.loads(outs[0])[0]) == 64
    assert task.pool  # the task the children read is the one built here


def test_bad_n_and_k(tmp_path: Path, tiny_tok: Any) -> None:
    task = _task(tmp_path, n=20)
    with pytest.raises(IA2Error, match=r"--n 50: task 'toy' has only 10 pool examples"):
        build_pairs(task, tiny_tok, PromptConfig(n=50))
    with pytest.raises(IA2Error, match="--k 5"):
        PromptConfig(n=4, k=5)
    for n in (0, 1):  # N=1: no other training row to draw demos from
        with pytest.raises(IA2Error, match=f"--n {n}: must be at least 2"):
            PromptConfig(n=n)
    with pytest.raises(IA2Error, match="--k 0: must be at least 1"):
        PromptConfig(n=4, k=0)
    for seed in (-1, 2**32, 2**64):
        with pytest.raises(IA2Error, match=f"--seed {seed}"):
            PromptConfig(n=4, seed=seed)
    with pytest.raises(IA2Error, match="--dev 0"):
        PromptConfig(n=4, dev=0)
    # The dev split: D rows (default 16), disjoint from train, as many as the pool has left.
    ps = build_pairs(task, tiny_tok, PromptConfig(n=4))
    assert len(ps.dev) == 6 and not {p.example_id for p in ps.dev} & {p.example_id for p in ps.train}


@pytest.mark.parametrize("n,seed", [(4, 0), (8, 3), (16, 1)])
def test_icl_demos_come_from_the_n_training_rows_with_the_teachers_k(tmp_path: Path, tiny_tok: Any, n: int,
                                                                     seed: int) -> None:
    """The ICL baseline is the teacher: its demos are the N training rows the data seed picks."""
    task = _task(tmp_path)
    train = build_pairs(task, tiny_tok, PromptConfig(n=n, seed=seed))
    train_ids = {p.example_id for p in train.train}
    pairs = build_eval_pairs(task, tiny_tok, k=train.k, seed=seed, n_eval=20, n=n)
    assert len(pairs) == 20
    for p in pairs:
        assert len(p.demo_ids) == train.k == min(n - 1, 8)
        assert set(p.demo_ids) <= train_ids and len(set(p.demo_ids)) == train.k
    # Seen over all rows, the demos use the training rows, not just one of them.
    assert len({d for p in pairs for d in p.demo_ids}) > min(n - 1, 8)
    with pytest.raises(IA2Error, match="--n: ICL demos come from the N training rows"):
        build_eval_pairs(task, tiny_tok, k=3, seed=seed)
    with pytest.raises(IA2Error, match=f"--k {n + 1}"):
        build_eval_pairs(task, tiny_tok, k=n + 1, seed=seed, n=n)


def test_multi_token_sft_labels_end_with_the_stop(tmp_path: Path, tiny_tok: Any) -> None:
    task = _task(tmp_path)
    p = build_pairs(task, tiny_tok, PromptConfig(n=4, seed=0)).train[0]
    stop = tuple(tiny_tok(task.stop, add_special_tokens=False).input_ids)
    assert p.label_ids(8) == p.target_ids + stop and tiny_tok.decode(p.label_ids(8)).endswith(task.stop)
    assert p.label_ids(1) == p.target_ids  # one response token: no room for the stop


def test_eval_pairs_from_the_pool_when_asked(tmp_path: Path, tiny_tok: Any) -> None:
    task = _task(tmp_path)
    pairs = build_eval_pairs(task, tiny_tok, k=4, seed=0, n_eval=7, demos="pool")
    pool_ids = {e.id for e in task.pool}
    assert len(pairs) == 7
    for p, ex in zip(pairs, task.eval, strict=False):
        assert p.example_id == ex.id and set(p.demo_ids) <= pool_ids and len(p.demo_ids) == 4
    zero = build_eval_pairs(task, tiny_tok, k=0, n_eval=3)
    assert all(p.teacher_ids == p.student_ids for p in zero)


def test_response_length_stops_at_eos_or_the_stop_string(tiny_tok: Any) -> None:
    from ia2cache.prompts import response_length

    ids = tiny_tok("hot cold\nup down", add_special_tokens=False).input_ids
    n = response_length(tiny_tok, ids, "\n")
    assert "\n" in tiny_tok.decode(ids[:n]) and "\n" not in tiny_tok.decode(ids[: n - 1])
    eos = tiny_tok.eos_token_id
    assert response_length(tiny_tok, [ids[0], eos, ids[1]], "\n") == 2
    assert response_length(tiny_tok, ids[:2], "\n") == 2  # neither: everything


def test_unlabelled_rows_draw_demos_from_the_n_labelled_rows_and_hold_no_target(tmp_path: Path,
                                                                                tiny_tok: Any) -> None:
    task = _task(tmp_path)  # 30 pool examples
    plain = build_pairs(task, tiny_tok, PromptConfig(n=4, seed=2, dev=6))
    ps = build_pairs(task, tiny_tok, PromptConfig(n=4, seed=2, dev=6, unlabelled=45))
    # Adding unlabelled rows changes no train or dev row (independent random streams).
    assert [p.teacher_ids for p in ps.train] == [p.teacher_ids for p in plain.train]
    assert [p.teacher_ids for p in ps.dev] == [p.teacher_ids for p in plain.dev]
    train_ids = {p.example_id for p in ps.train}
    held = train_ids | {p.example_id for p in ps.dev} | {e.id for e in task.eval}
    assert len(ps.unlabelled) == 45 and ps.distinct_unlabelled == 20  # 30 - 4 - 6 queries, repeated
    for p in ps.unlabelled:
        assert p.split == "unlabelled" and set(p.demo_ids) <= train_ids and len(p.demo_ids) == ps.k
        assert p.example_id not in held  # queries never come from train, dev or eval
        assert p.target_ids == () and p.target == "" and p.label_ids(8) == ()
    # Rows: train, then unlabelled, then dev (the activation phases read one range).
    assert [p.split for p in ps.rows] == ["train"] * 4 + ["unlabelled"] * 45 + ["dev"] * 6
    assert [p.row for p in ps.rows] == list(range(55))
    # A repeated query gets other demos.
    first, again = ps.unlabelled[0], ps.unlabelled[20]
    assert first.example_id == again.example_id and first.demo_ids != again.demo_ids


def test_an_unlabelled_file_with_a_target_is_refused(tmp_path: Path) -> None:
    from ia2cache.tasks import load_unlabelled

    ok = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"input": f"word {i}"}) for i in range(3)])
    queries, digest = load_unlabelled(ok)
    assert [q.input for q in queries] == ["word 0", "word 1", "word 2"]
    assert all(q.target == "" for q in queries)
    assert len(digest) == 16
    lines = [json.dumps({"input": "x"}), json.dumps({"input": "y", "target": "z"})]
    bad = write_jsonl(tmp_path / "b.jsonl", lines)
    with pytest.raises(IA2Error, match=r"b\.jsonl:2: has a 'target' field"):
        load_unlabelled(bad)
