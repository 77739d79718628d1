"""The import rules in ``.importlinter`` hold, and a forbidden import breaks them (so `make lint`
can fail): checked on a copy of the packages with one forbidden import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [str(LINT), "--config", str(tree / ".importlinter"), "--no-cache"]
    return subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for pkg in ("ia2cache", "cli"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "builtin",
                                                                                   "model_configs"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_contracts_hold_and_a_forbidden_import_breaks_them(tree: Path) -> None:
    ok = _lint(tree)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "BROKEN" not in ok.stdout and "KEPT" in ok.stdout
    for module, line, contract in (
        ("objectives.py", "import numpy  # noqa", "Objectives import only torch"),
        ("loader.py", "import ia2cache.collect  # noqa", "The loader and distill never import collect"),
        ("report.py", "import cli.main  # noqa", "The library never imports the CLI"),
    ):
        path = tree / "ia2cache" / module
        original = path.read_text()
        path.write_text(original + f"\n{line}\n")
        broken = _lint(tree)
        path.write_text(original)
        assert broken.returncode != 0, (module, broken.stdout[-2000:])
        assert f"{contract} BROKEN" in broken.stdout, (module, broken.stdout[-2000:])
