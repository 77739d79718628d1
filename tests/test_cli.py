from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from ia2cache.store import Cache
from tests.conftest import write_task

runner = CliRunner()
WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    task = write_task(d / "task.jsonl", ((f"{WORDS[i % 8]} {i}", WORDS[(i * 3) % 8]) for i in range(60)))
    return {"model": str(tiny_model_dir), "task": str(task), "store": str(d / "store")}


def _collect(env: dict[str, str], *extra: str) -> Any:
    return runner.invoke(app, ["collect", "--model", env["model"], "--task", env["task"], "--n", "8",
                               "--dev", "4", "--store", env["store"], "--shard-rows", "8", "--json", *extra])


def test_tasks_json_lists_builtin_tasks() -> None:
    r = runner.invoke(app, ["tasks", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    names = {t["name"] for t in obj["tasks"]}
    assert {"sentiment_remap", "capitals"} <= names
    for t in obj["tasks"]:
        assert {"name", "train", "eval", "single_token", "template"} <= set(t)
        assert t["train"] >= 100 and t["eval"] >= 100


def test_collect_ls_inspect_verify_roundtrip(env: dict[str, str]) -> None:
    r = _collect(env)
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)  # stdout holds exactly one JSON object
    assert first["reused"] is False and first["status"] == "complete" and first["rows"] == 12
    assert first["bytes_on_disk"] > 0 and Path(first["cache"]).is_dir()
    again = json.loads(_collect(env).stdout)
    assert again["reused"] is True and again["key"] == first["key"]

    ls = json.loads(runner.invoke(app, ["ls", "--store", env["store"], "--json"]).stdout)
    assert first["key"] in [c["key"] for c in ls["caches"]]

    ins = runner.invoke(app, ["inspect", first["key"], "--store", env["store"], "--json"])
    m = json.loads(ins.stdout)
    for key in ("key", "status", "rows", "model", "task", "site", "layers", "dtype", "positions",
                "max_new_tokens", "n", "k", "seed"):
        assert key in m
    assert m["model"]["fingerprint"] and m["model"]["name"] == Path(env["model"]).name and m["n"] == 8

    ok = runner.invoke(app, ["verify", first["key"], "--store", env["store"], "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout) == {
        "ok": True, "problems": [], "cache": first["cache"], "status": "complete", "lossy": {}}


def test_verify_names_array_and_rows_of_a_flipped_byte(env: dict[str, str]) -> None:
    r = _collect(env, "--dtype", "fp32", "--layers", "1")
    info = json.loads(r.stdout)
    cache = Cache.open(info["cache"])
    arr = Path(info["cache"]) / "acts" / "attn"
    shard = next(p for p in arr.rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = runner.invoke(app, ["verify", info["cache"], "--json"])
    assert bad.exit_code == 1
    problems = json.loads(bad.stdout)["problems"]
    assert problems and all(p["array"] == "acts/attn" for p in problems)
    assert problems[0]["rows"][1] <= cache.n_rows
    text = runner.invoke(app, ["verify", info["cache"]])
    assert text.exit_code == 1 and "acts/attn" in text.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["collect", "--site", "nope"], "--site nope"),
        (["collect", "--layers", "99"], "--layers 99"),
        (["collect", "--k", "x"], "--k x"),
        (["collect", "--n", "1000"], "--n 1000"),
        (["collect", "--task", "no_such_task"], "--task no_such_task"),
        (["collect", "--model", "/nonexistent/dir/x"], "--model /nonexistent/dir/x"),
        (["inspect", "../../etc"], "outside the store"),
        (["verify", "0123456789abcdef"], "0123456789abcdef"),
        (["eval", "--icl", "--base"], "choose exactly one"),
        (["distill", "--cache", "0123456789abcdef", "--method", "nope"], "--method nope"),
    ],
)
def test_bad_input_exits_2_and_names_the_culprit(env: dict[str, str], args: list[str], needle: str) -> None:
    defaults = {"collect": ["--model", env["model"], "--task", env["task"]]}.get(args[0], [])
    if args[0] == "collect" and "--model" in args:
        defaults = ["--task", env["task"]]
    if args[0] == "collect" and "--task" in args:
        defaults = ["--model", env["model"]]
    r = runner.invoke(app, [*args, *defaults, "--store", env["store"]] if args[0] != "eval" else args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr


def test_help_has_examples() -> None:
    for cmd in ("collect", "ls", "inspect", "verify", "eval", "tasks", "distill"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples" in r.stdout, cmd
