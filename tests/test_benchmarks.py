"""The benchmark scripts are not run in CI (they take minutes), but they must keep importing:
a library refactor that breaks one should fail here, not on a GPU machine."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py")
                 if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_and_has_main(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"
    assert "python -m benchmarks." in (module.__doc__ or ""), f"benchmarks/{name}.py: no launch line"


def test_there_are_benchmarks() -> None:
    assert {"collect_vs_reference", "capture_overhead", "loader_throughput", "sweep_reuse",
            "storage", "memory"} <= set(SCRIPTS)
