"""Bad input to `distill`: exit 2 naming the culprit, nothing touched (see ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bad_input.conftest import Case, check, cmd, params

CASES: list[Case] = [
    (
        "distill-unknown-cache",
        cmd("distill", "--cache", "0123456789abcdef", "--store", "{store}"),
        ["0123456789abcdef"],
    ),
    ("distill-dotdot", cmd("distill", "--cache", "../elsewhere", "--store", "{store}"),
     ["outside the store"]),
    (
        "distill-symlink-escape",
        cmd("distill", "--cache", "escape_cache", "--store", "{store}"),
        ["outside the store", "escape_cache"],
    ),
    (
        "distill-abs-not-a-cache",
        cmd("distill", "--cache", "{d}/elsewhere/plain", "--store", "{store}"),
        ["elsewhere/plain"],
    ),
    (
        "distill-partial-cache",
        cmd("distill", "--cache", "{partial}", "--store", "{store}", "--out", "{d}/o1"),
        ["--cache", "{partial}", "not complete"],
    ),
    (
        "distill-unknown-method",
        cmd("distill", "--cache", "{key}", "--store", "{store}", "--method", "nope"),
        ["--method nope"],
    ),
    (
        "distill-topk-method-without-topk",
        cmd("distill", "--cache", "{key}", "--store", "{store}", "--method", "tokl", "--out", "{d}/o2"),
        ["--method tokl", "top-k"],
    ),
    (
        "distill-unknown-adapter",
        cmd("distill", "--cache", "{key}", "--store", "{store}", "--adapter", "nope"),
        ["--adapter nope"],
    ),
    (
        "distill-unknown-labels",
        cmd("distill", "--cache", "{key}", "--store", "{store}", "--labels", "x"),
        ["--labels x"],
    ),
    (
        "distill-layer-not-in-cache",
        cmd(
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
    ("distill-bad-lr", cmd("distill", "--cache", "{key}", "--store", "{store}", "--lr", "-1"), ["--lr -1"]),
    (
        "distill-other-model",
        cmd("distill", "--cache", "{key}", "--store", "{store}", "--model", "{other}", "--out", "{d}/o4"),
        ["fingerprint", "--allow-model-mismatch"],
    ),
    (
        "distill-unknown-model",
        cmd("distill", "--cache", "{key}", "--store", "{store}", "--model", "{d}/nomodel", "--out", "{d}/o5"),
        ["--model", "nomodel"],
    ),
    (
        "distill-out-under-a-file",
        cmd("distill", "--cache", "{key}", "--store", "{store}", "--model", "{model}", "--out", "{file}/run"),
        ["--out", "a_file"],
    ),
    (
        "distill-unknown-target-modules",
        cmd(
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
]


@params(CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    world: dict[str, Any], argv: Any, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check(world, argv, needles, monkeypatch)
