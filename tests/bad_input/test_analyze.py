"""Bad input to `analyze`: exit 2 naming the culprit, nothing touched (see ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bad_input.conftest import Case, check, cmd, params

CASES: list[Case] = [
    (
        "analyze-similarity-unknown-cache",
        cmd("analyze", "similarity", "--cache", "0123456789abcdef", "--store", "{store}", "--out", "{d}/an1"),
        ["0123456789abcdef"],
    ),
    (
        "analyze-similarity-dotdot",
        cmd("analyze", "similarity", "--cache", "../elsewhere", "--store", "{store}", "--out", "{d}/an2"),
        ["outside the store"],
    ),
    (
        "analyze-similarity-symlink-escape",
        cmd("analyze", "similarity", "--cache", "escape_cache", "--store", "{store}", "--out", "{d}/an3"),
        ["outside the store"],
    ),
    (
        "analyze-similarity-partial",
        cmd("analyze", "similarity", "--cache", "{partial}", "--store", "{store}", "--out", "{d}/an4"),
        ["{partial}", "not complete"],
    ),
    (
        "analyze-similarity-adapter-missing",
        cmd(
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
        cmd(
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
        cmd(
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
        cmd("analyze", "overlap", "--adapter", "{d}/no_adapter", "--adapter", "{adapter}", "--out",
            "{d}/an8"),
        ["--adapter", "no_adapter"],
    ),
    (
        "analyze-overlap-not-an-adapter",
        cmd("analyze", "overlap", "--adapter", "{cache}", "--adapter", "{adapter}", "--out", "{d}/an9"),
        ["--adapter", "{cache}"],
    ),
    (
        "analyze-overlap-torn-run-json",
        cmd("analyze", "overlap", "--adapter", "{d}/adapter_badrun", "--out", "{d}/an10"),
        ["{d}/adapter_badrun/run.json", "JSON"],
    ),
    (
        "analyze-similarity-torn-run-json",
        cmd("analyze", "similarity", "--cache", "{key}", "--store", "{store}", "--adapter",
           "{d}/adapter_badrun", "--out", "{d}/an11"),
        ["{d}/adapter_badrun/run.json", "JSON"],
    ),
    (
        "analyze-overlap-name-escapes-out",
        cmd("analyze", "overlap", "--adapter", "{adapter}", "--name", "../../x", "--out", "{d}/an12/sub"),
        ["--name", "../../x"],
    ),
    (
        "analyze-similarity-name-escapes-out",
        cmd("analyze", "similarity", "--cache", "{key}", "--store", "{store}", "--name", "../x", "--out",
           "{d}/an13"),
        ["--name", "../x"],
    ),
    (
        "analyze-overlap-out-under-a-file",
        cmd("analyze", "overlap", "--adapter", "{adapter}", "--adapter", "{adapter}", "--out", "{file}/x"),
        ["--out", "a_file"],
    ),
]


@params(CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    world: dict[str, Any], argv: Any, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check(world, argv, needles, monkeypatch)
