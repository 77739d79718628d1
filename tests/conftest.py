from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ia2cache.testing import tiny_llama, tiny_tokenizer

# Every process the tests start arms ia2cache's fault points from IA2CACHE_FAULT/IA2CACHE_HOLD
# (tests/faults/sitecustomize.py); the library itself never does.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).parent / "faults"), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def tiny_tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tok: Any) -> Any:
    return tiny_llama(len(tiny_tok))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any) -> Path:
    """The tiny Llama and its tokenizer saved as a model directory (``--model DIR``)."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(len(tiny_tok)).save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d


def write_task(path: Path, pairs: Iterable[tuple[str, str]]) -> Path:
    """A JSONL task file from (input, target) pairs."""
    return write_jsonl(path, [json.dumps({"input": x, "target": y}) for x, y in pairs])


WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy", "The food was great"]


def mixed_length_env(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, name: str) -> dict[str, Any]:
    """A 90-example JSONL task whose inputs have very different lengths (so micro-batches mix
    short and long rows), with the tiny model: ``{"dir", "model", "task"}``."""
    d = tmp_path_factory.mktemp(name)
    write_task(d / "task.jsonl", ((" ".join(WORDS[: 1 + (i * 5) % 9]) + f" {i}", WORDS[(i * 3) % 5])
                                  for i in range(90)))
    return {"dir": d, "model": str(model_dir), "task": str(d / "task.jsonl")}


def mark_as_sweep(folder: Path) -> Path:
    """Mark a hand-made results folder as a sweep's (what `ia2cache sweep` writes first), so that
    `report` may write into it."""
    from ia2cache.outputs import MARKER

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"kind": "sweep", "settings": None, "writes": []}))
    return folder
