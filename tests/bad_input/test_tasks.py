"""Bad input to `tasks`: exit 2 naming the culprit, nothing touched (see ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bad_input.conftest import Case, check, cmd, params

CASES: list[Case] = [
    ("tasks-unknown-flag", cmd("tasks", "--bogus"), ["--bogus"]),
]


@params(CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(
    world: dict[str, Any], argv: Any, needles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check(world, argv, needles, monkeypatch)
