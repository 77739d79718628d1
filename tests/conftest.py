from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ia2cache.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tok: Any) -> Any:
    return tiny_llama(len(tiny_tok))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path
