"""Training objectives: IA2's activation alignment and the token-level baselines.

An objective is a registered class (``OBJECTIVES``, name -> class) that says what the student
forward must give it (``needs_acts``, ``needs_logits``, ``needs_topk``) and computes its loss
from a :class:`StudentOut` (what the student produced, at the aligned and label positions) and
:class:`Targets` (what the batch asks for). ``distill`` builds one per phase, runs the forward
that its needs call for, and backpropagates ``loss``. A new objective is a class added here.
``SCHEDULES`` maps each ``--method`` onto its phases: ``a2t`` (the paper's headline IA2 -> SFT)
trains ``act`` and then continues the same adapter with ``tok`` under a fresh optimizer.

This module imports torch only (an import-linter contract).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

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
    """IA2 + SFT at once: ``(1 - w) * act + w * tok`` (``act`` already scaled, see :class:`Mix`)."""
    return (1.0 - weight) * act + weight * tok


# ----------------------------------------------------------------------------- the registry


@dataclass
class StudentOut:
    """What one student forward produced, gathered where the objectives read it."""

    acts: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per aligned layer, the site's output at the aligned positions (B, P, H)."""
    logits: torch.Tensor | None = None
    """Logits at the label positions (B, T, V), for tok."""
    topk_logits: torch.Tensor | None = None
    """Logits at the aligned positions (B, P, V), for tokl."""


@dataclass
class Targets:
    """What a batch asks of the student, on the training device."""

    mask: torch.Tensor
    """(B, P): which aligned positions are real."""
    acts: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per aligned layer, the teacher's activations (B, P, H), float."""
    labels: torch.Tensor | None = None
    """(B, T) token labels (gold, or the teacher's responses with ``--labels icl``)."""
    label_mask: torch.Tensor | None = None
    """(B, T): which labels are real."""
    topk_values: torch.Tensor | None = None
    """(B, P, K) the teacher's top-k log-probs."""
    topk_ids: torch.Tensor | None = None
    """(B, P, K) their token ids."""


class Objective:
    """A training objective; subclasses set the ``needs_*`` flags and ``loss``."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_acts: ClassVar[bool] = False
    """The forward must capture the site outputs of the aligned layers."""
    needs_logits: ClassVar[bool] = False
    """The forward must give logits at the label positions."""
    needs_topk: ClassVar[bool] = False
    """The forward must give logits at the aligned positions, and the cache its top-k."""

    @classmethod
    def reads_labels(cls) -> bool:
        """Whether the loss reads gold (or teacher) labels: then it trains on labelled rows only;
        otherwise (act, tokl) also on a cache's unlabelled rows."""
        return cls.needs_logits and not cls.needs_topk

    def loss(self, out: StudentOut, tgt: Targets) -> torch.Tensor:
        raise NotImplementedError


class Act(Objective):
    name, description = "act", "IA2: masked MSE to the teacher's activations, summed over layers"
    needs_acts = True

    def __init__(self, variances: dict[int, float] | None = None) -> None:
        self.variances = variances
        """Per-layer teacher variances (``--normalize``), or None."""

    def loss(self, out: StudentOut, tgt: Targets) -> torch.Tensor:
        return act_loss(out.acts, tgt.acts, tgt.mask, self.variances)


class Tok(Objective):
    name, description = "tok", "SFT: cross-entropy on the response (gold or ICL labels)"
    needs_logits = True

    def loss(self, out: StudentOut, tgt: Targets) -> torch.Tensor:
        assert out.logits is not None and tgt.labels is not None and tgt.label_mask is not None
        return tok_loss(out.logits, tgt.labels, tgt.label_mask)


class TopKL(Objective):
    name, description = "tokl", "KL to the teacher's cached top-k next-token distribution"
    needs_logits, needs_topk = True, True

    def loss(self, out: StudentOut, tgt: Targets) -> torch.Tensor:
        assert out.topk_logits is not None and tgt.topk_values is not None and tgt.topk_ids is not None
        return tokl_loss(out.topk_logits, tgt.topk_values, tgt.topk_ids, tgt.mask)


class Mix(Objective):
    """``(1-w)*c*act + w*tok``: ``c`` is tok/act on the training rows at the phase's start (set by
    distill through :meth:`terms`), so that ``w=0.5`` weighs both halves equally at step 0."""

    name, description = "tna", "(1-w)*c*act + w*tok in one objective, both halves equal at step 0"
    needs_acts, needs_logits = True, True

    def __init__(self, weight: float, variances: dict[int, float] | None = None, scale: float = 1.0) -> None:
        self.weight, self.scale = weight, scale
        self._act, self._tok = Act(variances), Tok()

    def terms(self, out: StudentOut, tgt: Targets) -> dict[str, torch.Tensor]:
        """The two halves, unweighted."""
        return {"act": self._act.loss(out, tgt), "tok": self._tok.loss(out, tgt)}

    def loss(self, out: StudentOut, tgt: Targets) -> torch.Tensor:
        t = self.terms(out, tgt)
        return tna_loss(t["act"] * self.scale, t["tok"], self.weight)


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Act, Tok, TopKL, Mix)}
"""``objective name -> class``; ``distill`` builds one per phase with the run's settings."""

SCHEDULES: dict[str, tuple[str, ...]] = {
    "act": ("act",),
    "tok": ("tok",),
    "tokl": ("tokl",),
    "tna": ("tna",),
    "a2t": ("act", "tok"),
    "t2a": ("tok", "act"),
}
"""``--method`` -> phases; each phase trains to early stopping with a fresh optimizer."""
