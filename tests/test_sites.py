"""The site table: what `attn`, `attn_out`, `resid`, `mlp` and `mlp_out` capture on each
architecture, checked against plain forward hooks on a tiny random model of each family (built
in-process, nothing downloaded)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from ia2cache.collect import Teacher
from ia2cache.errors import IA2Error
from ia2cache.prompts import PromptConfig, build_pairs
from ia2cache.sites import SITE_TABLE, SITES, check_site, decoder_layers, has_post_norms
from ia2cache.tasks import load_task
from tests.conftest import WORDS, write_task

README = Path(__file__).resolve().parents[1] / "README.md"

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=0,
               bos_token_id=None, tie_word_embeddings=True)
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"head_dim": 16, "sliding_window": 8},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    # A sliding window shorter than the prompts, on layers 0 and 2: the KV-cached decode must
    # give what a plain forward gives there too.
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention"] * 2},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16},
    "olmo2": {},
}
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}


def tiny_model(arch: str, vocab: int) -> Any:
    """A random causal LM of family ``arch``, with weights large enough that every sublayer and
    norm matters (norm weights drawn too, so a post-norm is never the identity)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=vocab, **_COMMON, **ARCHS[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(request: pytest.FixtureRequest, tiny_tok: Any) -> tuple[str, Any]:
    return request.param, tiny_model(request.param, len(tiny_tok))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any) -> list[Any]:
    d = tmp_path_factory.mktemp("sites")
    task = write_task(d / "task.jsonl", ((" ".join(WORDS[: 1 + (i * 5) % 9]) + f" {i}", WORDS[(i * 3) % 5])
                                         for i in range(40)))
    rows = build_pairs(load_task(str(task)), tiny_tok, PromptConfig(n=6, k=3, seed=0, dev=2)).rows
    assert max(len(p.teacher_ids) for p in rows) > 8 + 3  # longer than the sliding window
    return list(rows[:5])


def _plain_hooks(model: Any, seq: list[int]) -> dict[str, dict[int, torch.Tensor]]:
    """Every site's output, and each layer's input, from one plain forward at batch size 1."""
    got: dict[str, dict[int, torch.Tensor]] = {name: {} for name in [*SITES, "layer_in"]}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, site in SITES.items():
            def keep(m: Any, a: Any, o: Any, name: str = name, i: int = i) -> None:
                got[name][i] = (o[0] if isinstance(o, tuple) else o)[0]

            handles.append(site.module(layer).register_forward_hook(keep))

        def pre(m: Any, args: Any, kwargs: Any, i: int = i) -> None:
            got["layer_in"][i] = (args[0] if args else kwargs["hidden_states"])[0]

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=torch.tensor([seq]))
    for h in handles:
        h.remove()
    return got


def test_post_norm_detection_matches_the_architecture(arch_model: tuple[str, Any]) -> None:
    arch, model = arch_model
    assert has_post_norms(decoder_layers(model)[0]) == (arch in POST_NORM)


def test_out_sites_are_what_the_residual_stream_receives(arch_model: tuple[str, Any],
                                                        pairs: list[Any]) -> None:
    """layer output - layer input = attn_out + mlp_out on every family; on post-norm families
    attn + mlp is something else (so the distinction the table draws is real)."""
    arch, model = arch_model
    got = _plain_hooks(model, list(pairs[0].teacher_ids))
    for i in range(model.config.num_hidden_layers):
        delta = got["resid"][i] - got["layer_in"][i]
        torch.testing.assert_close(got["attn_out"][i] + got["mlp_out"][i], delta, atol=1e-4, rtol=1e-4)
        raw = got["attn"][i] + got["mlp"][i]
        if arch in POST_NORM:
            assert (raw - delta).abs().max() > 0.1, (arch, i)
            assert not torch.allclose(got["attn"][i], got["attn_out"][i])
        else:
            torch.testing.assert_close(raw, delta, atol=1e-4, rtol=1e-4)
            assert torch.equal(got["attn"][i], got["attn_out"][i])


@pytest.mark.parametrize("site", sorted(SITES))
@pytest.mark.parametrize(("response", "t"), [("icl", 3), ("target", 2)])
def test_traced_sites_equal_plain_forward_hooks(arch_model: tuple[str, Any], pairs: list[Any], tiny_tok: Any,
                                                site: str, response: str, t: int) -> None:
    """What collect stores (nnsight, batched; with icl the KV-cached decode) equals a plain
    batch-1 forward with a hook on the site's module, at every aligned position."""
    arch, model = arch_model
    teacher = Teacher(model, tiny_tok, site, [0, 3], topk=0)
    out = teacher.run(pairs, t, response, "response", "\n", t)
    for r, p in enumerate(pairs):
        tp, _ = out["positions"][r]
        seq = list(p.teacher_ids) + list(out["responses"][r])
        got = _plain_hooks(model, seq)[site]
        for j, layer in enumerate([0, 3]):
            where = f"{arch} row {r} layer {layer}"
            torch.testing.assert_close(out["acts"][j][r, : len(tp)], got[layer][tp], atol=1e-4, rtol=1e-4,
                                       msg=lambda m, where=where: f"{where}: {m}")
            assert not out["acts"][j][r, len(tp):].any()


def test_a_model_without_the_sites_module_is_refused_by_name() -> None:
    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.Linear(2, 2)  # GPT-2 style names: no self_attn.o_proj

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])

    check_site(Model(), "resid")
    with pytest.raises(IA2Error, match=r"--site attn: Layer has no such sub-module"):
        check_site(Model(), "attn")
    with pytest.raises(IA2Error, match="--site attn_out"):
        check_site(Model(), "attn_out")


def test_the_site_table_is_in_the_readme_and_collect_help() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    text = README.read_text()
    for family, sites in SITE_TABLE.items():
        row = f"| {family} | " + " | ".join(sites[s] for s in ("attn", "attn_out", "mlp", "mlp_out", "resid"))
        assert row + " |" in text, family
    assert set(next(iter(SITE_TABLE.values()))) == set(SITES)
    result = CliRunner().invoke(app, ["collect", "--help"], env={"COLUMNS": "400"})
    help_text = re.sub(r"\s+", " ", result.output)
    for name in SITES:
        assert name in help_text
    assert "post_attention_layernorm" in help_text and "Gemma" in help_text
