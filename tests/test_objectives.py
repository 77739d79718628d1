from __future__ import annotations

import math

import pytest
import torch

from ia2cache.objectives import (
    OBJECTIVES,
    SCHEDULES,
    Mix,
    StudentOut,
    Targets,
    act_loss,
    masked_mse,
    tna_loss,
    tok_loss,
    tokl_loss,
)


def test_masked_mse_by_hand() -> None:
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 3.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 0.0], [9.0, 9.0]], [[1.0, 1.0], [5.0, 7.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    # valid: row0 pos0 (1+4)/2 = 2.5 ; row1 pos0 (4+4)/2 = 4 ; row1 pos1 (0+4)/2 = 2
    assert masked_mse(s, t, mask).item() == pytest.approx((2.5 + 4 + 2) / 3)


def test_act_loss_sums_layers_and_normalises() -> None:
    s = {0: torch.ones(1, 1, 2), 3: torch.zeros(1, 1, 2)}
    t = {0: torch.zeros(1, 1, 2), 3: torch.full((1, 1, 2), 2.0)}
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert act_loss(s, t, mask).item() == pytest.approx(1.0 + 4.0)
    assert act_loss(s, t, mask, {0: 2.0, 3: 8.0}).item() == pytest.approx(0.5 + 0.5)


def test_tok_loss_by_hand() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 0.0]]])  # p = (1/4, 3/4)
    labels = torch.tensor([[1, 0]])
    mask = torch.tensor([[True, False]])
    assert tok_loss(logits, labels, mask).item() == pytest.approx(-math.log(0.75))


def test_tokl_loss_by_hand() -> None:
    # V = 4, k = 2. Teacher: p(0)=0.5, p(2)=0.3, rest 0.2 spread -> 0.1 on tokens 1 and 3.
    topk_logp = torch.log(torch.tensor([[[0.5, 0.3]]]))
    topk_ids = torch.tensor([[[0, 2]]])
    q = torch.tensor([0.4, 0.2, 0.2, 0.2])
    logits = torch.log(q).view(1, 1, 4)
    p = torch.tensor([0.5, 0.1, 0.3, 0.1])
    want = float((p * (p.log() - q.log())).sum())
    got = tokl_loss(logits, topk_logp, topk_ids, torch.ones(1, 1, dtype=torch.bool)).item()
    assert got == pytest.approx(want, rel=1e-5)
    # Zero when the student equals the teacher's completed distribution.
    same = tokl_loss(p.log().view(1, 1, 4), topk_logp, topk_ids, torch.ones(1, 1, dtype=torch.bool))
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_tna_weights() -> None:
    assert tna_loss(torch.tensor(2.0), torch.tensor(10.0), 0.25).item() == pytest.approx(1.5 + 2.5)


def test_schedules_use_registered_objectives() -> None:
    assert SCHEDULES["a2t"] == ("act", "tok") and SCHEDULES["t2a"] == ("tok", "act")
    for phases in SCHEDULES.values():
        assert all(p in OBJECTIVES for p in phases)


def _inputs(v: int = 7) -> tuple[StudentOut, Targets]:
    g = torch.Generator().manual_seed(0)
    out = StudentOut(acts={0: torch.randn(2, 3, 4, generator=g), 2: torch.randn(2, 3, 4, generator=g)},
                     logits=torch.randn(2, 2, v, generator=g), topk_logits=torch.randn(2, 3, v, generator=g))
    probs = torch.softmax(torch.randn(2, 3, v, generator=g), -1)
    top_v, top_i = probs.log().topk(3, dim=-1)
    tgt = Targets(mask=torch.tensor([[True, True, False], [True, False, False]]),
                  acts={0: torch.randn(2, 3, 4, generator=g), 2: torch.randn(2, 3, 4, generator=g)},
                  labels=torch.tensor([[1, 2], [3, 0]]),
                  label_mask=torch.tensor([[True, True], [True, False]]),
                  topk_values=top_v, topk_ids=top_i)
    return out, tgt


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_is_a_finite_loss_with_gradients_where_it_reads(name: str) -> None:
    import inspect

    cls = OBJECTIVES[name]
    assert cls.name == name and cls.description
    kwargs = {"weight": 0.5} if "weight" in inspect.signature(cls).parameters else {}
    obj = cls(**kwargs)
    out, tgt = _inputs()
    for t in (*out.acts.values(), out.logits, out.topk_logits):
        t.requires_grad_(True)
    loss = obj.loss(out, tgt)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert (out.acts[0].grad is not None) == cls.needs_acts
    assert (out.logits.grad is not None) == (cls.needs_logits and not cls.needs_topk)
    assert (out.topk_logits.grad is not None) == cls.needs_topk


def test_mix_equals_its_two_halves_weighed() -> None:
    out, tgt = _inputs()
    mix = Mix(weight=0.3, scale=0.1)
    terms = mix.terms(out, tgt)
    assert terms["act"].item() == pytest.approx(act_loss(out.acts, tgt.acts, tgt.mask).item())
    want = 0.7 * 0.1 * terms["act"].item() + 0.3 * terms["tok"].item()
    assert mix.loss(out, tgt).item() == pytest.approx(want)
