"""Training objectives: IA2's activation alignment and the token-level baselines.

Each objective is a pure function of tensors gathered at aligned positions, and is registered
in ``OBJECTIVES`` with what its forward pass must provide. ``SCHEDULES`` maps each ``--method``
onto its phases: ``a2t`` (the paper's headline IA2 -> SFT) trains ``act`` and then continues the
same adapter with ``tok`` under a fresh optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions (``mask`` (B, P)) and hidden units of the squared error."""
    per_pos = (student.float() - teacher.float()).pow(2).mean(-1)
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1.0)


def act_loss(
    student: dict[int, torch.Tensor],
    teacher: dict[int, torch.Tensor],
    mask: torch.Tensor,
    variances: dict[int, float] | None = None,
) -> torch.Tensor:
    """IA2: sum over layers of the masked MSE, each divided by the teacher's per-layer variance
    when ``variances`` is given (``--normalize``)."""
    total = torch.zeros((), device=mask.device)
    for layer, s in student.items():
        mse = masked_mse(s, teacher[layer], mask)
        if variances is not None:
            mse = mse / max(float(variances[layer]), 1e-12)
        total = total + mse
    return total


def tok_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SFT: mean cross-entropy of ``labels`` (B, P) under ``logits`` (B, P, V) at valid positions."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def tokl_loss(
    logits: torch.Tensor, topk_logp: torch.Tensor, topk_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) per valid position, averaged. The teacher is its cached top-k
    log-probs; the mass left outside the top k is spread evenly over the other V - k tokens."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    v, k = logq.shape[-1], topk_logp.shape[-1]
    p_top = topk_logp.float().exp()
    rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)  # (B, P)
    p_each = rest / (v - k)
    logq_top = logq.gather(-1, topk_ids.long())
    kl_top = (p_top * (topk_logp.float() - logq_top)).sum(-1)
    logq_rest_sum = logq.sum(-1) - logq_top.sum(-1)
    log_p_each = torch.log(p_each.clamp_min(1e-30))
    kl_rest = torch.where(rest > 0, p_each * ((v - k) * log_p_each - logq_rest_sum),
                          torch.zeros_like(rest))
    kl = kl_top + kl_rest
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def tna_loss(act: torch.Tensor, tok: torch.Tensor, weight: float) -> torch.Tensor:
    """IA2 + SFT at once: ``(1 - w) * act + w * tok``."""
    return (1.0 - weight) * act + weight * tok


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    needs_acts: bool
    needs_logits: bool
    needs_topk: bool = False


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("act", "IA2: masked MSE to the teacher's activations, summed over layers", True, False),
        Objective("tok", "SFT: cross-entropy on the response (gold or ICL labels)", False, True),
        Objective("tokl", "KL to the teacher's cached top-k next-token distribution", False, True, True),
        Objective("tna", "(1-w)*act + w*tok in one objective", True, True),
    )
}

SCHEDULES: dict[str, tuple[str, ...]] = {
    "act": ("act",),
    "tok": ("tok",),
    "tokl": ("tokl",),
    "tna": ("tna",),
    "a2t": ("act", "tok"),
    "t2a": ("tok", "act"),
}
"""``--method`` -> phases; each phase trains to early stopping with a fresh optimizer."""

LossFn = Callable[..., torch.Tensor]
