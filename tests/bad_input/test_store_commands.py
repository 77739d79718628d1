"""Bad input to `ls`, `inspect`, `verify`, `migrate`: exit 2 naming the culprit, nothing touched."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bad_input.conftest import Case, check, cmd, params

CASES: list[Case] = [
    ("ls-missing-store", cmd("ls", "--store", "{d}/no_store"), ["--store", "no_store"]),
    ("ls-store-is-a-file", cmd("ls", "--store", "{file}"), ["--store", "a_file"]),
    *[
        case
        for name in ("inspect", "verify", "migrate")
        for case in [
            (f"{name}-unknown-key", cmd(name, "0123456789abcdef", "--store", "{store}"),
             ["0123456789abcdef"]),
            (f"{name}-unknown-name", cmd(name, "nope", "--store", "{store}"), ["nope"]),
            (
                f"{name}-dotdot",
                cmd(name, "../elsewhere", "--store", "{store}"),
                ["outside the store", "../elsewhere"],
            ),
            (f"{name}-deep-dotdot", cmd(name, "{key}/../../x", "--store", "{store}"), ["outside the store"]),
            (
                f"{name}-abs-not-a-cache",
                cmd(name, "{d}/elsewhere/plain", "--store", "{store}"),
                ["elsewhere/plain", "not an ia2cache cache"],
            ),
            (
                f"{name}-symlink-escape",
                cmd(name, "escape", "--store", "{store}"),
                ["outside the store", "escape"],
            ),
            (
                f"{name}-symlink-to-cache-escape",
                cmd(name, "escape_cache", "--store", "{store}"),
                ["outside the store", "escape_cache"],
            ),
            (f"{name}-a-file", cmd(name, "{file}", "--store", "{store}"), ["a_file"]),
            (f"{name}-missing-store", cmd(name, "{key}", "--store", "{d}/no_store"), ["no_store"]),
        ]
    ],
]


@params(CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    world: dict[str, Any], argv: Any, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check(world, argv, needles, monkeypatch)
