"""Bad input to `sweep / report`: exit 2 naming the culprit, nothing touched (see ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bad_input.conftest import Case, check, cmd, params

CASES: list[Case] = [
    (
        "sweep-unknown-task",
        cmd("sweep", "--task", "no_such_task", "--model", "{model}", "--store", "{store}", "--out", "{d}/s1"),
        ["--task no_such_task"],
    ),
    (
        "sweep-malformed-jsonl",
        cmd(
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
        cmd(
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
        cmd(
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
        cmd("sweep", "--task", "{task}", "--seeds", "x", "--model", "{model}", "--out", "{d}/s5"),
        ["--seeds x"],
    ),
    (
        "sweep-bad-lrs",
        cmd("sweep", "--task", "{task}", "--lrs", "fast", "--model", "{model}", "--out", "{d}/s6"),
        ["--lrs fast"],
    ),
    (
        "sweep-unknown-model",
        cmd("sweep", "--task", "{task}", "--model", "{d}/no_model", "--store", "{store}", "--out", "{d}/s7"),
        ["--model", "no_model"],
    ),
    (
        "sweep-out-under-a-file",
        cmd("sweep", "--task", "{task}", "--model", "{model}", "--store", "{store}", "--out", "{file}/sweep"),
        ["--out", "a_file"],
    ),
    (
        "sweep-store-under-a-file",
        cmd(
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
    ("report-missing-dir", cmd("report", "{d}/no_sweep"), ["no_sweep"]),
    ("report-no-results", cmd("report", "{d}/elsewhere"), ["results", "elsewhere"]),
]


@params(CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    world: dict[str, Any], argv: Any, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check(world, argv, needles, monkeypatch)
