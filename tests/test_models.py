from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.models import (
    fingerprint_dir,
    home,
    load_model,
    resolve_model,
    tokenizer_fingerprint,
)
from ia2cache.testing import tiny_llama
from tests.conftest import WORDS, write_task


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
    with pytest.raises(IA2Error, match=r"empty: directory has no config.json and no \.gguf file"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(IA2Error, match="is a file but not a GGUF"):
        resolve_model(str(tmp_path / "file.bin"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(IA2Error, match=r"--model .*junk.gguf: .* is not a GGUF file"):
        resolve_model(str(tmp_path / "junk.gguf"))
    with pytest.raises(IA2Error, match="--model nobody/no-such-model-xyz: not 'default'"):
        resolve_model("nobody/no-such-model-xyz")


# ----------------------------------------------------------------------------- fingerprints


def _edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _set_rope_theta(cfg: dict[str, Any]) -> None:
    # transformers 5 writes rope_parameters; older configs have a top-level rope_theta
    if "rope_parameters" in cfg:
        cfg["rope_parameters"]["rope_theta"] = 1000.0
    else:
        cfg["rope_theta"] = 1000.0


def test_a_config_only_change_gets_a_new_fingerprint_and_cache_key(saved_models: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    """The bug: a copy with only rope_theta changed reused the original's cache (weights-only hash)."""
    a, _ = saved_models
    rope = _copy(a, tmp_path / "rope")
    _edit_json(rope / "config.json", _set_rope_theta)
    assert fingerprint_dir(rope) != fingerprint_dir(a)
    ids = torch.tensor([[5, 9, 30, 31, 40, 77, 12, 3] * 4])
    with torch.no_grad():  # it really computes something else
        la, lr = load_model(str(a), device="cpu").model, load_model(str(rope), device="cpu").model
        assert (la(ids).logits - lr(ids).logits).abs().max() > 1e-3
    task = write_task(tmp_path / "task.jsonl", ((f"{w} {i}", WORDS[i % 5]) for i, w in enumerate(WORDS * 3)))
    cfg = dict(task=str(task), n=4, k=2, dev=2, max_new_tokens=1, dtype="fp32", store=str(tmp_path / "store"))
    first = collect(CollectConfig(model=str(a), **cfg))
    other = collect(CollectConfig(model=str(rope), **cfg))
    assert other.key != first.key and not other.reused
    assert collect(CollectConfig(model=str(a), **cfg)).reused


def test_fingerprint_covers_generation_config_and_tokenizer_files_not_volatile_keys(
        saved_models: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = saved_models
    base = fingerprint_dir(a)
    # Moved, or re-saved by another transformers version under another name: the same model.
    moved = _copy(a, tmp_path / "moved")
    _edit_json(moved / "config.json", lambda c: c.update(transformers_version="9.9.9", _name_or_path="/x/y"))
    _edit_json(moved / "tokenizer_config.json", lambda c: c.update(name_or_path="/elsewhere"))
    (moved / "config.json").write_text(json.dumps(json.loads((moved / "config.json").read_text())))  # layout
    assert fingerprint_dir(moved) == base
    gen = _copy(a, tmp_path / "gen")
    _edit_json(gen / "generation_config.json", lambda c: c.update(eos_token_id=[0, 7]))
    tok = _copy(a, tmp_path / "tok")
    _edit_json(tok / "tokenizer.json", lambda c: c["added_tokens"].append(
        {**c["added_tokens"][0], "id": 483, "content": "<extra>"}))
    window = _copy(a, tmp_path / "window")
    _edit_json(window / "config.json", lambda c: c.update(sliding_window=16))
    fps = {base, fingerprint_dir(gen), fingerprint_dir(tok), fingerprint_dir(window)}
    assert len(fps) == 4


# ----------------------------------------------------------------------------- GGUF files


def write_tiny_gguf(model: Any, tok: Any, path: Path) -> Path:
    """The tiny Llama and its tokenizer as an F32 GGUF file, laid out as llama.cpp's converter
    writes one (q/k rows permuted, llama.* keys, a gpt2-style BPE vocabulary)."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in tok.all_special_tokens else gguf.TokenType.NORMAL
                       for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)

    def permute(x: np.ndarray, n_head: int) -> np.ndarray:
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
           "post_attention_layernorm": "ffn_norm"}
    for k, v in sd.items():
        if k in top:
            w.add_tensor(top[k], np.ascontiguousarray(v))
            continue
        _, _, i, *rest = k.split(".")
        mod = ".".join(rest[:-1])
        if mod == "self_attn.q_proj":
            v = permute(v, cfg.num_attention_heads)
        elif mod == "self_attn.k_proj":
            v = permute(v, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{sub[mod]}.{rest[-1]}", np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path, tiny_tok: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any]:
    monkeypatch.setenv("IA2CACHE_HOME", str(tmp_path / "home"))
    model = tiny_llama(len(tiny_tok))
    (tmp_path / "g").mkdir()
    return write_tiny_gguf(model, tiny_tok, tmp_path / "g" / "tiny-q.gguf"), model


def test_a_gguf_file_is_converted_once_and_computes_what_it_was_made_from(
        tiny_gguf: tuple[Path, Any], tiny_tok: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import logging

    gguf, original = tiny_gguf
    with caplog.at_level(logging.INFO, logger="ia2cache.models"):
        loaded = load_model(str(gguf), device="cpu")
    assert any("converting" in r.message and "tiny-q.gguf" in r.message for r in caplog.records)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    assert Path(loaded.info.path) == home() / "models" / digest
    assert loaded.info.name == "tiny-q"
    assert sorted(p.name for p in Path(loaded.info.path).glob("*.safetensors")) == ["model.safetensors"]
    text = "The food was great. hot cold up"
    ids = tiny_tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == loaded.tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    # Later: no conversion, from this path, another path to the same bytes, or its folder.
    from transformers import AutoModelForCausalLM

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("converted twice")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    assert resolve_model(str(gguf)) == ("tiny-q", Path(loaded.info.path))
    assert resolve_model(str(copy))[1] == Path(loaded.info.path)
    assert resolve_model(str(gguf.parent)) == ("tiny-q", Path(loaded.info.path))
    (gguf.parent / "second.gguf").write_bytes(gguf.read_bytes())
    with pytest.raises(IA2Error, match=r"no config.json and 2 GGUF files \(second.gguf, tiny-q.gguf\)"):
        resolve_model(str(gguf.parent))


def test_a_gguf_transformers_cannot_load_is_refused_by_name(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    monkeypatch.setenv("IA2CACHE_HOME", str(tmp_path / "home"))
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "no-such-arch")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(IA2Error, match=r"--model .*odd.gguf: transformers cannot load this GGUF"):
        resolve_model(str(tmp_path / "odd.gguf"))
    assert not any((tmp_path / "home" / "models").glob("*/config.json"))


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
    # The default model goes through the general GGUF path: a folder named by the GGUF's content.
    marker = json.loads((Path(loaded.info.path) / "ia2cache_gguf.json").read_text())
    assert marker["name"] == "SmolLM2-135M-Instruct" and marker["source"].endswith(".gguf")
