"""The bad-input matrix: every CLI command, fed each kind of bad input, exits 2 with one message
that names the culprit (flag, file and line, key or path), prints nothing on stdout, and leaves
every existing cache, adapter and sweep directory byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.testing import tiny_llama
from tests.conftest import mark_as_sweep, write_jsonl, write_task

runner = CliRunner()
WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy"]


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_tok: Any) -> dict[str, Any]:
    """A world with one of everything: models, task files good and bad, a store holding a complete
    and a partial cache, an adapter, a sweep folder, and places outside the store."""
    d = tmp_path_factory.mktemp("bad_input")
    other = d / "other-model"  # same shapes, other weights: another fingerprint
    tiny_llama(len(tiny_tok), seed=1).save_pretrained(other)
    tiny_tok.save_pretrained(other)
    task = write_task(d / "task.jsonl", ((f"{WORDS[i % 8]} {i}", WORDS[(i * 3) % 8]) for i in range(40)))
    write_jsonl(
        d / "malformed.jsonl",
        [
            json.dumps({"input": "a", "target": "b"}),
            json.dumps({"input": "c", "target": "d"}),
            '{"input": "e", "target": ',
        ],
    )
    write_jsonl(
        d / "empty_target.jsonl",
        [json.dumps({"input": "a", "target": "b"}), json.dumps({"input": "c", "target": ""})],
    )
    write_jsonl(
        d / "no_target.jsonl", [json.dumps({"input": "a", "target": "b"}), json.dumps({"input": "c"})]
    )
    write_jsonl(d / "empty.jsonl", [])
    long_input = " ".join(WORDS * 200)  # ~1600 words: past the tiny model's 1024 positions alone
    write_task(d / "long.jsonl", ((f"{long_input} {i}", WORDS[i % 8]) for i in range(8)))
    store = d / "store"
    base = dict(
        model=str(tiny_model_dir),
        task=str(task),
        n=8,
        k=3,
        store=str(store),
        max_new_tokens=1,
        dtype="fp32",
        shard_rows=8,
    )
    done = collect(CollectConfig(**base))
    partial_cfg = CollectConfig(**{**base, "seed": 1})
    from ia2cache import store as store_mod

    real = store_mod.Cache.finalize
    store_mod.Cache.finalize = lambda self, extra=None: None  # type: ignore[method-assign]
    try:
        partial = collect(partial_cfg)
    finally:
        store_mod.Cache.finalize = real  # type: ignore[method-assign]
    adapter = d / "adapter"
    distill(
        DistillConfig(cache=done.cache, model=str(tiny_model_dir), method="act", epochs=1, out=str(adapter))
    )
    sweep_dir = mark_as_sweep(d / "sweep")
    write_jsonl(
        sweep_dir / "results.jsonl",
        [json.dumps({"task": "t", "n": 4, "method": "tok", "seed": 0, "accuracy": 0.5}), "{not json"],
    )
    elsewhere = d / "elsewhere"  # a cache outside the store, and a plain folder
    elsewhere.mkdir()
    (elsewhere / "plain").mkdir()
    (store / "escape").symlink_to(elsewhere / "plain")
    shutil.copytree(done.cache, elsewhere / "cache_copy")  # a real cache, outside the store
    (store / "escape_cache").symlink_to(elsewhere / "cache_copy")
    (d / "a_file").write_text("x")
    shutil.copytree(adapter, d / "adapter_badrun")  # an adapter whose run.json is torn
    (d / "adapter_badrun" / "run.json").write_text('{"model_spec": ')
    return {
        "d": d,
        "model": str(tiny_model_dir),
        "other": str(other),
        "task": str(task),
        "store": str(store),
        "cache": done.cache,
        "key": done.key,
        "partial": partial.key,
        "adapter": str(adapter),
        "sweep": str(sweep_dir),
        "file": str(d / "a_file"),
    }


def _tree_hash(*roots: str) -> dict[str, str]:
    out = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath, name)
                if not p.is_symlink():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


A = Callable[[dict[str, Any]], list[str]]


def _c(*extra: str) -> A:
    """collect with a working model, task and store unless ``extra`` overrides them."""

    def build(w: dict[str, Any]) -> list[str]:
        args = [x.format(**w) for x in extra]
        base = {"--model": w["model"], "--task": w["task"], "--store": w["store"], "--n": "8"}
        for flag in list(base):
            if flag in args:
                del base[flag]
        return ["collect", *[x for kv in base.items() for x in kv], *args]

    return build


def _a(*args: str) -> A:
    return lambda w: [x.format(**w) for x in args]


# (id, argv, words the message must hold). {d} {model} {other} {task} {store} {cache} {key} {partial}
# {adapter} {sweep} {file} are filled from the fixture.
CASES: list[tuple[str, A, list[str]]] = [
    # ------------------------------------------------------------------ tasks
    ("tasks-unknown-flag", _a("tasks", "--bogus"), ["--bogus"]),
    # ------------------------------------------------------------------ collect
    ("collect-unknown-task", _c("--task", "no_such_task"), ["--task no_such_task"]),
    ("collect-empty-task", _c("--task", ""), ["--task"]),
    ("collect-malformed-jsonl", _c("--task", "{d}/malformed.jsonl"), ["malformed.jsonl", ":3:"]),
    (
        "collect-empty-target",
        _c("--task", "{d}/empty_target.jsonl"),
        ["empty_target.jsonl", ":2:", "target"],
    ),
    ("collect-missing-target", _c("--task", "{d}/no_target.jsonl"), ["no_target.jsonl", ":2:", "target"]),
    ("collect-empty-file", _c("--task", "{d}/empty.jsonl"), ["empty.jsonl"]),
    ("collect-unknown-model", _c("--model", "{d}/no_model"), ["--model", "no_model"]),
    ("collect-model-is-a-file", _c("--model", "{file}"), ["--model", "a_file"]),
    ("collect-unknown-site", _c("--site", "nope"), ["--site nope"]),
    ("collect-unknown-layer", _c("--layers", "99"), ["--layers 99"]),
    ("collect-bad-layers", _c("--layers", "0-x"), ["--layers 0-x"]),
    ("collect-n-larger-than-pool", _c("--n", "1000"), ["--n 1000"]),
    ("collect-n-zero", _c("--n", "0"), ["--n 0"]),
    ("collect-k-not-int", _c("--k", "x"), ["--k x"]),
    ("collect-k-too-big", _c("--k", "40"), ["--k 40"]),
    ("collect-prompt-too-long", _c("--task", "{d}/long.jsonl", "--n", "2"), ["context"]),
    ("collect-bad-dtype", _c("--dtype", "int8"), ["--dtype int8"]),
    ("collect-bad-response", _c("--response", "x"), ["--response x"]),
    ("collect-bad-positions", _c("--positions", "x"), ["--positions x"]),
    ("collect-batch-zero", _c("--batch-size", "0"), ["--batch-size 0"]),
    ("collect-shard-rows", _c("--shard-rows", "7"), ["--shard-rows 7"]),
    ("collect-template", _c("--template", "no slot"), ["--template"]),
    ("collect-eval-fraction", _c("--eval-fraction", "1.5"), ["--eval-fraction 1.5"]),
    ("collect-store-is-a-file", _c("--store", "{file}"), ["--store", "a_file"]),
    ("collect-store-under-a-file", _c("--store", "{file}/store"), ["--store", "a_file"]),
    # ------------------------------------------------------------------ ls
    ("ls-missing-store", _a("ls", "--store", "{d}/no_store"), ["--store", "no_store"]),
    ("ls-store-is-a-file", _a("ls", "--store", "{file}"), ["--store", "a_file"]),
    # ------------------------------------------------------------------ inspect / verify
    *[
        case
        for cmd in ("inspect", "verify")
        for case in [
            (f"{cmd}-unknown-key", _a(cmd, "0123456789abcdef", "--store", "{store}"), ["0123456789abcdef"]),
            (f"{cmd}-unknown-name", _a(cmd, "nope", "--store", "{store}"), ["nope"]),
            (
                f"{cmd}-dotdot",
                _a(cmd, "../elsewhere", "--store", "{store}"),
                ["outside the store", "../elsewhere"],
            ),
            (f"{cmd}-deep-dotdot", _a(cmd, "{key}/../../x", "--store", "{store}"), ["outside the store"]),
            (
                f"{cmd}-abs-not-a-cache",
                _a(cmd, "{d}/elsewhere/plain", "--store", "{store}"),
                ["elsewhere/plain", "not an ia2cache cache"],
            ),
            (
                f"{cmd}-symlink-escape",
                _a(cmd, "escape", "--store", "{store}"),
                ["outside the store", "escape"],
            ),
            (
                f"{cmd}-symlink-to-cache-escape",
                _a(cmd, "escape_cache", "--store", "{store}"),
                ["outside the store", "escape_cache"],
            ),
            (f"{cmd}-a-file", _a(cmd, "{file}", "--store", "{store}"), ["a_file"]),
            (f"{cmd}-missing-store", _a(cmd, "{key}", "--store", "{d}/no_store"), ["no_store"]),
        ]
    ],
    # ------------------------------------------------------------------ distill
    (
        "distill-unknown-cache",
        _a("distill", "--cache", "0123456789abcdef", "--store", "{store}"),
        ["0123456789abcdef"],
    ),
    ("distill-dotdot", _a("distill", "--cache", "../elsewhere", "--store", "{store}"), ["outside the store"]),
    (
        "distill-symlink-escape",
        _a("distill", "--cache", "escape_cache", "--store", "{store}"),
        ["outside the store", "escape_cache"],
    ),
    (
        "distill-abs-not-a-cache",
        _a("distill", "--cache", "{d}/elsewhere/plain", "--store", "{store}"),
        ["elsewhere/plain"],
    ),
    (
        "distill-partial-cache",
        _a("distill", "--cache", "{partial}", "--store", "{store}", "--out", "{d}/o1"),
        ["--cache", "{partial}", "not complete"],
    ),
    (
        "distill-unknown-method",
        _a("distill", "--cache", "{key}", "--store", "{store}", "--method", "nope"),
        ["--method nope"],
    ),
    (
        "distill-topk-method-without-topk",
        _a("distill", "--cache", "{key}", "--store", "{store}", "--method", "tokl", "--out", "{d}/o2"),
        ["--method tokl", "top-k"],
    ),
    (
        "distill-unknown-adapter",
        _a("distill", "--cache", "{key}", "--store", "{store}", "--adapter", "nope"),
        ["--adapter nope"],
    ),
    (
        "distill-unknown-labels",
        _a("distill", "--cache", "{key}", "--store", "{store}", "--labels", "x"),
        ["--labels x"],
    ),
    (
        "distill-layer-not-in-cache",
        _a(
            "distill",
            "--cache",
            "{key}",
            "--store",
            "{store}",
            "--model",
            "{model}",
            "--out",
            "{d}/o3",
            "--layers",
            "99",
        ),
        ["--layers 99"],
    ),
    ("distill-bad-lr", _a("distill", "--cache", "{key}", "--store", "{store}", "--lr", "-1"), ["--lr -1"]),
    (
        "distill-other-model",
        _a("distill", "--cache", "{key}", "--store", "{store}", "--model", "{other}", "--out", "{d}/o4"),
        ["fingerprint", "--allow-model-mismatch"],
    ),
    (
        "distill-unknown-model",
        _a("distill", "--cache", "{key}", "--store", "{store}", "--model", "{d}/nomodel", "--out", "{d}/o5"),
        ["--model", "nomodel"],
    ),
    (
        "distill-out-under-a-file",
        _a("distill", "--cache", "{key}", "--store", "{store}", "--model", "{model}", "--out", "{file}/run"),
        ["--out", "a_file"],
    ),
    (
        "distill-unknown-target-modules",
        _a(
            "distill",
            "--cache",
            "{key}",
            "--store",
            "{store}",
            "--model",
            "{model}",
            "--out",
            "{d}/o6",
            "--target-modules",
            "nope",
        ),
        ["--target-modules", "nope"],
    ),
    # ------------------------------------------------------------------ eval
    (
        "eval-two-modes",
        _a("eval", "--icl", "--base", "--model", "{model}", "--task", "{task}"),
        ["--icl", "--base"],
    ),
    (
        "eval-unknown-task",
        _a("eval", "--base", "--model", "{model}", "--task", "no_such_task"),
        ["--task no_such_task"],
    ),
    (
        "eval-malformed-jsonl",
        _a("eval", "--base", "--model", "{model}", "--task", "{d}/malformed.jsonl"),
        ["malformed.jsonl", ":3:"],
    ),
    (
        "eval-empty-target",
        _a("eval", "--base", "--model", "{model}", "--task", "{d}/empty_target.jsonl"),
        ["empty_target.jsonl", ":2:"],
    ),
    (
        "eval-unknown-model",
        _a("eval", "--base", "--model", "{d}/no_model", "--task", "{task}"),
        ["--model", "no_model"],
    ),
    (
        "eval-k-larger-than-pool",
        _a("eval", "--icl", "--icl-demos", "pool", "--k", "500", "--model", "{model}", "--task", "{task}"),
        ["--k 500"],
    ),
    (
        "eval-k-larger-than-n",
        _a("eval", "--icl", "--n", "4", "--k", "5", "--model", "{model}", "--task", "{task}"),
        ["--k 5", "N=4"],
    ),
    (
        "eval-icl-without-n",
        _a("eval", "--icl", "--model", "{model}", "--task", "{task}"),
        ["--n", "--icl-demos pool"],
    ),
    (
        "eval-n-eval-zero",
        _a("eval", "--base", "--n-eval", "0", "--model", "{model}", "--task", "{task}"),
        ["--n-eval 0"],
    ),
    (
        "eval-prompt-too-long",
        _a("eval", "--base", "--model", "{model}", "--task", "{d}/long.jsonl"),
        ["context"],
    ),
    (
        "eval-adapter-missing",
        _a("eval", "--adapter", "{d}/no_adapter", "--task", "{task}"),
        ["--adapter", "no_adapter"],
    ),
    ("eval-adapter-is-a-cache", _a("eval", "--adapter", "{cache}", "--task", "{task}"), ["--adapter"]),
    (
        "eval-adapter-torn-run-json",
        _a("eval", "--adapter", "{d}/adapter_badrun", "--task", "{task}"),
        ["{d}/adapter_badrun/run.json", "JSON"],
    ),
    (
        "eval-adapter-on-other-model",
        _a("eval", "--adapter", "{adapter}", "--model", "{other}", "--task", "{task}"),
        ["--adapter", "--model", "fingerprint"],
    ),
    # ------------------------------------------------------------------ sweep
    (
        "sweep-unknown-task",
        _a("sweep", "--task", "no_such_task", "--model", "{model}", "--store", "{store}", "--out", "{d}/s1"),
        ["--task no_such_task"],
    ),
    (
        "sweep-malformed-jsonl",
        _a(
            "sweep",
            "--task",
            "{d}/malformed.jsonl",
            "--model",
            "{model}",
            "--store",
            "{store}",
            "--out",
            "{d}/s2",
        ),
        ["malformed.jsonl", ":3:"],
    ),
    (
        "sweep-n-larger-than-pool",
        _a(
            "sweep",
            "--task",
            "{task}",
            "--n",
            "1000",
            "--model",
            "{model}",
            "--store",
            "{store}",
            "--out",
            "{d}/s3",
        ),
        ["--n", "1000"],
    ),
    (
        "sweep-unknown-method",
        _a(
            "sweep",
            "--task",
            "{task}",
            "--methods",
            "nope",
            "--model",
            "{model}",
            "--store",
            "{store}",
            "--out",
            "{d}/s4",
        ),
        ["--methods", "nope"],
    ),
    (
        "sweep-bad-seeds",
        _a("sweep", "--task", "{task}", "--seeds", "x", "--model", "{model}", "--out", "{d}/s5"),
        ["--seeds x"],
    ),
    (
        "sweep-bad-lrs",
        _a("sweep", "--task", "{task}", "--lrs", "fast", "--model", "{model}", "--out", "{d}/s6"),
        ["--lrs fast"],
    ),
    (
        "sweep-unknown-model",
        _a("sweep", "--task", "{task}", "--model", "{d}/no_model", "--store", "{store}", "--out", "{d}/s7"),
        ["--model", "no_model"],
    ),
    (
        "sweep-out-under-a-file",
        _a("sweep", "--task", "{task}", "--model", "{model}", "--store", "{store}", "--out", "{file}/sweep"),
        ["--out", "a_file"],
    ),
    (
        "sweep-store-under-a-file",
        _a(
            "sweep",
            "--task",
            "{task}",
            "--n",
            "4",
            "--seeds",
            "0",
            "--model",
            "{model}",
            "--store",
            "{file}/store",
            "--out",
            "{d}/s8",
        ),
        ["--store", "a_file"],
    ),
    # ------------------------------------------------------------------ analyze
    (
        "analyze-similarity-unknown-cache",
        _a("analyze", "similarity", "--cache", "0123456789abcdef", "--store", "{store}", "--out", "{d}/an1"),
        ["0123456789abcdef"],
    ),
    (
        "analyze-similarity-dotdot",
        _a("analyze", "similarity", "--cache", "../elsewhere", "--store", "{store}", "--out", "{d}/an2"),
        ["outside the store"],
    ),
    (
        "analyze-similarity-symlink-escape",
        _a("analyze", "similarity", "--cache", "escape_cache", "--store", "{store}", "--out", "{d}/an3"),
        ["outside the store"],
    ),
    (
        "analyze-similarity-partial",
        _a("analyze", "similarity", "--cache", "{partial}", "--store", "{store}", "--out", "{d}/an4"),
        ["{partial}", "not complete"],
    ),
    (
        "analyze-similarity-adapter-missing",
        _a(
            "analyze",
            "similarity",
            "--cache",
            "{key}",
            "--store",
            "{store}",
            "--adapter",
            "{d}/no_adapter",
            "--out",
            "{d}/an5",
        ),
        ["--adapter", "no_adapter"],
    ),
    (
        "analyze-similarity-other-model",
        _a(
            "analyze",
            "similarity",
            "--cache",
            "{key}",
            "--store",
            "{store}",
            "--model",
            "{other}",
            "--out",
            "{d}/an6",
        ),
        ["{other}", "is not the cache's"],
    ),
    (
        "analyze-similarity-batch-zero",
        _a(
            "analyze",
            "similarity",
            "--cache",
            "{key}",
            "--store",
            "{store}",
            "--batch-size",
            "0",
            "--out",
            "{d}/an7",
        ),
        ["--batch-size 0"],
    ),
    (
        "analyze-overlap-adapter-missing",
        _a("analyze", "overlap", "--adapter", "{d}/no_adapter", "--adapter", "{adapter}", "--out", "{d}/an8"),
        ["--adapter", "no_adapter"],
    ),
    (
        "analyze-overlap-not-an-adapter",
        _a("analyze", "overlap", "--adapter", "{cache}", "--adapter", "{adapter}", "--out", "{d}/an9"),
        ["--adapter", "{cache}"],
    ),
    (
        "analyze-overlap-torn-run-json",
        _a("analyze", "overlap", "--adapter", "{d}/adapter_badrun", "--out", "{d}/an10"),
        ["{d}/adapter_badrun/run.json", "JSON"],
    ),
    (
        "analyze-similarity-torn-run-json",
        _a("analyze", "similarity", "--cache", "{key}", "--store", "{store}", "--adapter",
           "{d}/adapter_badrun", "--out", "{d}/an11"),
        ["{d}/adapter_badrun/run.json", "JSON"],
    ),
    (
        "analyze-overlap-name-escapes-out",
        _a("analyze", "overlap", "--adapter", "{adapter}", "--name", "../../x", "--out", "{d}/an12/sub"),
        ["--name", "../../x"],
    ),
    (
        "analyze-similarity-name-escapes-out",
        _a("analyze", "similarity", "--cache", "{key}", "--store", "{store}", "--name", "../x", "--out",
           "{d}/an13"),
        ["--name", "../x"],
    ),
    (
        "analyze-overlap-out-under-a-file",
        _a("analyze", "overlap", "--adapter", "{adapter}", "--adapter", "{adapter}", "--out", "{file}/x"),
        ["--out", "a_file"],
    ),
    # ------------------------------------------------------------------ report
    ("report-missing-dir", _a("report", "{d}/no_sweep"), ["no_sweep"]),
    ("report-no-results", _a("report", "{d}/elsewhere"), ["results", "elsewhere"]),
]


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    w: dict[str, Any], argv: A, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IA2CACHE_HOME", str(Path(w["d"]) / "home"))  # default --out and --store
    roots = (w["store"], w["adapter"], w["sweep"], str(Path(w["d"]) / "elsewhere"))
    before = _tree_hash(*roots)
    r = runner.invoke(app, argv(w))
    msg = " ".join(r.stderr.split())
    assert r.exit_code == 2, (r.exit_code, msg, r.exception)
    assert "Traceback" not in msg
    for needle in needles:
        assert needle.format(**w) in msg, (needle, msg)
    assert r.stdout == ""
    assert _tree_hash(*roots) == before


def test_every_command_is_in_the_matrix() -> None:
    import typer.main

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    covered = {c[0].split("-")[0] for c in CASES}
    assert commands <= covered, commands - covered


def test_report_warns_about_a_torn_results_line_naming_file_and_line(w: dict[str, Any]) -> None:
    """results.jsonl is an append-only log: a line torn by a crash is skipped with a warning that
    names the file and line (not refused), so one crash never hides a whole sweep."""
    r = runner.invoke(app, ["report", w["sweep"], "--json"])
    msg = " ".join(r.stderr.split())
    assert r.exit_code == 0, msg
    assert "results.jsonl:2" in msg and "skipped" in msg
