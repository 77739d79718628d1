"""PEFT adapters for the student, as a registry of (name -> peft config builder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ia2cache.errors import IA2Error

_SHORT = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}


def module_names(spec: str) -> list[str]:
    """``q,k,o`` -> ``[q_proj, k_proj, o_proj]``; full module names pass through."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise IA2Error("--target-modules: give at least one module, e.g. q,k,o")
    return [_SHORT.get(n, n) for n in names]


@dataclass(frozen=True)
class AdapterSpec:
    """What the adapter builders read (distill's --lora-r, --lora-alpha, ... flags)."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 8
    """LoRA alpha (the update is scaled by alpha / r)."""
    target_modules: str = "q,k,o"
    """Modules to adapt: short names (q,k,v,o,gate,up,down) or full module names."""
    num_virtual_tokens: int = 8
    """Virtual tokens of prompt and prefix tuning."""


def _lora(s: AdapterSpec) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, bias="none",
                      target_modules=module_names(s.target_modules), task_type=TaskType.CAUSAL_LM)


def _ia3(s: AdapterSpec) -> Any:
    from peft import IA3Config, TaskType

    mods = module_names(s.target_modules)
    ff = [m for m in mods if m in ("gate_proj", "up_proj", "down_proj")]
    return IA3Config(target_modules=mods, feedforward_modules=ff, task_type=TaskType.CAUSAL_LM)


def _prompt(s: AdapterSpec) -> Any:
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(num_virtual_tokens=s.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)


def _prefix(s: AdapterSpec) -> Any:
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(num_virtual_tokens=s.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)


ADAPTERS: dict[str, Callable[[AdapterSpec], Any]] = {
    "lora": _lora, "ia3": _ia3, "prompt": _prompt, "prefix": _prefix,
}


def position_offset(adapter: str, spec: AdapterSpec) -> int:
    """Prompt tuning prepends virtual tokens to the input, shifting every hidden position."""
    return spec.num_virtual_tokens if adapter == "prompt" else 0


def attach(model: Any, adapter: str, spec: AdapterSpec) -> Any:
    """Wrap ``model`` with a fresh adapter (initialised from torch's current RNG state)."""
    from peft import get_peft_model

    if adapter not in ADAPTERS:
        raise IA2Error(f"--adapter {adapter}: choose one of {', '.join(ADAPTERS)}")
    if adapter == "ia3" and spec.target_modules == "q,k,o":
        spec = AdapterSpec(spec.r, spec.alpha, "k,v,down", spec.num_virtual_tokens)
    try:
        return get_peft_model(model, ADAPTERS[adapter](spec))
    except ValueError as exc:
        raise IA2Error(f"--target-modules {spec.target_modules}: {exc}") from exc
