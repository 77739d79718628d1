"""Bad input to `collect`: exit 2 naming the culprit, nothing touched (see ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bad_input.conftest import Case, check, col, params

CASES: list[Case] = [
    ("collect-unknown-task", col("--task", "no_such_task"), ["--task no_such_task"]),
    ("collect-empty-task", col("--task", ""), ["--task"]),
    ("collect-malformed-jsonl", col("--task", "{d}/malformed.jsonl"), ["malformed.jsonl", ":3:"]),
    (
        "collect-empty-target",
        col("--task", "{d}/empty_target.jsonl"),
        ["empty_target.jsonl", ":2:", "target"],
    ),
    ("collect-missing-target", col("--task", "{d}/no_target.jsonl"), ["no_target.jsonl", ":2:", "target"]),
    ("collect-empty-file", col("--task", "{d}/empty.jsonl"), ["empty.jsonl"]),
    ("collect-unknown-model", col("--model", "{d}/no_model"), ["--model", "no_model"]),
    ("collect-model-is-a-file", col("--model", "{file}"), ["--model", "a_file"]),
    ("collect-unknown-site", col("--site", "nope"), ["--site nope"]),
    ("collect-unknown-layer", col("--layers", "99"), ["--layers 99"]),
    ("collect-bad-layers", col("--layers", "0-x"), ["--layers 0-x"]),
    ("collect-n-larger-than-pool", col("--n", "1000"), ["--n 1000"]),
    ("collect-n-zero", col("--n", "0"), ["--n 0"]),
    ("collect-k-not-int", col("--k", "x"), ["--k x"]),
    ("collect-k-too-big", col("--k", "40"), ["--k 40"]),
    ("collect-prompt-too-long", col("--task", "{d}/long.jsonl", "--n", "2"), ["context"]),
    ("collect-bad-dtype", col("--dtype", "int4"), ["--dtype int4"]),
    ("collect-bad-response", col("--response", "x"), ["--response x"]),
    ("collect-bad-positions", col("--positions", "x"), ["--positions x"]),
    ("collect-batch-zero", col("--batch-size", "0"), ["--batch-size 0"]),
    ("collect-shard-rows", col("--shard-rows", "7"), ["--shard-rows 7"]),
    ("collect-template", col("--template", "no slot"), ["--template"]),
    ("collect-eval-fraction", col("--eval-fraction", "1.5"), ["--eval-fraction 1.5"]),
    ("collect-store-is-a-file", col("--store", "{file}"), ["--store", "a_file"]),
    ("collect-store-under-a-file", col("--store", "{file}/store"), ["--store", "a_file"]),
]


@params(CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    world: dict[str, Any], argv: Any, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check(world, argv, needles, monkeypatch)
