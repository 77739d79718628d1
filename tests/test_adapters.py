"""Adapters: every registered entry builds a peft model whose only trainable parameters are its
own, that starts as the base model (LoRA's B is zero, IA3's scales one), and whose position
offset matches what it prepends."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ia2cache.adapters import ADAPTERS, AdapterSpec, attach, module_names, position_offset
from ia2cache.errors import IA2Error
from ia2cache.testing import tiny_llama


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_trains_only_its_own_parameters(name: str, tiny_tok: Any) -> None:
    base = tiny_llama(len(tiny_tok))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=ids).logits[0, -1].clone()
    for p in base.parameters():
        p.requires_grad_(False)
    spec = AdapterSpec(r=4, alpha=4, num_virtual_tokens=3)
    model = attach(base, name, spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    own = {"lora": "lora_", "ia3": "ia3_l", "prompt": "prompt_encoder", "prefix": "prompt_encoder"}[name]
    assert trainable and all(own in n for n in trainable), trainable
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.shape[1] == ids.shape[1] + position_offset(name, spec)
    if name in ("lora", "ia3"):  # they start as the identity: the student begins as the base model
        torch.testing.assert_close(after[0, -1], before, atol=1e-5, rtol=1e-5)


def test_module_names_and_bad_specs() -> None:
    assert module_names("q,k,o") == ["q_proj", "k_proj", "o_proj"]
    assert module_names("gate, my.module") == ["gate_proj", "my.module"]
    with pytest.raises(IA2Error, match="--target-modules"):
        module_names(" , ")
    with pytest.raises(IA2Error, match="--adapter nope"):
        attach(None, "nope", AdapterSpec())
