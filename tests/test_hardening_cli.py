"""Hardening, classes 1, 3 and 6: output folders are never clobbered, every number is bounded
before anything is allocated or written, and no command ends in a traceback (Ctrl-C included).
The property-based test at the end drives every command with generated flag values."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from ia2cache.outputs import LOCK, MARKER, OutputLock
from tests.conftest import write_task

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
WORDS = ["hot", "up", "big", "go", "ocean", "paper"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("harden")
    task = write_task(d / "task.jsonl", ((f"{WORDS[i % 6]} {i}", WORDS[(i * 5) % 6]) for i in range(40)))
    e = {"d": d, "model": str(tiny_model_dir), "task": str(task), "store": str(d / "store")}
    r = _cli(e, "collect", "--model", e["model"], "--task", e["task"], "--n", "4", "--dev", "2",
             "--store", e["store"], "--max-new-tokens", "1", "--json")
    assert r.exit_code == 0, r.output
    e["key"] = json.loads(r.stdout)["key"]
    return e


def _cli(env: dict[str, Any], *argv: str) -> Any:
    os.environ["IA2CACHE_HOME"] = str(Path(env["d"]) / "home")
    return runner.invoke(app, list(argv))


def _distill(env: dict[str, Any], out: Path, *extra: str) -> Any:
    return _cli(env, "distill", "--cache", env["key"], "--store", env["store"], "--model", env["model"],
                "--max-steps", "2", "--eval-every", "1", "--out", str(out), "--json", *extra)


def _tree(*roots: Path | str) -> str:
    """A hash of every file's path, kind and bytes under ``roots`` (links are not followed)."""
    h = hashlib.sha256()
    for root in map(Path, roots):
        for p in sorted(root.rglob("*")) if root.exists() else []:
            h.update(str(p).encode())
            if p.is_symlink():
                h.update(b"L" + os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _msg(r: Any) -> str:
    return " ".join(r.stderr.split())


# ----------------------------------------------------------------------------- 1. output folders


def test_distill_never_clobbers_a_folder_it_did_not_make(env: dict[str, Any], tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "checkpoint").mkdir(parents=True)
    (proj / "checkpoint" / "notes.txt").write_text("mine")
    (proj / "README.md").write_text("my project")
    before = _tree(proj)
    r = _distill(env, proj)
    assert r.exit_code == 2 and "not a folder ia2cache distill made" in _msg(r)
    assert "README.md" in _msg(r) and "checkpoint" in _msg(r)
    assert _tree(proj) == before


def test_another_run_into_the_same_out_is_refused_naming_the_setting(env: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "x"
    assert _distill(env, out, "--method", "tok").exit_code == 0
    (out / "my-notes.txt").write_text("added by the user")
    before = _tree(out)
    r = _distill(env, out, "--method", "act")
    assert r.exit_code == 2 and "--method: 'tok' there, 'act' now" in _msg(r)
    assert _tree(out) == before  # the first adapter and run.json are intact
    # --overwrite removes only what distill wrote there; the user's file stays.
    r = _distill(env, out, "--method", "act", "--overwrite")
    assert r.exit_code == 0, _msg(r)
    assert json.loads((out / "run.json").read_text())["config"]["method"] == "act"
    assert (out / "my-notes.txt").read_text() == "added by the user"
    # The same run again: recognised and reused, nothing rewritten.
    before = _tree(out)
    again = _distill(env, out, "--method", "act", "--overwrite")
    assert again.exit_code == 0 and json.loads(again.stdout)["reused"] is True and _tree(out) == before


def test_out_inside_a_model_folder_is_refused(env: dict[str, Any]) -> None:
    before = _tree(env["model"])
    r = _distill(env, Path(env["model"]))
    assert r.exit_code == 2 and "config.json" in _msg(r)
    assert _tree(env["model"]) == before


def test_a_second_writer_exits_at_once_naming_the_holder(env: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    with OutputLock(out / LOCK, "--out"):  # another process is writing this --out
        t0 = time.monotonic()
        r = _distill(env, out, "--method", "tok", "--max-steps", "1")
        assert time.monotonic() - t0 < 30
    assert r.exit_code == 2 and f"pid {os.getpid()}" in _msg(r)
    # The same for a sweep shard: its results file's lock is held.
    sweep = tmp_path / "sw"
    args = ("sweep", "--task", env["task"], "--model", env["model"], "--store", env["store"], "--n", "4",
            "--seeds", "0", "--methods", "tok", "--lrs", "1e-2", "--max-steps", "1", "--n-eval", "2",
            "--dev", "2", "--out", str(sweep))
    first = _cli(env, *args)
    assert first.exit_code == 0, _msg(first)
    lines = (sweep / "results.jsonl").read_text()
    with OutputLock(sweep / "results.jsonl.lock", "--out"):
        r = _cli(env, *args)
    assert r.exit_code == 2 and f"pid {os.getpid()}" in _msg(r)
    assert (sweep / "results.jsonl").read_text() == lines  # no duplicate lines


def test_report_and_analyze_write_only_into_their_own_folders(env: dict[str, Any], tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.jsonl").write_text(json.dumps({"task": "t", "n": 4, "seed": 0, "method": "tok",
                                                       "accuracy": 1.0}) + "\n")
    before = _tree(foreign)
    r = _cli(env, "report", str(foreign))
    assert r.exit_code == 2 and "not a folder ia2cache report made" in _msg(r)
    assert _tree(foreign) == before
    r = _cli(env, "analyze", "overlap", "--adapter", str(foreign), "--out", str(foreign))
    assert r.exit_code == 2 and _tree(foreign) == before


def test_a_link_planted_in_an_output_folder_is_never_written_through(env: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    assert _distill(env, out, "--method", "tok", "--max-steps", "1").exit_code == 0
    for name in ("run.json", "adapter_model.safetensors", "README.md"):
        (out / name).unlink()
        (out / name).symlink_to(victim)
    r = _distill(env, out, "--method", "tok", "--max-steps", "1", "--overwrite")
    assert victim.read_text() == "precious"
    assert r.exit_code in (0, 2), _msg(r)


# ----------------------------------------------------------------------------- 3. bounded numbers


@pytest.mark.parametrize("argv,needle", [
    (("collect", "--layers", "0-99999999999"), "--layers"),
    (("collect", "--shard-rows", "1000000000"), "--shard-rows"),
    (("collect", "--topk-logits", "100000"), "--topk-logits 100000: more than the model's vocabulary"),
    (("collect", "--seed", "-1"), "--seed -1"),
    (("collect", "--seed", str(2**64)), "--seed"),
    (("collect", "--k", "0"), "--k 0"),
    (("collect", "--n", "1"), "--n 1"),
    (("collect", "--max-new-tokens", "100000000"), "--max-new-tokens"),
    (("collect", "--eval-fraction", "nan"), "--eval-fraction"),
    (("sweep", "--seeds", "0-99999999999"), "--seeds"),
    (("sweep", "--n", "2-99999999999"), "--n"),
    (("sweep", "--lrs", "1e30,1e-3"), "--lrs"),
    (("sweep", "--lrs", "nan"), "--lrs"),
    (("distill", "--lr", "inf"), "--lr inf"),
    (("distill", "--lr", "1e30"), "--lr 1e+30"),
    (("distill", "--lr", "nan"), "--lr nan"),
    (("distill", "--seed", "-1"), "--seed -1"),
    (("distill", "--num-virtual-tokens", "-3"), "--num-virtual-tokens -3"),
    (("eval", "--base", "--n-eval", "-5"), "--n-eval"),
    (("eval", "--base", "--seed", str(2**40)), "--seed"),
])
def test_every_number_is_bounded_before_anything_is_written(env: dict[str, Any], tmp_path: Path,
                                                            argv: tuple[str, ...], needle: str) -> None:
    cmd = argv[0]
    common = {
        "collect": ("--model", env["model"], "--task", env["task"], "--n", "4",
                    "--store", str(tmp_path / "s")),
        "sweep": ("--model", env["model"], "--task", env["task"], "--store", str(tmp_path / "s"),
                  "--out", str(tmp_path / "sw")),
        "distill": ("--cache", env["key"], "--store", env["store"], "--model", env["model"],
                    "--out", str(tmp_path / "out")),
        "eval": ("--model", env["model"], "--task", env["task"]),
    }[cmd]
    before = _tree(env["store"])
    t0 = time.monotonic()
    r = _cli(env, cmd, *common, *argv[1:])  # the flag under test last: it wins over common's
    assert r.exit_code == 2, (r.exit_code, _msg(r))
    assert needle in _msg(r), _msg(r)
    assert time.monotonic() - t0 < 60  # refused up front, not after allocating
    assert not any((tmp_path / name).exists() for name in ("s", "sw", "out"))
    assert _tree(env["store"]) == before


def test_json_output_never_holds_a_bare_nan(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import emit_json

    emit_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": float("-inf")}})
    out = capsys.readouterr().out
    assert json.loads(out) == {"a": None, "b": [1.0, None], "c": {"d": None}}


# ----------------------------------------------------------------------------- 6. no tracebacks


def test_report_refuses_rows_of_the_wrong_shape_naming_the_line(env: dict[str, Any], tmp_path: Path) -> None:
    from tests.conftest import mark_as_sweep

    good = {"task": "t", "n": 4, "seed": 0, "method": "tok", "accuracy": 1.0}
    for bad, needle in (({**good, "n": "four"}, "'n' must be int"), ([1, 2], "JSON object"),
                        ({**good, "task": "../../x"}, "'task' '../../x' is not a plain name")):
        folder = mark_as_sweep(tmp_path / f"sw{len(needle)}")
        (folder / "results.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        r = _cli(env, "report", str(folder))
        assert r.exit_code == 2 and "results.jsonl:2" in _msg(r) and needle in _msg(r), _msg(r)
        assert "Traceback" not in r.output
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("cmd,point", [("collect", "collect.before_first_shard"),
                                       ("distill", "distill.after_checkpoint"),
                                       ("sweep", "distill.after_checkpoint")])
def test_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes(env: dict[str, Any], tmp_path: Path,
                                                             cmd: str, point: str) -> None:
    args = {
        "collect": ["collect", "--model", env["model"], "--task", env["task"], "--n", "6", "--dev", "2",
                    "--store", str(tmp_path / "s"), "--max-new-tokens", "1", "--json"],
        "distill": ["distill", "--cache", env["key"], "--store", env["store"], "--model", env["model"],
                    "--max-steps", "4", "--eval-every", "1", "--out", str(tmp_path / "o"), "--json"],
        "sweep": ["sweep", "--task", env["task"], "--model", env["model"], "--store", env["store"],
                  "--n", "4", "--seeds", "0", "--methods", "tok", "--lrs", "1e-2", "--max-steps", "2",
                  "--eval-every", "1", "--n-eval", "2", "--dev", "2", "--out", str(tmp_path / "sw"),
                  "--json"],
    }[cmd]
    release = tmp_path / "release"
    e = {**os.environ, "IA2CACHE_HOME": str(Path(env["d"]) / "home"), "IA2CACHE_HOLD": f"{point}:{release}",
         "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ["PYTHONPATH"]}
    p = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    reached = Path(f"{release}.reached")
    t0 = time.monotonic()
    while not reached.exists() and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    assert reached.exists(), p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    e.pop("IA2CACHE_HOLD")
    again = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=e, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


# ----------------------------------------------------------------------------- property-based

_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "x", "1e30", "nan", "-0", "0-99999999999", "3-1", "1,1", "../..", "a\x01b",
                     "all", "0", "1", "2", "4", "-1", "auto", "half", "q,k", "bf16", "int8"]),
)
_FLAGS = {
    "collect": ["--n", "--k", "--seed", "--dev", "--layers", "--max-new-tokens", "--topk-logits",
                "--batch-size", "--shard-rows", "--chunk-rows", "--eval-fraction", "--site", "--dtype",
                "--template", "--positions", "--response"],
    "distill": ["--lr", "--lr2", "--max-steps", "--eval-every", "--patience", "--min-delta", "--seed",
                "--layers", "--lora-r", "--lora-alpha", "--batch-size", "--grad-accum", "--tna-weight",
                "--method", "--adapter", "--num-virtual-tokens", "--target-modules", "--labels"],
    "eval": ["--k", "--n", "--n-eval", "--seed", "--batch-size", "--max-new-tokens", "--icl-demos",
             "--template"],
    "sweep": ["--n", "--seeds", "--lrs", "--max-steps", "--n-eval", "--dev", "--icl-k", "--workers",
              "--shard", "--patience", "--methods", "--lr-search"],
    "verify": [], "inspect": [], "ls": [], "report": [], "tasks": [],
}


def _base_argv(env: dict[str, Any], cmd: str, work: Path) -> list[str]:
    return {
        "collect": ["collect", "--model", env["model"], "--task", env["task"], "--n", "4", "--dev", "2",
                    "--max-new-tokens", "1", "--store", env["store"], "--json"],
        "distill": ["distill", "--cache", env["key"], "--store", env["store"], "--model", env["model"],
                    "--max-steps", "2", "--eval-every", "1", "--out", str(work / "adapter"), "--json"],
        "eval": ["eval", "--task", env["task"], "--model", env["model"], "--base", "--n-eval", "3", "--json"],
        "sweep": ["sweep", "--task", env["task"], "--model", env["model"], "--store", env["store"],
                  "--n", "4", "--seeds", "0", "--methods", "tok", "--lrs", "1e-2", "--max-steps", "1",
                  "--n-eval", "2", "--dev", "2", "--out", str(work / "sweep"), "--json"],
        "verify": ["verify", env["key"], "--store", env["store"], "--json"],
        "inspect": ["inspect", env["key"], "--store", env["store"], "--json"],
        "ls": ["ls", "--store", env["store"], "--json"],
        "report": ["report", str(work / "sweep"), "--json"],
        "tasks": ["tasks", "--json"],
    }[cmd]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_command_with_generated_flags_exits_cleanly(env: dict[str, Any], tmp_path_factory: Any,
                                                          data: st.DataObject) -> None:
    """Any flag value: exit 0, 1, 2 or 130, one line on stderr (no traceback), and the store, the
    adapter and the sweep folders unchanged unless the command succeeded."""
    cmd = data.draw(st.sampled_from(sorted(_FLAGS)), label="command")
    work = tmp_path_factory.mktemp("prop")
    argv = _base_argv(env, cmd, work)
    for flag in data.draw(st.lists(st.sampled_from(_FLAGS[cmd]), max_size=2, unique=True), label="flags") \
            if _FLAGS[cmd] else []:
        argv += [flag, data.draw(_VALUES, label=flag)]
    roots = (env["store"], work)
    before = _tree(*roots)
    r = _cli(env, *argv)
    assert r.exit_code in (0, 1, 2, 130), (argv, r.exit_code, r.output[-1500:])
    assert r.exception is None or isinstance(r.exception, SystemExit), (argv, repr(r.exception))
    assert "Traceback" not in r.output, (argv, r.output[-1500:])
    if r.exit_code != 0:
        assert _tree(*roots) == before, argv
    elif "--json" in argv and r.stdout.strip():
        json.loads(r.stdout)  # valid JSON (never a bare NaN)
    assert not list(Path(env["store"]).glob("**/" + MARKER))  # outputs never land in the store
