"""Activation sites: where in each decoder layer the teacher and student are compared.

A registry of (name -> accessor). An accessor takes one decoder layer (a torch module, or its
nnsight Envoy, which mirrors the module tree) and returns the sub-module whose *output* is the
activation. The same accessor serves nnsight tracing in collect and forward hooks in distill.

What each site captures, per architecture (``SITE_TABLE``; tested against plain forward hooks on
a tiny random model of each, ``tests/test_sites.py``). Pre-norm models (Llama, Mistral, SmolLM,
Qwen2, Qwen3) add a sublayer's output to the residual stream as it is; models with *post-norms*
(Gemma 2/3, OLMo 2) pass it through one more RMSNorm first (Gemma 3:
``x + post_attention_layernorm(o_proj(...))``), so there ``attn`` is not what the residual
receives: ``attn_out`` is. On Gemma 3 270M the ``attn`` outputs of layers 0-1 reach |x| 72 and
56 against 3-13 later, so they dominate a summed act loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ia2cache.errors import IA2Error


@dataclass(frozen=True)
class Site:
    name: str
    description: str
    module: Callable[[Any], Any]


def has_post_norms(layer: Any) -> bool:
    """Whether a decoder layer normalises each sublayer's output before the residual add (Gemma
    2/3, OLMo 2: they have ``post_feedforward_layernorm``, and then ``post_attention_layernorm``
    is the attention output's norm, not, as in Llama, the norm before the MLP)."""
    return hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm")


def _attn_out(layer: Any) -> Any:
    return layer.post_attention_layernorm if has_post_norms(layer) else layer.self_attn.o_proj


def _mlp_out(layer: Any) -> Any:
    return layer.post_feedforward_layernorm if has_post_norms(layer) else layer.mlp


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site("attn", "self-attention output after o_proj (the paper's): before the residual add, and "
             "on post-norm models (Gemma) before the post-attention norm too",
             lambda layer: layer.self_attn.o_proj),
        Site("attn_out", "what the attention sublayer adds to the residual stream: after the "
             "post-attention norm on Gemma 2/3 and OLMo 2, equal to attn elsewhere", _attn_out),
        Site("resid", "decoder layer output: the residual stream", lambda layer: layer),
        Site("mlp", "MLP output (down_proj): before the residual add, and on post-norm models "
             "before the post-feedforward norm too", lambda layer: layer.mlp),
        Site("mlp_out", "what the MLP sublayer adds to the residual stream: after the "
             "post-feedforward norm on Gemma 2/3 and OLMo 2, equal to mlp elsewhere", _mlp_out),
    )
}

SITE_TABLE: dict[str, dict[str, str]] = {
    "Llama, Mistral, SmolLM2, Qwen2, Qwen3 (pre-norm)": {
        "attn": "o_proj output = what the residual receives",
        "attn_out": "the same module as attn",
        "mlp": "mlp output (down_proj) = what the residual receives",
        "mlp_out": "the same module as mlp",
        "resid": "decoder layer output",
    },
    "Gemma 2, Gemma 3, OLMo 2 (post-norms)": {
        "attn": "o_proj output, before post_attention_layernorm",
        "attn_out": "post_attention_layernorm output = what the residual receives",
        "mlp": "mlp output (down_proj), before post_feedforward_layernorm",
        "mlp_out": "post_feedforward_layernorm output = what the residual receives",
        "resid": "decoder layer output",
    },
}
"""What each site captures per architecture family (README and ``collect --help`` show it)."""


def site_table_text() -> str:
    """``SITE_TABLE`` as plain lines, for help text."""
    lines = []
    for family, sites in SITE_TABLE.items():
        lines.append(f"{family}: " + "; ".join(f"{k} = {v}" for k, v in sites.items()))
    return "\n".join(lines)


def get_site(name: str) -> Site:
    if name not in SITES:
        raise IA2Error(f"--site {name}: unknown site; choose one of {', '.join(SITES)}")
    return SITES[name]


def check_site(model: Any, name: str) -> None:
    """Refuse, naming the site and the architecture, a model whose layers lack the site's module
    (before any trace or hook, where an AttributeError would say much less)."""
    layer = decoder_layers(model)[0]
    try:
        get_site(name).module(layer)
    except AttributeError as exc:
        raise IA2Error(f"--site {name}: {type(layer).__name__} has no such sub-module ({exc}); "
                       f"the sites know Llama-, Qwen- and Gemma-style layers") from None


def decoder_layers(model: Any) -> Any:
    """The list of decoder layers of a Llama-family causal LM (also through peft or nnsight)."""
    inner = model
    for attr in ("base_model", "model"):
        # peft: PeftModel.base_model.model; HF: ForCausalLM.model.layers
        if hasattr(inner, attr) and not hasattr(inner, "layers"):
            cand = getattr(inner, attr)
            if cand is not None:
                inner = cand
    for path in (("layers",), ("model", "layers"), ("model", "model", "layers")):
        obj = inner
        try:
            for p in path:
                obj = getattr(obj, p)
            return obj
        except AttributeError:
            continue
    raise IA2Error(f"model {type(model).__name__}: cannot find its decoder layers (model.layers)")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``all`` or a list of indices and ranges, e.g. ``0-5,7``; sorted and de-duplicated."""
    if spec.strip() == "all":
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part[1:] else (int(part), int(part))
            if lo > hi:
                raise ValueError(part)
            # Checked before the range is built: 0-99999999999 costs nothing.
            for i in (lo, hi):
                if not 0 <= i < n_layers:
                    raise IA2Error(f"--layers {spec}: layer {i} does not exist (the model has {n_layers})")
            out.update(range(lo, hi + 1))
    except ValueError:
        raise IA2Error(f"--layers {spec}: expected 'all' or indices like 0-5,7") from None
    if not out:
        raise IA2Error(f"--layers {spec}: names no layer")
    return sorted(out)


class StopForward(Exception):
    """Raised by :class:`Capture`'s hook at ``stop_at``: the rest of the forward is skipped."""


class Capture:
    """Forward hooks that keep the site output of each chosen layer for one forward pass: the one
    capture distill (the student's activations) and analyze (the similarity) share.

    ``on`` switches it (off, the hooks do nothing); ``stop_at`` makes the hook of that layer raise
    :class:`StopForward`, so a forward that needs nothing after the last captured layer stops
    there. Use as a context manager to remove the hooks after.
    """

    def __init__(self, model: Any, site: str, layers: list[int], stop_at: int | None = None) -> None:
        mods = decoder_layers(model)
        self.out: dict[int, Any] = {}
        self.on = True
        self.stop_at = stop_at
        self.handles = [get_site(site).module(mods[i]).register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, layer: int) -> Any:
        def hook(_mod: Any, _args: Any, output: Any) -> None:
            if self.on:
                self.out[layer] = output[0] if isinstance(output, tuple) else output
                if self.stop_at == layer:
                    raise StopForward

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def capture(model: Any, site: str, layers: list[int], stop_at: int | None = None) -> Capture:
    """The site outputs of ``layers`` during ``model``'s forward passes (see :class:`Capture`)."""
    return Capture(model, site, layers, stop_at)
