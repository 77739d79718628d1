from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ia2cache.errors import IA2Error
from ia2cache.models import (
    fingerprint_dir,
    home,
    load_model,
    resolve_model,
    tokenizer_fingerprint,
)
from ia2cache.testing import tiny_llama


@pytest.fixture
def saved_models(tmp_path: Path, tiny_tok: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("IA2CACHE_HOME", str(tmp_path / "home"))
    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"m{seed}"
        tiny_llama(len(tiny_tok), seed=seed).save_pretrained(d)
        tiny_tok.save_pretrained(d)
        dirs.append(d)
    return dirs[0], dirs[1]


def test_fingerprint_stable_across_loads_and_differs_between_models(saved_models: tuple[Path, Path]) -> None:
    a, b = saved_models
    la, la2 = load_model(str(a), device="cpu"), load_model(str(a), device="cpu")
    lb = load_model(str(b), device="cpu")
    assert la.info.fingerprint == la2.info.fingerprint
    assert la.info.fingerprint != lb.info.fingerprint
    assert la.info.tokenizer_fingerprint == lb.info.tokenizer_fingerprint
    assert la.model.dtype == torch.float32
    cached = json.loads((home() / "fingerprints.json").read_text())
    assert cached[str(a.resolve())]["fingerprint"] == la.info.fingerprint


def test_fingerprint_cache_invalidated_when_weights_change(saved_models: tuple[Path, Path]) -> None:
    a, b = saved_models
    before = fingerprint_dir(a)
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    assert fingerprint_dir(a) == fingerprint_dir(b) != before


def test_tokenizer_fingerprint_sees_vocab(tiny_tok: Any) -> None:
    from ia2cache.testing import tiny_tokenizer

    assert tokenizer_fingerprint(tiny_tok) == tokenizer_fingerprint(tiny_tokenizer())
    assert tokenizer_fingerprint(tiny_tok) != tokenizer_fingerprint(tiny_tokenizer(vocab_size=400))


def test_bad_model_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IA2Error, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(IA2Error, match="is a file"):
        resolve_model(str(tmp_path / "file.bin"))
    with pytest.raises(IA2Error, match="--model nobody/no-such-model-xyz: not 'default'"):
        resolve_model("nobody/no-such-model-xyz")


@pytest.mark.integration
def test_default_model_loads_offline() -> None:
    loaded = load_model("default", device="cpu")
    cfg = loaded.model.config
    assert cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert loaded.model.dtype == torch.float32
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert 134_000_000 < n_params < 135_000_000
    tok = loaded.tokenizer
    assert tok(" Paris", add_special_tokens=False).input_ids == [7042]
    assert tok("hello").input_ids == tok("hello", add_special_tokens=False).input_ids  # no BOS
    again = load_model("default", device="cpu")
    assert again.info == loaded.info
