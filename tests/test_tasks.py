from __future__ import annotations

import json
from pathlib import Path

import pytest

from ia2cache.errors import IA2Error
from ia2cache.tasks import list_builtin, load_task
from tests.conftest import write_jsonl

GOOD = [json.dumps({"id": f"e{i}", "input": f"x{i}", "target": f"y{i}"}) for i in range(10)]


def test_jsonl_loads_and_splits_deterministically(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", GOOD)
    a, b = load_task(str(p)), load_task(str(p))
    assert len(a.pool) + len(a.eval) == 10
    assert len(a.eval) == 5
    assert {e.id for e in a.pool}.isdisjoint({e.id for e in a.eval})
    assert a.pool == b.pool and a.eval == b.eval
    assert a.template == "Input: {input}\nOutput:" and a.separator == "\n\n"
    assert a.content_hash == b.content_hash
    c = load_task(str(p), eval_fraction=0.3)
    assert len(c.eval) == 3


def test_template_changes_content_hash(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", GOOD)
    assert load_task(str(p)).content_hash != load_task(str(p), template="Q: {input}\nA:").content_hash


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([], "empty task file"),
        (GOOD[:2] + ["{not json"], ":3: invalid JSON"),
        (GOOD[:1] + [json.dumps({"input": "a"})], ":2: missing required field 'target'"),
        ([json.dumps({"target": "a"})], ":1: missing required field 'input'"),
        (GOOD[:3] + [json.dumps({"id": "e1", "input": "q", "target": "r"})], ":4: duplicate id 'e1'"),
        (GOOD[:1] + [json.dumps({"input": "q", "target": "  "})], ":2: field 'target' is empty"),
        (GOOD[:1] + [json.dumps(["input", "target"])], ":2: expected a JSON object"),
        (GOOD[:1] + [json.dumps({"input": 3, "target": "r"})], ":2: field 'input' must be a string"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], needle: str) -> None:
    p = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(IA2Error) as info:
        load_task(str(p))
    assert str(p) in str(info.value)
    assert needle in str(info.value)


def test_unknown_task_and_bad_template(tmp_path: Path) -> None:
    with pytest.raises(IA2Error, match="--task nope: unknown task"):
        load_task("nope")
    with pytest.raises(IA2Error, match="--task .*missing.jsonl: no such file"):
        load_task(str(tmp_path / "missing.jsonl"))
    p = write_jsonl(tmp_path / "t.jsonl", GOOD)
    with pytest.raises(IA2Error, match="--template"):
        load_task(str(p), template="no placeholder")
    with pytest.raises(IA2Error, match="--template"):
        load_task(str(p), template="{inpt}")


@pytest.mark.parametrize("name", list_builtin())
def test_builtin_task_is_well_formed(name: str) -> None:
    t = load_task(name)
    card = t.card
    assert len(t.pool) >= 100 and len(t.eval) >= 100
    pool_inputs = [e.input for e in t.pool]
    eval_inputs = [e.input for e in t.eval]
    assert len(set(pool_inputs)) == len(pool_inputs)
    assert len(set(eval_inputs)) == len(eval_inputs)
    assert set(pool_inputs).isdisjoint(eval_inputs), "pool and eval share inputs"
    ids = [e.id for e in t.pool + t.eval]
    assert len(set(ids)) == len(ids)
    assert "{input}" in t.template
    for key in ("description", "source", "template", "separator", "single_token"):
        assert key in card, f"card of {name} lacks {key}"
    if card.get("labels"):
        assert {e.target for e in t.pool + t.eval} <= set(card["labels"])


def test_at_least_five_builtin_tasks() -> None:
    assert len(list_builtin()) >= 5


def test_builder_reproduces_the_shipped_data(tmp_path: Path) -> None:
    from ia2cache.tasks import BUILTIN_DIR
    from ia2cache.tasks.build_builtin import BUILDERS, write_task

    assert sorted(BUILDERS) == list_builtin()
    for name, build in BUILDERS.items():
        write_task(name, build(), tmp_path)
        for f in ("card.json", "pool.jsonl", "eval.jsonl"):
            assert (tmp_path / name / f).read_bytes() == (BUILTIN_DIR / name / f).read_bytes(), (name, f)


def test_public_surface_resolves() -> None:
    import ia2cache

    for name in ia2cache.__all__:
        assert getattr(ia2cache, name) is not None
    with pytest.raises(AttributeError):
        ia2cache.no_such_name  # noqa: B018
