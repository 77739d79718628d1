"""The matrix covers every command, and a torn results line is a warning, not a refusal."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import typer.main

import tests.bad_input
from cli.main import app
from tests.bad_input.conftest import runner


def test_every_command_is_in_the_matrix() -> None:
    cases = []
    for mod in pkgutil.iter_modules(tests.bad_input.__path__):
        cases += getattr(importlib.import_module(f"tests.bad_input.{mod.name}"), "CASES", [])
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    covered = {c[0].split("-")[0] for c in cases}
    assert len(cases) > 100 and commands <= covered, commands - covered


def test_report_warns_about_a_torn_results_line_naming_file_and_line(world: dict[str, Any]) -> None:
    """results.jsonl is an append-only log: a line torn by a crash is skipped with a warning that
    names the file and line (not refused), so one crash never hides a whole sweep."""
    r = runner.invoke(app, ["report", world["sweep"], "--json"])
    msg = " ".join(r.stderr.split())
    assert r.exit_code == 0, msg
    assert "results.jsonl:2" in msg and "skipped" in msg
