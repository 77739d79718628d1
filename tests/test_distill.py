from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ia2cache.distill as distill_mod
from ia2cache.adapters import ADAPTERS
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.errors import IA2Error
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.models import load_model
from ia2cache.objectives import SCHEDULES, masked_mse
from ia2cache.sites import SITES, decoder_layers
from tests.conftest import write_task

WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any, tiny_model_dir: Path) -> dict[str, Any]:
    from ia2cache.testing import tiny_llama

    d = tmp_path_factory.mktemp("distill")
    tiny_llama(len(tiny_tok), seed=7).save_pretrained(d / "other")
    tiny_tok.save_pretrained(d / "other")
    write_task(d / "task.jsonl", ((f"{WORDS[i % 8]} {i}", WORDS[(i * 3) % 8]) for i in range(80)))
    res = collect(CollectConfig(model=str(tiny_model_dir), task=str(d / "task.jsonl"), n=16, k=4,
                                store=str(d / "store"), max_new_tokens=2, topk_logits=5, dtype="fp32"))
    return {"dir": d, "model": str(tiny_model_dir), "cache": res.cache}


def _train_mse(env: dict[str, Any], model: Any) -> float:
    """Activation MSE of ``model`` (no demos) against the cached teacher on the train rows."""
    loader = CacheLoader(env["cache"], LoaderConfig(batch_size=32, shuffle=False))
    (batch,) = list(loader)
    mods = decoder_layers(model)
    got: dict[int, torch.Tensor] = {}
    hooks = [SITES["attn"].module(mods[i]).register_forward_hook(
        lambda m, a, o, i=i: got.__setitem__(i, o)) for i in loader.layers]
    seqs = [batch.student_ids[r, : batch.student_len[r]].tolist()
            + batch.response_ids[r, : batch.response_len[r] - 1].tolist() for r in range(len(batch))]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    bi = torch.arange(len(batch))[:, None]
    return sum(float(masked_mse(got[i][bi, batch.student_positions], batch.acts[i], batch.position_mask))
               for i in loader.layers)


def test_act_training_halves_train_activation_mse(env: dict[str, Any], tmp_path: Path) -> None:
    lm = load_model(env["model"], device="cpu")
    before = _train_mse(env, lm.model)
    res = distill(DistillConfig(cache=env["cache"], method="act", lr=1e-2, max_steps=60, eval_every=4,
                                patience=100, out=str(tmp_path / "act")), lm)
    after = _train_mse(env, lm.model)  # lm.model is wrapped in place: it now carries the adapter
    assert after <= 0.5 * before, (before, after)
    run = json.loads((tmp_path / "act" / "run.json").read_text())
    assert run["cache_key"] == Path(env["cache"]).name and run["epochs_run"] == res.epochs_run
    assert (tmp_path / "act" / "adapter_model.safetensors").is_file()
    # The directory loads with peft and reproduces the trained student.
    from peft import PeftModel

    fresh = PeftModel.from_pretrained(load_model(env["model"], device="cpu").model, tmp_path / "act")
    assert _train_mse(env, fresh) == pytest.approx(after, rel=1e-5)


def test_a2t_second_phase_continues_the_same_adapter(env: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[dict[str, torch.Tensor]] = []
    ends: list[dict[str, torch.Tensor]] = []
    orig = distill_mod._train_phase

    def spy(run: Any, phase: int, *a: Any, **k: Any) -> Any:
        starts.append(distill_mod._snapshot(run.model))
        out = orig(run, phase, *a, **k)
        ends.append(distill_mod._snapshot(run.model))
        return out

    monkeypatch.setattr(distill_mod, "_train_phase", spy)
    res = distill(DistillConfig(cache=env["cache"], model=env["model"], method="a2t", lr=1e-2, max_steps=12,
                                eval_every=4, patience=100, out=str(tmp_path / "a2t")))
    # Each phase: its initial state (step 0), then an evaluation every 4 steps up to the cap.
    assert [(h["objective"], h["step"]) for h in res.history] == [
        (o, s) for o in ("act", "tok") for s in (0, 4, 8, 12)]
    assert res.steps_run == [12, 12] and res.capped == [True, True]
    assert len(starts) == 2
    for name in starts[1]:
        assert torch.equal(starts[1][name], ends[0][name])  # phase 2 starts where phase 1 ended
    assert any(not torch.equal(starts[1][n], starts[0][n]) for n in starts[0])  # ... which was trained


def test_best_state_is_really_restored(env: dict[str, Any], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    at_step: dict[int, dict[str, torch.Tensor]] = {}
    orig = distill_mod._save_checkpoint

    def spy(run: Any, state: dict[str, Any], opt: Any, best: Any) -> None:
        at_step[state["step"]] = distill_mod._snapshot(run.model)  # checkpoints come at evaluations
        orig(run, state, opt, best)

    monkeypatch.setattr(distill_mod, "_save_checkpoint", spy)
    # A dev curve that is lowest at step 12 of 24 (the evaluations come at steps 0, 4, ..., 24).
    scripted = iter([6.0, 5.0, 4.0, 3.0, 3.5, 4.5, 5.5])
    monkeypatch.setattr(distill_mod, "_dev_loss", lambda run, objective: next(scripted))
    res = distill(DistillConfig(cache=env["cache"], model=env["model"], method="tok", lr=0.1, max_steps=24,
                                eval_every=4, patience=100, out=str(tmp_path / "tok")))
    dev = {h["step"]: h["dev_loss"] for h in res.history}
    best = min(dev, key=dev.__getitem__)
    last = max(dev)
    assert res.best_step == [best] and 0 < best != last, dev
    assert res.best_epoch == [(best - 1) // 4]  # 16 train rows, batch 4: 4 steps an epoch
    assert res.final["dev_loss"] == dev[best]
    saved = load_file(tmp_path / "tok" / "adapter_model.safetensors")
    best_state, last_state = at_step[best], at_step[last]
    for name, t in saved.items():
        key = next(n for n in best_state if n.replace(".default", "").endswith(name.split("base_model.")[-1]))
        assert torch.equal(t, best_state[key])
    assert any(not torch.equal(best_state[n], last_state[n]) for n in best_state)


def test_model_fingerprint_mismatch_refused(env: dict[str, Any], tmp_path: Path) -> None:
    other = str(env["dir"] / "other")
    with pytest.raises(IA2Error, match="allow-model-mismatch"):
        distill(DistillConfig(cache=env["cache"], model=other, method="act", epochs=1, out=str(tmp_path)))
    res = distill(DistillConfig(cache=env["cache"], model=other, method="act", epochs=1, out=str(tmp_path),
                                allow_model_mismatch=True))
    assert res.epochs_run == [1] and res.steps_run == [4]


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_every_method_trains_and_lowers_its_loss(env: dict[str, Any], tmp_path: Path, method: str) -> None:
    res = distill(DistillConfig(cache=env["cache"], model=env["model"], method=method, lr=1e-2, max_steps=16,
                                eval_every=4, patience=100, out=str(tmp_path / method)))
    for phase in range(len(res.epochs_run)):
        losses = [h["train_loss"] for h in res.history if h["phase"] == phase and h["step"] > 0]
        assert losses[-1] < losses[0], (method, phase, losses)


@pytest.mark.parametrize("adapter", sorted(set(ADAPTERS) - {"lora"}))
def test_other_adapters_train(env: dict[str, Any], tmp_path: Path, adapter: str) -> None:
    res = distill(DistillConfig(cache=env["cache"], model=env["model"], method="act", adapter=adapter,
                                lr=1e-2, max_steps=12, eval_every=4, patience=100,
                                out=str(tmp_path / adapter)))
    losses = [h["train_loss"] for h in res.history if h["step"] > 0]
    assert losses[-1] < losses[0]
    assert (tmp_path / adapter / "adapter_config.json").is_file()


def test_rerun_of_a_finished_run_is_reused(env: dict[str, Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DistillConfig(cache=env["cache"], model=env["model"], method="act", epochs=2, out=str(tmp_path))
    first = distill(cfg)

    def no_model(*a: Any, **k: Any) -> Any:
        raise AssertionError("a reused run must not load the model")

    def no_check(*a: Any, **k: Any) -> Any:  # a finished run in a read-only --out stays usable
        raise IA2Error(f"--out {a[0]}: is not writable")

    monkeypatch.setattr(distill_mod, "load_model", no_model)
    monkeypatch.setattr(distill_mod, "check_writable_dir", no_check)
    again = distill(cfg)
    assert again.reused and not first.reused and again.best_epoch == first.best_epoch
    # A run still to do checks --out first, before any model is loaded.
    with pytest.raises(IA2Error, match="is not writable"):
        distill(replace(cfg, out=str(tmp_path / "new")))


_CHILD = """
import sys
from ia2cache.distill import DistillConfig, distill
distill(DistillConfig(cache=sys.argv[1], model=sys.argv[2], method="a2t", lr=1e-2, max_steps=16,
                      eval_every=4, patience=100, out=sys.argv[3]))
"""


def test_sigkill_during_distill_then_resume_gives_same_weights(env: dict[str, Any], tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)

    def run(out: Path, fault: str | None) -> subprocess.CompletedProcess:
        e = {k: v for k, v in os.environ.items() if k != "IA2CACHE_FAULT"}
        if fault:
            e["IA2CACHE_FAULT"] = fault
        return subprocess.run([sys.executable, str(script), env["cache"], env["model"], str(out)],
                              env=e, capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "clean", None).returncode == 0
    killed = run(tmp_path / "killed", "distill.after_checkpoint:6")  # phase 2, step 8
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "killed" / "run.json").exists()
    done = run(tmp_path / "killed", None)
    assert done.returncode == 0, done.stderr
    a = load_file(tmp_path / "clean" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "clean" / "run.json").read_text())["history"]
    hb = json.loads((tmp_path / "killed" / "run.json").read_text())["history"]
    assert ha == hb


def test_checkpoint_of_another_cache_is_refused(env: dict[str, Any], tmp_path: Path) -> None:
    other = collect(CollectConfig(model=env["model"], task=str(env["dir"] / "task.jsonl"), n=16, k=4, seed=1,
                                  store=str(env["dir"] / "store"), max_new_tokens=2, dtype="fp32"))
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    e = {**os.environ, "IA2CACHE_FAULT": "distill.after_checkpoint:1"}
    killed = subprocess.run([sys.executable, str(script), env["cache"], env["model"], str(out)], env=e,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(IA2Error, match=r"other settings \(--cache-key"):
        distill(DistillConfig(cache=other.cache, model=env["model"], method="a2t", lr=1e-2, max_steps=16,
                              eval_every=4, patience=100, out=str(out)))


def test_a_reached_step_cap_is_recorded_as_capped(env: dict[str, Any], tmp_path: Path) -> None:
    capped = distill(DistillConfig(cache=env["cache"], model=env["model"], method="act", lr=1e-2, max_steps=8,
                                   eval_every=4, patience=100, out=str(tmp_path / "capped")))
    assert capped.capped == [True] and capped.steps_run == [8]
    # An overshooting lr stops early: patience 1 ends the phase at the first evaluation that is
    # not 1% better, long before the cap.
    early = distill(DistillConfig(cache=env["cache"], model=env["model"], method="tok", lr=0.3, max_steps=400,
                                  eval_every=4, patience=1, out=str(tmp_path / "early")))
    assert early.capped == [False] and early.steps_run[0] < 400
    run = json.loads((tmp_path / "early" / "run.json").read_text())
    assert run["capped"] == [False] and run["phases"][0]["max_steps"] == 400
    assert run["steps_run"] == early.steps_run and run["best_step"] == early.best_step


def test_tna_weighs_both_terms_equally_at_step_0(env: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, float] = {}
    orig = distill_mod._train_phase

    def spy(run: Any, phase: int, objective: str, *a: Any, **k: Any) -> Any:
        # Before any step: the mean act and tok terms over the training rows, by hand.
        run.model.eval()
        sums = {"act": 0.0, "tok": 0.0}
        with torch.no_grad():
            rows = 0
            for batch in CacheLoader(run.cache.path, LoaderConfig(batch_size=3, shuffle=False)):
                mix = distill_mod._objective(run, "tna")
                parts = mix.terms(*distill_mod._student_out(run, batch, mix))
                for key in sums:
                    sums[key] += float(parts[key]) * len(batch.rows)
                rows += len(batch.rows)
        seen.update(act=sums["act"] / rows, tok=sums["tok"] / rows)
        return orig(run, phase, objective, *a, **k)

    monkeypatch.setattr(distill_mod, "_train_phase", spy)
    res = distill(DistillConfig(cache=env["cache"], model=env["model"], method="tna", lr=1e-2, max_steps=4,
                                eval_every=4, out=str(tmp_path / "tna")))
    scale = json.loads((tmp_path / "tna" / "run.json").read_text())["tna_scale"]
    w = 0.5
    assert seen["act"] > 5 * seen["tok"] or seen["tok"] > 5 * seen["act"] or scale is not None
    # (1-w) * c * act == w * tok at step 0: both halves weigh the same.
    assert (1 - w) * scale * seen["act"] == pytest.approx(w * seen["tok"], rel=1e-4)
    assert res.steps_run == [4]


def test_a2t_first_phase_from_an_act_run_equals_training_it(env: dict[str, Any], tmp_path: Path) -> None:
    common = dict(cache=env["cache"], model=env["model"], lr=1e-2, max_steps=8, eval_every=4, patience=100)
    act = distill(DistillConfig(method="act", out=str(tmp_path / "act"), **common))
    whole = distill(DistillConfig(method="a2t", lr2=3e-2, out=str(tmp_path / "whole"), **common))
    reused = distill(DistillConfig(method="a2t", lr2=3e-2, first_phase_from=act.adapter,
                                   out=str(tmp_path / "reused"), **common))
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "reused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.history == reused.history and whole.lrs == reused.lrs == [1e-2, 3e-2]
    assert [h["phase"] for h in whole.history].count(1) == 3  # step 0, 4, 8 of phase 2
    # An act run with other settings is not this run's phase 1: refused, naming the setting.
    other = distill(DistillConfig(method="act", out=str(tmp_path / "act-lr"), **{**common, "lr": 3e-2}))
    with pytest.raises(IA2Error, match="settings differ: lr"):
        distill(DistillConfig(method="a2t", first_phase_from=other.adapter, out=str(tmp_path / "bad"),
                              **common))


def test_a_diverging_loss_stops_the_run_and_saves_no_adapter(env: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    orig = distill_mod._loss
    calls = {"n": 0}

    def blow_up(run: Any, batch: Any, objective: str) -> torch.Tensor:
        calls["n"] += 1
        loss = orig(run, batch, objective)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(distill_mod, "_loss", blow_up)
    with pytest.raises(IA2Error, match=r"diverged at phase 1 \(act\), epoch \d+, step \d+.*lower --lr"):
        distill(DistillConfig(cache=env["cache"], model=env["model"], method="act", lr=1e-2, max_steps=40,
                              eval_every=100, out=str(tmp_path / "nan")))
    assert not (tmp_path / "nan" / "run.json").exists()
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")), ("lr", 1e30),
                                         ("lr", 0.0), ("lr", -1e-3), ("lr2", float("inf")), ("seed", -1),
                                         ("seed", 2**64),
                                         ("max_steps", 0), ("eval_every", -3), ("patience", 0),
                                         ("num_virtual_tokens", -3), ("min_delta", float("nan")),
                                         ("tna_weight", float("nan"))])
def test_every_numeric_setting_is_bounded(env: dict[str, Any], field: str, value: Any) -> None:
    method = "a2t" if field == "lr2" else "act"
    with pytest.raises(IA2Error, match=f"--{field.replace('_', '-')}"):
        DistillConfig(cache=env["cache"], method=method, **{field: value})
