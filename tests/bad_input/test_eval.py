"""Bad input to `eval`: exit 2 naming the culprit, nothing touched (see ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bad_input.conftest import Case, check, cmd, params

CASES: list[Case] = [
    (
        "eval-two-modes",
        cmd("eval", "--icl", "--base", "--model", "{model}", "--task", "{task}"),
        ["--icl", "--base"],
    ),
    (
        "eval-unknown-task",
        cmd("eval", "--base", "--model", "{model}", "--task", "no_such_task"),
        ["--task no_such_task"],
    ),
    (
        "eval-malformed-jsonl",
        cmd("eval", "--base", "--model", "{model}", "--task", "{d}/malformed.jsonl"),
        ["malformed.jsonl", ":3:"],
    ),
    (
        "eval-empty-target",
        cmd("eval", "--base", "--model", "{model}", "--task", "{d}/empty_target.jsonl"),
        ["empty_target.jsonl", ":2:"],
    ),
    (
        "eval-unknown-model",
        cmd("eval", "--base", "--model", "{d}/no_model", "--task", "{task}"),
        ["--model", "no_model"],
    ),
    (
        "eval-k-larger-than-pool",
        cmd("eval", "--icl", "--icl-demos", "pool", "--k", "500", "--model", "{model}", "--task", "{task}"),
        ["--k 500"],
    ),
    (
        "eval-k-larger-than-n",
        cmd("eval", "--icl", "--n", "4", "--k", "5", "--model", "{model}", "--task", "{task}"),
        ["--k 5", "N=4"],
    ),
    (
        "eval-icl-without-n",
        cmd("eval", "--icl", "--model", "{model}", "--task", "{task}"),
        ["--n", "--icl-demos pool"],
    ),
    (
        "eval-n-eval-zero",
        cmd("eval", "--base", "--n-eval", "0", "--model", "{model}", "--task", "{task}"),
        ["--n-eval 0"],
    ),
    (
        "eval-prompt-too-long",
        cmd("eval", "--base", "--model", "{model}", "--task", "{d}/long.jsonl"),
        ["context"],
    ),
    (
        "eval-adapter-missing",
        cmd("eval", "--adapter", "{d}/no_adapter", "--task", "{task}"),
        ["--adapter", "no_adapter"],
    ),
    ("eval-adapter-is-a-cache", cmd("eval", "--adapter", "{cache}", "--task", "{task}"), ["--adapter"]),
    (
        "eval-adapter-torn-run-json",
        cmd("eval", "--adapter", "{d}/adapter_badrun", "--task", "{task}"),
        ["{d}/adapter_badrun/run.json", "JSON"],
    ),
    (
        "eval-adapter-on-other-model",
        cmd("eval", "--adapter", "{adapter}", "--model", "{other}", "--task", "{task}"),
        ["--adapter", "--model", "fingerprint"],
    ),
]


@params(CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    world: dict[str, Any], argv: Any, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check(world, argv, needles, monkeypatch)
