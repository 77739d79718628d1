"""Activation sites: where in each decoder layer the teacher and student are compared.

A registry of (name -> accessor). An accessor takes one decoder layer (a torch module, or its
nnsight Envoy, which mirrors the module tree) and returns the sub-module whose *output* is the
activation. The same accessor serves nnsight tracing in collect and forward hooks in distill.
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


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site("attn", "self-attention output after o_proj, before the residual add (the paper's)",
             lambda layer: layer.self_attn.o_proj),
        Site("resid", "decoder layer output: the residual stream", lambda layer: layer),
        Site("mlp", "MLP output, before the residual add", lambda layer: layer.mlp),
    )
}


def get_site(name: str) -> Site:
    if name not in SITES:
        raise IA2Error(f"--site {name}: unknown site; choose one of {', '.join(SITES)}")
    return SITES[name]


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
