"""Hardening, class 5: prompts and task files mean what they say (ia2cache/tasks).

Templates are plain text with exactly one literal ``{input}``, replaced literally; JSONL files are
split on ``\\n`` only and may start with a BOM; a task file cannot give one input two targets, or
a target the stop string or the separator; a spec that names both a built-in task and a file is
ambiguous. Every refusal is an IA2Error (exit 2) naming the flag or the file and line.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from ia2cache.errors import IA2Error
from ia2cache.tasks import DEFAULT_TEMPLATE, Example, Task, list_builtin, load_task, render_template
from tests.conftest import write_jsonl, write_task

PAIRS = [(f"word{i}", f"answer{i % 3}") for i in range(12)]
TASKS_LOG = "ia2cache.tasks"


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    return write_task(tmp_path / "t.jsonl", PAIRS)


def _refused(match: str, spec: str, **kwargs: Any) -> str:
    with pytest.raises(IA2Error, match=match) as info:
        load_task(spec, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg.strip(), "the CLI prints one line"
    return msg


# -- templates -----------------------------------------------------------------------------------

# Each of these names no literal {input} (or names it twice), whatever str.format would make of it.
BAD_TEMPLATES = [
    "",
    " ",
    "\n",
    "no placeholder",
    "{inpt}",
    "{INPUT}",
    "{ input }",
    "{input[0]}",
    "{input[0]!r}",
    "{input.__class__.__mro__}",
    "{input.upper}",
    "{input:>2000000000}",
    "{input:}",
    "{input!r}",
    "{input!s:^9}",
    "{0}",
    "{}",
    "{input}{input}",
    "Q: {input}\nA: {input}",
    "{input} {{input}}",
]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_a_template_without_exactly_one_literal_input_is_refused(task_file: Path, template: str) -> None:
    for spec in (str(task_file), "antonyms"):
        msg = _refused("--template", spec, template=template)
        assert "{input}" in msg, msg  # names what a template must hold


def test_an_empty_template_is_refused_not_the_default(task_file: Path) -> None:
    msg = _refused("--template '': empty", str(task_file), template="")
    assert DEFAULT_TEMPLATE.replace("\n", "\\n") in msg
    _refused("--template '': empty", "capitals", template="")


# Templates with braces and format syntax around one literal {input}: all plain text.
ODD_TEMPLATES = [
    "{{input}}",
    "{input}",
    "Q: {input}\nA:",
    "{0} {input} {1}",
    "{input} {{x}} }{",
    "{input}:>20",
    "%s {input} %(x)s $input $(input) <input>",
    "Q: {input} {nested {braces}}",
    "\u2028{input}\u0085",
]
ODD_INPUTS = ["plain", "{input}", "{0}", "{{}}", "{input:>99}", "%s", "a\u2028b", "tab\there", "}{"]


@pytest.mark.parametrize("template", ODD_TEMPLATES)
def test_a_template_is_rendered_by_literal_replacement(task_file: Path, template: str) -> None:
    t = load_task(str(task_file), template=template)
    before, _, after = template.partition("{input}")
    for text in ODD_INPUTS:
        ex = Example(id="x", input=text, target="y")
        assert t.render(ex) == before + text + after
        assert t.demo_text(ex) == before + text + after + " y"
    assert render_template(template, "Z") == template.replace("{input}", "Z")


def test_stray_braces_are_kept_and_warned_about(task_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=TASKS_LOG):
        t = load_task(str(task_file), template="{{input}} -> {label}")
    assert t.render(t.pool[0]) == "{" + t.pool[0].input + "} -> {label}"
    assert "--template" in caplog.text and "plain text" in caplog.text


def test_a_literal_backslash_n_is_warned_about(task_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=TASKS_LOG):
        t = load_task(str(task_file), template="Q: {input}\\nA:", separator="\\n\\n")
    assert t.template == "Q: {input}\\nA:"  # kept as written
    assert "--template" in caplog.text and "--separator" in caplog.text and "$'...'" in caplog.text


def test_format_style_templates_change_the_content_hash(task_file: Path) -> None:
    """A template with other braces rendered differently before; it must not reuse old caches."""
    plain = load_task(str(task_file), template="Q: {input}\nA:")
    odd = load_task(str(task_file), template="Q: {{input}}\nA:")
    assert plain.content_hash != odd.content_hash
    # the usual templates keep the key they had (the body is unchanged for them)
    import hashlib

    body = {"pool": [[e.id, e.input, e.target] for e in plain.pool],
            "eval": [[e.id, e.input, e.target] for e in plain.eval],
            "template": plain.template, "separator": plain.separator, "stop": plain.stop}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert plain.content_hash == hashlib.sha256(raw.encode()).hexdigest()[:16]


def test_a_task_object_checks_its_template() -> None:
    ex = Example(id="a", input="a", target="b")
    with pytest.raises(IA2Error, match="template"):
        Task(name="t", pool=(ex,), eval=(ex,), template="{input[0]}", separator="\n\n")


def test_the_prompt_holds_the_input(tmp_path: Path, tiny_tok: Any) -> None:
    from ia2cache.prompts import PromptConfig, build_pairs

    path = write_task(tmp_path / "t.jsonl", [(f"word{i}", "yes" if i % 2 else "no") for i in range(8)])
    t = load_task(str(path), template="[{input}] {{0}}:")
    p = build_pairs(t, tiny_tok, PromptConfig(n=3, k=2, seed=0)).train[0]
    query = next(e for e in t.pool if e.id == p.example_id)
    assert tiny_tok.decode(p.student_ids) == f"[{query.input}] {{{{0}}}}:"


@pytest.mark.parametrize("separator", ["", None])
def test_an_empty_separator_is_refused(task_file: Path, separator: str | None) -> None:
    if separator is None:  # None: the task's own (default) separator, not a refusal
        assert load_task(str(task_file), separator=None).separator == load_task(str(task_file)).separator
        return
    for spec in (str(task_file), "antonyms"):
        msg = _refused("--separator '': empty", spec, separator=separator)
        assert "'\\n\\n'" in msg, msg  # says what a separator looks like


# -- JSONL lines ---------------------------------------------------------------------------------

# Characters str.splitlines() breaks on; inside a JSON string they are text, not line ends.
LINE_BREAKERS = ["\u2028", "\u2029", "\u0085", "\u000b", "\u000c", "\u001c", "\u001d", "\u001e", "\r"]


@pytest.mark.parametrize("ch", LINE_BREAKERS, ids=[f"U+{ord(c):04X}" for c in LINE_BREAKERS])
def test_strings_may_hold_any_line_breaking_character(tmp_path: Path, ch: str) -> None:
    rows = [{"input": f"before{ch}after {i}", "target": f"t{ch}x{i}"} for i in range(6)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    p = write_jsonl(tmp_path / "t.jsonl", lines)
    t = load_task(str(p))
    assert sorted(e.input for e in t.pool + t.eval) == sorted(r["input"] for r in rows)
    assert sorted(e.target for e in t.pool + t.eval) == sorted(r["target"] for r in rows)


@pytest.mark.parametrize("ch", ["\u2028", "\u0085", "\u2029"])
def test_line_numbers_count_newlines_only(tmp_path: Path, ch: str) -> None:
    lines = [json.dumps({"input": f"a{ch}b", "target": "c"}, ensure_ascii=False),
             json.dumps({"input": "d", "target": "e"}), "{broken"]
    p = write_jsonl(tmp_path / "t.jsonl", lines)
    msg = _refused("invalid JSON", str(p))
    assert f"{p}:3:" in msg


@pytest.mark.parametrize("ch", ["\u000b", "\u000c", "\u001c", "\u001e", "\x00"])
def test_a_raw_control_character_is_invalid_json_on_its_own_line(tmp_path: Path, ch: str) -> None:
    lines = [json.dumps({"input": "a", "target": "b"}), '{"input": "x' + ch + 'y", "target": "z"}',
             json.dumps({"input": "c", "target": "d"})]
    p = write_jsonl(tmp_path / "t.jsonl", lines)
    assert f"{p}:2: invalid JSON" in _refused("invalid JSON", str(p))


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_bom_and_crlf_are_accepted(tmp_path: Path, eol: str, bom: bytes) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(bom + eol.join(json.dumps({"input": x, "target": y}) for x, y in PAIRS).encode() + b"\r\n")
    t = load_task(str(p))
    assert sorted(e.input for e in t.pool + t.eval) == sorted(x for x, _ in PAIRS)
    assert all("\r" not in e.target and "\ufeff" not in e.input for e in t.pool + t.eval)
    plain = load_task(str(write_task(tmp_path / "t.jsonl", PAIRS)))
    assert (t.pool, t.eval) == (plain.pool, plain.eval)


def test_a_bom_on_a_concatenated_line_is_skipped(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    half = [json.dumps({"input": x, "target": y}) for x, y in PAIRS]
    p.write_bytes(("\ufeff" + "\n".join(half[:6]) + "\n\ufeff" + "\n".join(half[6:]) + "\n").encode())
    t = load_task(str(p))
    assert len(t.pool) + len(t.eval) == len(PAIRS)


def test_utf16_and_bad_bytes_are_refused_naming_the_line(tmp_path: Path) -> None:
    p = tmp_path / "u16.jsonl"
    p.write_bytes("\n".join(json.dumps({"input": x, "target": y}) for x, y in PAIRS).encode("utf-16"))
    _refused("UTF-16", str(p))
    q = tmp_path / "bad.jsonl"
    q.write_bytes(b'{"input": "a", "target": "b"}\n{"input": "\xff", "target": "c"}\n')
    assert f"{q}:2: not UTF-8" in _refused("not UTF-8", str(q))


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"input": "a", "target": "b"}),
                                           '{"input": "c", "target": "d", "target": "e"}'])
    assert f"{p}:2: field 'target' appears twice" in _refused("twice", str(p))


def test_an_unpaired_surrogate_is_refused(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"input": "a", "target": "b"}),
                                           '{"input": "x\\ud800y", "target": "d"}'])
    assert f"{p}:2: field 'input'" in _refused("surrogate", str(p))


def test_unknown_fields_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [json.dumps({"input": x, "target": y, "label": 1}) for x, y in PAIRS]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger=TASKS_LOG):
        load_task(str(p))
    assert "'label' ignored" in caplog.text and str(p) in caplog.text


# -- one input, one target -----------------------------------------------------------------------

# The same input, spelled as a reader sees it: exact, padded, NFD, doubled or tabbed spaces.
SAME_INPUT = [
    ("big house", "big house"),
    ("big house", "big house "),
    ("big house", " big house"),
    ("big house", "big  house"),
    ("big house", "big\thouse"),
    ("café", unicodedata.normalize("NFD", "café")),
]


@pytest.mark.parametrize(("a", "b"), SAME_INPUT)
def test_one_input_with_two_targets_is_refused_naming_both_lines(tmp_path: Path, a: str, b: str) -> None:
    pairs = PAIRS[:3] + [(a, "small")] + PAIRS[3:5] + [(b, "tiny")]  # lines 4 and 7
    p = write_task(tmp_path / "t.jsonl", pairs)
    msg = _refused("another target", str(p))
    assert f"{p}:7:" in msg and f"{p}:4" in msg and "'small'" in msg and "'tiny'" in msg


@pytest.mark.parametrize(("a", "b"), SAME_INPUT)
def test_a_repeated_row_is_dropped_with_a_warning(tmp_path: Path, a: str, b: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    pairs = PAIRS + [(a, "small"), (b, "small ")]
    p = write_task(tmp_path / "t.jsonl", pairs)
    with caplog.at_level(logging.WARNING, logger=TASKS_LOG):
        t = load_task(str(p))
    assert len(t.pool) + len(t.eval) == len(PAIRS) + 1
    assert f"{p}:14 repeats {p}:13" in caplog.text
    keys = [" ".join(unicodedata.normalize("NFC", e.input).split()) for e in t.pool + t.eval]
    assert len(keys) == len(set(keys)), "a repeat could sit in both pool and eval"


def test_inputs_that_differ_in_case_are_different_inputs(tmp_path: Path) -> None:
    t = load_task(str(write_task(tmp_path / "t.jsonl", PAIRS + [("Paris", "yes"), ("paris", "no")])))
    assert len(t.pool) + len(t.eval) == len(PAIRS) + 2


def test_a_file_of_one_row_repeated_is_refused(tmp_path: Path) -> None:
    p = write_task(tmp_path / "t.jsonl", [("a", "b")] * 4)
    msg = _refused("at least 2 distinct examples", str(p))
    assert msg.startswith(str(p)), msg  # names the file


# -- targets the prompt format cannot produce ----------------------------------------------------

STOP_TARGETS = ["two\nlines", "ends\n\nhere", "x\r\n\ny"]


@pytest.mark.parametrize("target", STOP_TARGETS)
def test_a_target_holding_the_stop_string_is_refused(tmp_path: Path, target: str) -> None:
    p = write_task(tmp_path / "t.jsonl", PAIRS[:4] + [("q", target)] + PAIRS[4:] + [("r", target + "!")])
    msg = _refused("stop string", str(p))
    assert f"{p}:5:" in msg and f"{p}:14" in msg


@pytest.mark.parametrize(("separator", "target"), [(" | ", "a | b"), ("###", "x ### 4"), ("END", "the END"),
                                                   ("\t", "a\tb")])
def test_a_target_holding_the_separator_is_refused(tmp_path: Path, separator: str, target: str) -> None:
    p = write_task(tmp_path / "t.jsonl", PAIRS[:2] + [("q", target)] + PAIRS[2:])
    msg = _refused("separator", str(p), separator=separator)
    assert f"{p}:3:" in msg and "--separator" in msg


def test_a_builtin_target_holding_the_separator_blames_the_flag() -> None:
    msg = _refused("--separator", "arith_word", separator="####")
    assert "arith_word" in msg and "pool.jsonl:1:" in msg


# -- which task a spec names ---------------------------------------------------------------------


def test_a_file_named_like_a_builtin_is_ambiguous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    write_task(tmp_path / "antonyms", [("up", "UP"), ("down", "DOWN"), ("left", "LEFT")])
    msg = _refused("ambiguous", "antonyms")
    assert "built-in task 'antonyms'" in msg and str(tmp_path / "antonyms") in msg
    assert "--task ./antonyms for the file" in msg and "--task builtin:antonyms for the built-in" in msg
    with caplog.at_level(logging.WARNING, logger=TASKS_LOG):
        mine = load_task("./antonyms")
    assert mine.source.startswith("jsonl:") and mine.name == "file-antonyms"
    assert {e.target for e in mine.pool + mine.eval} <= {"UP", "DOWN", "LEFT"}
    assert "'file-antonyms'" in caplog.text
    shipped = load_task("builtin:antonyms")
    assert shipped.source == "builtin" and shipped.name == "antonyms" and len(shipped.pool) >= 100


def test_a_directory_named_like_a_builtin_is_not_a_task(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "antonyms").mkdir()  # e.g. a sweep --out folder
    assert load_task("antonyms").source == "builtin"


def test_a_file_named_like_an_hf_task_is_ambiguous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_task(tmp_path / "hf:sst2", PAIRS)
    msg = _refused("ambiguous", "hf:sst2")
    assert "--task ./hf:sst2" in msg
    assert load_task("./hf:sst2").source.startswith("jsonl:")


def test_a_jsonl_file_named_after_a_builtin_reports_its_own_name(tmp_path: Path) -> None:
    t = load_task(str(write_task(tmp_path / "capitals.jsonl", PAIRS)))
    assert t.name == "file-capitals"
    assert load_task(str(write_task(tmp_path / "mine.jsonl", PAIRS))).name == "mine"


@pytest.mark.parametrize(("spec", "match"), [
    ("", "empty"), ("   ", "empty"), ("builtin:nope", "no such built-in task"),
    ("./antonyms", "no such file"), ("sub/antonyms", "no such file"), ("antonyms.jsonl", "no such file"),
    ("~/no/such.jsonl", "no such file"), ("~no_such_user_zz/t.jsonl", "no such file"),
    ("a" * 300 + ".jsonl", "no such file"), ("t\x00.jsonl", "no such file"), (".", "no such file"),
])
def test_specs_that_name_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str,
                                 match: str) -> None:
    monkeypatch.chdir(tmp_path)
    msg = _refused(match, spec)
    assert msg.startswith("--task"), msg  # names the flag at fault


# -- the built-in tasks obey the same rules ------------------------------------------------------


@pytest.mark.parametrize("name", list_builtin())
def test_every_builtin_loads_cleanly_under_the_rules(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=TASKS_LOG):
        t = load_task(name)
        load_task(f"builtin:{name}")
    assert not caplog.records, caplog.text
    assert t.template.count("{input}") == 1 and t.separator and t.stop
    keys = [" ".join(unicodedata.normalize("NFC", e.input).split()) for e in t.pool + t.eval]
    assert len(keys) == len(set(keys))
    for e in t.pool + t.eval:
        assert t.stop not in " " + e.target and t.separator not in e.target, e
        assert e.input in t.render(e)


# -- through the CLI: exit 2, one line, nothing loaded -------------------------------------------


@pytest.mark.parametrize("extra", [
    ["--template", "{input:>2000000000}"],
    ["--template", "{input.__class__.__mro__}"],
    ["--template", ""],
    ["--separator", ""],
])
def test_the_cli_exits_2_before_loading_a_model(task_file: Path, tmp_path: Path, extra: list[str]) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["eval", "--base", "--task", str(task_file), "--model",
                                 str(tmp_path / "no_model"), *extra])
    assert r.exit_code == 2, r.output
    assert extra[0] in r.output and "Traceback" not in r.output and "no_model" not in r.output
