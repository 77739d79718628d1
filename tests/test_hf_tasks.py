"""The paper's 12 benchmarks (ia2cache/tasks/hf.py) on small local fixtures in each hub
dataset's own schema, read through ``datasets`` exactly as a hub copy would be."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ia2cache.answers import get_parser
from ia2cache.errors import IA2Error
from ia2cache.tasks import load_task
from ia2cache.tasks.hf import DATA_ENV, OOD_PAIRS, REMAP_WORDS, SPECS, load_hf

Rows = list[dict[str, Any]]


def _sst2(n: int) -> Rows:
    return [{"idx": i, "sentence": f"review number {i} was {'great' if i % 2 else 'dull'} ", "label": i % 2}
            for i in range(n)]


def _fins(n: int) -> Rows:
    return [{"sentence": f"Company {i} reported results {('down', 'flat', 'up')[i % 3]}.", "label": i % 3}
            for i in range(n)]


def _poems(n: int) -> Rows:
    return [{"id": i, "verse_text": f"verse {i} of the sea", "label": i % 4} for i in range(n)]


def _agn(n: int) -> Rows:
    return [{"text": f"headline {i} about topic {i % 4}", "label": i % 4} for i in range(n)]


def _bbcn(n: int) -> Rows:
    names = ["tech", "business", "sport", "entertainment", "politics"]
    return [{"text": f"story {i} " + "word " * (60 if i % 2 else 3), "label": i % 5,
             "label_text": names[i % 5]} for i in range(n)]


def _sciq(n: int) -> Rows:
    return [{"question": f"What is thing {i}?", "distractor3": f"wrong c{i}", "distractor1": f"wrong a{i}",
             "distractor2": f"wrong b{i}", "correct_answer": f"right {i}",
             "support": "" if i % 5 == 0 else f"Thing {i} is right {i}, as the passage says."}
            for i in range(n)]


def _qasc(n: int) -> Rows:
    letters = list("ABCDEFGH")
    return [{"id": f"q{i}", "question": f"What does {i} need?",
             "choices": {"text": [f"opt{j}-{i}" for j in range(8)], "label": letters},
             "answerKey": letters[i % 8], "fact1": "f1", "fact2": "f2", "combinedfact": "cf",
             "formatted_question": "fq"} for i in range(n)]


def _stf(n: int) -> Rows:
    return [{"qid": f"s{i}", "term": "t", "description": "d", "question": f"Is claim {i} true?",
             "answer": bool(i % 2), "facts": ["a"], "decomposition": ["b"]} for i in range(n)]


def _gsm8k(n: int) -> Rows:
    return [{"question": f"Ann has {i} apples and buys {i + 1000} more. How many?",
             "answer": f"She has {i} + {i + 1000} = <<{i}+{i + 1000}={2 * i + 1000}>>{2 * i + 1000}.\n"
                       f"#### {2 * i + 1000:,}"} for i in range(n)]


def _gsm8ks(n: int) -> Rows:
    return [{"id": i, "instance": 0, "question": f"Bo has {i} pens and gets 2. How many?",
             "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}", "original_id": i,
             "original_question": "q", "original_answer": "a", "canary": "c"} for i in range(n)]


def _hmatha(n: int) -> Rows:
    return [{"problem": f"Solve $x + {i} = {2 * i}$.", "level": "Level 1", "type": "Algebra",
             "solution": f"Subtract {i}: $x = \\boxed{{{i}}}$."} for i in range(n)]


# name -> (split -> rows maker, (rows per split))
FIXTURES: dict[str, tuple[Callable[[int], Rows], dict[str, int]]] = {
    "sst2": (_sst2, {"train": 40, "validation": 20}),
    "fins": (_fins, {"train": 60}),
    "poems": (_poems, {"train": 40, "validation": 24}),
    "agn": (_agn, {"train": 40, "test": 20}),
    "bbcn": (_bbcn, {"train": 40, "test": 20}),
    "sciqr": (_sciq, {"train": 30, "validation": 12}),
    "qascr": (_qasc, {"train": 30, "validation": 12}),
    "stf": (_stf, {"test": 50}),
    "gsm8k": (_gsm8k, {"train": 30, "test": 12}),
    "gsm8ks": (_gsm8ks, {"test": 40}),
    "hmatha": (_hmatha, {"train": 30, "test": 12}),
    "sciq": (_sciq, {"train": 30, "validation": 12}),
}


def write_fixture(folder: Path, name: str, fmt: str = "jsonl") -> Path:
    make, splits = FIXTURES[name]
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        rows = make(n)
        if fmt == "parquet":
            import datasets

            datasets.Dataset.from_list(rows).to_parquet(str(d / f"{split}.parquet"))
        else:
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _usable(name: str, rows: Rows) -> int:
    if name == "fins":
        return sum(r["label"] in (0, 2) for r in rows)
    if name == "poems":
        return sum(r["label"] in (0, 1) for r in rows)
    return len(rows)


def test_registry_has_the_papers_twelve_and_ood_pairs() -> None:
    assert sorted(s.paper_name for s in SPECS.values()) == sorted(["SST2", "FinS", "PoemS", "AGN", "BBCN",
                                                                   "SciQr", "QASCr", "STF", "GSM8K",
                                                                   "GSM8Ks", "HMathA", "SciQ"])
    assert OOD_PAIRS == {"hf:sst2": ("hf:fins", "hf:poems"), "hf:agn": ("hf:bbcn",),
                         "hf:sciqr": ("hf:qascr",), "hf:gsm8k": ("hf:gsm8ks",)}
    assert set(FIXTURES) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_source_reads_its_schema(tmp_path: Path, name: str) -> None:
    hs = SPECS[name]
    d = write_fixture(tmp_path, name, fmt="parquet" if name in ("qascr", "gsm8k") else "jsonl")
    t = load_task(f"hf:{name}@{d}")
    make, splits = FIXTURES[name]
    # split sizes
    if hs.eval_split is None:
        usable = _usable(name, make(splits[hs.pool_split]))
        assert len(t.eval) == min(500, usable // 2) and len(t.pool) == usable - len(t.eval)
    else:
        assert len(t.pool) == _usable(name, make(splits[hs.pool_split]))
        assert len(t.eval) == _usable(name, make(splits[hs.eval_split]))
    ids = [e.id for e in t.pool + t.eval]
    assert len(set(ids)) == len(ids)
    # template: the paper's prompt shapes
    assert t.template in ("Text: {input}\nLabel:", "Question: {input}\nAnswer:")
    assert t.render(t.eval[0]).endswith(("\nLabel:", "\nAnswer:"))
    assert t.card["source"].startswith(hs.dataset) and t.card["name"] == f"hf:{name}"
    # labels and parsers
    if hs.labels:
        assert {e.target for e in t.pool + t.eval} <= set(hs.labels)
        assert len({e.target for e in t.pool}) >= 2
    if hs.parser:
        parse = get_parser(hs.parser)
        assert all(parse(e.target) is not None for e in t.pool + t.eval)
        assert t.card["max_new_tokens"] >= 128 and t.stop != "\n"
    # the same files give the same task (seeded shuffles)
    assert load_task(f"hf:{name}@{d}").content_hash == t.content_hash


def test_label_mappings(tmp_path: Path) -> None:
    sst = load_hf(f"hf:sst2@{write_fixture(tmp_path, 'sst2')}")
    for e in sst.pool:
        assert e.target == ("positive" if "great" in e.input else "negative")
    fins = load_hf(f"hf:fins@{write_fixture(tmp_path, 'fins')}")
    assert not any("flat" in e.input for e in fins.pool + fins.eval)  # neutral dropped
    for e in fins.pool + fins.eval:
        assert e.target == ("positive" if e.input.endswith("up.") else "negative")
    bbc = load_hf(f"hf:bbcn@{write_fixture(tmp_path, 'bbcn')}")
    want = {"tech": "Technology", "business": "Business", "sport": "Sports", "entertainment": "World",
            "politics": "World"}
    rows = {f"story {i}": r for i, r in enumerate(_bbcn(40))}
    for e in bbc.pool:
        r = rows[" ".join(e.input.split()[:2])]
        assert e.target == want[r["label_text"]]
        assert len(e.input) <= 256
    sciq = load_hf(f"hf:sciqr@{write_fixture(tmp_path, 'sciqr')}")
    for e in sciq.pool + sciq.eval:
        lines = e.input.split("\n")
        assert lines[1] == "Choices:" and len(lines) == 6
        chosen = next(line for line in lines[2:] if line.startswith(f"[{e.target}] "))
        assert chosen.split("] ", 1)[1].startswith("right ")
        assert [line.split("]")[0][1:] for line in lines[2:]] == list(REMAP_WORDS[:4])
    # the correct option does not always sit in the same place
    assert len({e.target for e in sciq.pool}) > 1
    qasc = load_hf(f"hf:qascr@{write_fixture(tmp_path, 'qascr')}")
    for e in qasc.pool:
        i = int(e.input.split("What does ")[1].split(" ")[0])
        assert e.target == REMAP_WORDS[i % 8]
    assert REMAP_WORDS[:4] == tuple(sciq.card["labels"])  # OOD: SciQr's words are QASCr's first four


def test_sciq_passage_target_and_gsm8k_numbers(tmp_path: Path) -> None:
    t = load_hf(f"hf:sciq@{write_fixture(tmp_path, 'sciq')}")
    parse = get_parser("hash")
    for e in t.pool:
        assert e.target.endswith("#### " + parse(e.target))
        assert e.target.startswith("Thing ") or e.target.startswith("####")
    g = load_hf(f"hf:gsm8k@{write_fixture(tmp_path, 'gsm8k')}")
    for e in g.pool:
        i = int(e.input.split()[2])
        assert parse(e.target) == str(2 * i + 1000)  # "#### 1,024" -> "1024"


def test_pool_and_eval_caps(tmp_path: Path) -> None:
    d = write_fixture(tmp_path, "agn")
    t = load_hf(f"hf:agn@{d}", pool_max=7, eval_max=5)
    assert (len(t.pool), len(t.eval)) == (7, 5)
    single = write_fixture(tmp_path, "stf")
    t = load_hf(f"hf:stf@{single}", pool_max=10, eval_max=8)
    assert (len(t.pool), len(t.eval)) == (10, 8)
    assert not {e.input for e in t.pool} & {e.input for e in t.eval}


def test_env_folder_and_single_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fixture(tmp_path, "sst2")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    t = load_task("hf:sst2")
    assert t.card["data_from"] == str(tmp_path / "sst2") and len(t.eval) == 20
    one = load_task(f"hf:sst2@{tmp_path / 'sst2' / 'train.jsonl'}")
    assert len(one.pool) + len(one.eval) == 40 and len(one.eval) == 20


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IA2Error, match="unknown HF task 'nope'"):
        load_task("hf:nope")
    with pytest.raises(IA2Error, match="does not exist"):
        load_task(f"hf:sst2@{tmp_path / 'missing'}")
    d = tmp_path / "sst2"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"text": "x", "label": 1}) + "\n")
    with pytest.raises(IA2Error, match="lacks column.*sentence"):
        load_task(f"hf:sst2@{d}")
    with pytest.raises(IA2Error, match="no validation split"):
        (d / "train.jsonl").write_text(json.dumps({"sentence": "x", "label": 1}) + "\n")
        load_task(f"hf:sst2@{d}")


def test_missing_dataset_offline_names_it_and_exits_2(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from typer.testing import CliRunner

    from cli.main import app

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'stanfordnlp/sst2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(IA2Error, match=r"stanfordnlp/sst2.*IA2CACHE_HF_DATA/sst2/.*hf:sst2@DIR"):
        load_task("hf:sst2")
    r = CliRunner().invoke(app, ["eval", "--task", "hf:sst2", "--base", "--model", str(tmp_path)])
    assert r.exit_code == 2
    assert "stanfordnlp/sst2" in r.output


def test_tasks_command_lists_the_hf_registry() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["tasks", "--json"])
    assert r.exit_code == 0, r.output
    rows = {t["name"]: t for t in json.loads(r.stdout)["hf_tasks"]}
    assert set(rows) == {f"hf:{n}" for n in SPECS}
    assert rows["hf:sst2"]["ood_eval"] == ["hf:fins", "hf:poems"]
    assert rows["hf:gsm8k"]["parser"] == "hash" and rows["hf:hmatha"]["parser"] == "boxed"


def test_without_datasets_hf_tasks_say_how_to_install_it_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A core install (no `datasets`, an optional extra): hf:NAME is an IA2Error naming the extra,
    not a ModuleNotFoundError traceback; `ia2cache tasks` still lists the registry."""
    import sys

    from typer.testing import CliRunner

    from cli.main import app

    d = write_fixture(tmp_path, "sst2")
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    for spec in ("hf:sst2", f"hf:sst2@{d}"):
        with pytest.raises(IA2Error, match=r'hf:sst2: .*`datasets`.*pip install -e "\.\[hf\]"'):
            load_task(spec)
    r = CliRunner().invoke(app, ["eval", "--task", "hf:sst2", "--base", "--model", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert ".[hf]" in r.output and "pip install datasets" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["tasks", "--json"])
    assert r.exit_code == 0, r.output
    assert "hf:sst2" in {t["name"] for t in json.loads(r.stdout)["hf_tasks"]}


@pytest.mark.parametrize("template", ["", "{input[0]}", "{input:>2000000000}", "{{input}} {input}"])
def test_hf_template_and_separator_flags_are_checked(tmp_path: Path, template: str) -> None:
    """The same template rules as every task: one literal {input}, and an empty --template or
    --separator is refused (it used to mean the default); the error names the flag."""
    with pytest.raises(IA2Error, match="--template"):
        load_hf(f"hf:sst2@{write_fixture(tmp_path, 'sst2')}", template=template)
    with pytest.raises(IA2Error, match="--separator '': empty"):
        load_hf(f"hf:sst2@{write_fixture(tmp_path, 'sst2')}", separator="")


def test_hf_template_is_rendered_literally(tmp_path: Path) -> None:
    t = load_hf(f"hf:sst2@{write_fixture(tmp_path, 'sst2')}", template="{0} {input!r:>9}? {input}")
    e = t.pool[0]
    assert t.render(e) == "{0} {input!r:>9}? " + e.input


def test_hf_separator_inside_targets_is_refused(tmp_path: Path) -> None:
    d = write_fixture(tmp_path, "gsm8k")
    with pytest.raises(IA2Error, match=r"hf:gsm8k row gsm8k-p\d+: target .*--separator"):
        load_hf(f"hf:gsm8k@{d}", separator="\n")


def test_hub_rows_that_break_the_rules_are_kept_with_a_warning(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Hub data is read as the reference code reads it: rows whose target holds the stop string,
    and inputs repeated with another target, are named in a warning, not dropped."""
    d = tmp_path / "gsm8k"
    d.mkdir()
    rows = _gsm8k(30)
    rows[3]["answer"] = "First step.\n\nSecond step.\n#### 4"
    rows[7]["question"] = rows[5]["question"]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _gsm8k(12)))
    with caplog.at_level("WARNING", logger="ia2cache.tasks"):
        t = load_hf(f"hf:gsm8k@{d}")
    assert len(t.pool) == 30
    assert "1 rows have the stop string '\\n\\n' in their target" in caplog.text
    assert "repeat an earlier input with a different target" in caplog.text


@pytest.mark.parametrize(("name", "ids"), [("sst2", "0 -> negative, 1 -> positive"),
                                           ("fins", "0 -> negative, 2 -> positive"),
                                           ("bbcn", "0 -> Technology, 1 -> Business")])
def test_string_labels_are_refused_naming_the_expected_label_type(tmp_path: Path, name: str,
                                                                  ids: str) -> None:
    """Rows with label words instead of class ids are all dropped: the message says what the
    label column must hold and what row 0 has."""
    d = write_fixture(tmp_path, name)
    words = ["negative", "positive", "neutral"]
    for f in d.glob("*.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps({**r, "label": words[i % 3]}) + "\n" for i, r in enumerate(rows)))
    want = rf"too few usable rows \(pool 0, eval 0\).*integer class ids \({ids}.*row 0 has 'negative'"
    with pytest.raises(IA2Error, match=want + r" \(str\)"):
        load_task(f"hf:{name}@{d}")
