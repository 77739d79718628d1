"""ia2cache.analyze: activation similarity to the cached teacher, LoRA subspace overlap, and the
eval split of collect that feeds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from ia2cache.analyze import SimilarityConfig, overlap, similarity, subspace_overlap
from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.models import load_model
from ia2cache.prompts import build_eval_pairs
from ia2cache.sites import SITES, decoder_layers
from ia2cache.tasks import load_task
from tests.conftest import mark_as_sweep, write_task

WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy"]
TARGETS = ["cold", "down small walked", "small walked", "went", "Paris France Spain", "Madrid Rome", "no",
           "yes ocean river"]

runner = CliRunner()


def _lora_dir(folder: Path, model_dir: Path, method: str, seed: int) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) B, plus a run.json like distill's."""
    from peft import LoraConfig, TaskType, get_peft_model

    lm = load_model(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"],
                     init_lora_weights=False, task_type=TaskType.CAUSAL_LM)
    peft_model = get_peft_model(lm.model, cfg)
    peft_model.save_pretrained(folder)
    run = {"model_spec": str(model_dir), "config": {"method": method, "lr": 1e-3, "adapter": "lora"},
           "cache_manifest": {"task": "task", "n": 16, "seed": 0,
                              "model": {"fingerprint": lm.info.fingerprint}}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("analyze")
    # Targets of 1 to 3+ tokens: with --response target the responses are ragged.
    write_task(d / "task.jsonl", ((f"{WORDS[i % 8]} {i}", TARGETS[(i * 3) % 8]) for i in range(80)))
    common = dict(model=str(tiny_model_dir), task=str(d / "task.jsonl"), n=16, store=str(d / "store"),
                  dtype="fp32", response="target", max_new_tokens=3, batch_size=3, shard_rows=8,
                  chunk_rows=4)
    # query+response: the per-position metrics must find the response slots after the query's.
    ev = collect(CollectConfig(**common, k=4, split="eval", n_eval=13, positions="query+response"))
    # A teacher that reads no demos (its prompt is the student's): --k 0 is refused as a user
    # setting, so this sanity-check cache is built by giving collect demo-free eval rows.
    import ia2cache.collect as collect_mod

    real = collect_mod.build_eval_pairs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(collect_mod, "build_eval_pairs",
                   lambda task, tok, k, *a, **kw: real(task, tok, 0, *a, **kw))
        k0 = collect(CollectConfig(**common, k=1, split="eval", n_eval=10))
    return {"dir": d, "model": tiny_model_dir, "eval": ev, "k0": k0, "common": common,
            "adapter": _lora_dir(d / "lora", tiny_model_dir, "act", 0),
            "adapter2": _lora_dir(d / "lora2", tiny_model_dir, "tok", 1)}


# ----------------------------------------------------------------------------- collect --split eval


def test_eval_split_rows_are_icl_eval_prompts(env: dict[str, Any], tiny_tok: Any) -> None:
    ev = env["eval"]
    assert ev.rows == 13
    g = zarr.open_group(ev.cache, mode="r")
    task = load_task(env["common"]["task"])
    pairs = build_eval_pairs(task, tiny_tok, k=4, seed=0, n_eval=13, n=16)  # demos: the N=16 train rows
    lens = g["tokens/teacher_len"][:]
    ids = g["tokens/teacher_ids"][:]
    for r, p in enumerate(pairs):
        assert ids[r, : lens[r]].tolist() == list(p.teacher_ids)
    assert set(g["rows/split"][:].tolist()) == {2}
    assert g["rows/example_index"][:].tolist() == list(range(13))  # indexes the eval split
    m = ev.manifest
    assert (m["split"], m["n_eval"], m["n_train"], m["k"]) == ("eval", 13, 0, 4)
    lengths = g["tokens/response_len"][:]
    assert lengths.min() < lengths.max()  # ragged responses, which the metrics must mask


def test_eval_split_has_its_own_key_and_is_not_trainable(env: dict[str, Any]) -> None:
    train = collect(CollectConfig(**env["common"], k=4))
    assert train.key != env["eval"].key
    assert "split" not in train.manifest["key_fields"]  # train keys are unchanged by the feature
    other = collect(CollectConfig(**env["common"], k=4, split="eval", n_eval=12))
    assert other.key != env["eval"].key
    with pytest.raises(IA2Error, match="holds eval rows"):  # an eval cache cannot be trained on
        CacheLoader(env["eval"].cache, LoaderConfig(batch_size=4))


@pytest.mark.parametrize("kwargs, flag", [({"split": "test"}, "--split"), ({"n_eval": 5}, "--n-eval"),
                                          ({"split": "eval", "n_eval": 0}, "--n-eval")])
def test_eval_split_config_refuses_bad_values(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(IA2Error, match=flag):
        CollectConfig(**kwargs)


# ----------------------------------------------------------------------------- similarity


def _by_hand(cache_dir: str, model: Any) -> dict[str, np.ndarray]:
    """Cosine and nmse computed independently: zarr reads, one unpadded row at a time, numpy."""
    g = zarr.open_group(cache_dir, mode="r")
    m = g.attrs["manifest"]
    layers, t_max = m["layers"], m["max_new_tokens"]
    slen, sids = g["tokens/student_len"][:], g["tokens/student_ids"][:]
    rlen, rids = g["tokens/response_len"][:], g["tokens/response_ids"][:]
    plen, spos = g["tokens/positions_len"][:], g["tokens/student_positions"][:]
    tlen, tpos = g["tokens/teacher_len"][:], g["tokens/teacher_positions"][:]
    teacher = {i: g["acts/attn"][:, j].astype(np.float64) for j, i in enumerate(layers)}
    mods = decoder_layers(model)
    cos: dict[int, list[float]] = {i: [] for i in layers}
    sq: dict[int, list[float]] = {i: [] for i in layers}
    cos_t = np.zeros((len(layers), t_max))
    sq_t = np.zeros((len(layers), t_max))
    n_t = np.zeros(t_max)
    all_t: dict[int, list[np.ndarray]] = {i: [] for i in layers}
    for r in range(len(slen)):
        seq = sids[r, : slen[r]].tolist() + rids[r, : rlen[r] - 1].tolist()
        got: dict[int, torch.Tensor] = {}
        hooks = [SITES["attn"].module(mods[i]).register_forward_hook(
            lambda _m, _a, o, i=i, got=got: got.__setitem__(i, o)) for i in layers]
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        for h in hooks:
            h.remove()
        n_t[: rlen[r]] += 1
        for li, i in enumerate(layers):
            s = got[i][0].double().numpy()[spos[r, : plen[r]]]
            t = teacher[i][r, : plen[r]]
            all_t[i].append(t)
            c = (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
            e = ((s - t) ** 2).sum(-1)
            cos[i] += c.tolist()
            sq[i] += e.tolist()
            for t_ in range(rlen[r]):  # response position t: teacher position tlen - 1 + t
                (j,) = np.flatnonzero(tpos[r, : plen[r]] == tlen[r] - 1 + t_)
                assert spos[r, j] == slen[r] - 1 + t_
                cos_t[li, t_] += c[j]
                sq_t[li, t_] += e[j]
    var = np.array([np.mean(((np.concatenate(all_t[i]) - np.concatenate(all_t[i]).mean(0)) ** 2).sum(-1))
                    for i in layers])
    energy = np.array([np.mean((np.concatenate(all_t[i]) ** 2).sum(-1)) for i in layers])
    return {"cosine": np.array([np.mean(cos[i]) for i in layers]),
            "nmse": np.array([np.mean(sq[i]) for i in layers]) / var,
            "rel_mse": np.array([np.mean(sq[i]) for i in layers]) / energy,
            "cosine_t": cos_t / n_t, "nmse_t": sq_t / n_t / var[:, None], "rows_t": n_t}


def test_similarity_matches_a_hand_computation(env: dict[str, Any]) -> None:
    from ia2cache.evaluate import load_adapter

    res = similarity(SimilarityConfig(cache=env["eval"].cache, adapters=(str(env["adapter"]),),
                                      batch_size=4))
    assert [e["label"] for e in res["methods"]] == ["base", "act"]
    assert res["split"] == "eval" and res["rows"] == 13 and len(res["layers"]) == 4
    base = load_model(str(env["model"]), device="cpu").model
    adapted, _, _ = load_adapter(env["adapter"], device="cpu")
    for entry, model in zip(res["methods"], (base, adapted), strict=True):
        want = _by_hand(env["eval"].cache, model)
        assert want["rows_t"].min() >= 1 and entry["by_position"]["rows"] == want["rows_t"].tolist()
        np.testing.assert_allclose(entry["cosine"], want["cosine"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(entry["nmse"], want["nmse"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(entry["rel_mse"], want["rel_mse"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(entry["by_position"]["cosine"], dtype=float), want["cosine_t"],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.array(entry["by_position"]["nmse"], dtype=float), want["nmse_t"],
                                   rtol=1e-4, atol=1e-6)
        assert entry["mean_cosine"] == pytest.approx(float(np.mean(want["cosine"])), abs=1e-5)
    # Demos change the computation: neither model is the teacher.
    assert all(c < 0.999 for e in res["methods"] for c in e["cosine"])
    assert res["methods"][0]["by_position"]["rows"][0] == 13 > res["methods"][0]["by_position"]["rows"][-1]


def test_base_model_equals_a_teacher_without_demos(env: dict[str, Any]) -> None:
    """With k=0 the teacher prompt is the student prompt: the base model is the teacher."""
    res = similarity(SimilarityConfig(cache=env["k0"].cache, adapters=(str(env["adapter"]),)))
    base, adapted = res["methods"]
    assert min(base["cosine"]) > 1 - 1e-6
    assert max(base["nmse"]) < 1e-8
    assert adapted["mean_cosine"] < 0.999 and adapted["mean_nmse"] > 1e-3


def test_similarity_refuses_an_adapter_of_another_model(env: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(env["adapter"], bad)
    run = json.loads((bad / "run.json").read_text())
    run["cache_manifest"]["model"]["fingerprint"] = "0" * 16
    (bad / "run.json").write_text(json.dumps(run))
    with pytest.raises(IA2Error, match="trained on model"):
        similarity(SimilarityConfig(cache=env["eval"].cache, adapters=(str(bad),)))
    with pytest.raises(IA2Error, match="run.json"):
        similarity(SimilarityConfig(cache=env["eval"].cache, adapters=(str(tmp_path),)))


# ----------------------------------------------------------------------------- overlap


def _fake_lora(folder: Path, bs: dict[int, torch.Tensor], r: int, d_in: int = 24, seed: int = 0) -> Path:
    """adapter_config.json + adapter_model.safetensors with the given B per layer (q_proj)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, b in bs.items():
        pre = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{pre}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
        tensors[f"{pre}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r}))
    return folder


def test_overlap_is_one_for_itself_zero_for_orthogonal_half_for_half(tmp_path: Path) -> None:
    d, r = 32, 4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    mix = torch.randn(r, r, generator=torch.Generator().manual_seed(2))  # B = basis · invertible mix
    one = _fake_lora(tmp_path / "one", {0: q[:, :r] @ mix, 1: q[:, 8:12] @ mix}, r, seed=3)
    orth = _fake_lora(tmp_path / "orth", {0: q[:, r : 2 * r] @ mix, 1: q[:, 12:16] @ mix}, r, seed=4)
    half = torch.cat([q[:, :2], q[:, 20:22]], 1)  # two directions shared with `one` in layer 0
    mixed = _fake_lora(tmp_path / "half", {0: half @ mix, 1: q[:, 16:20] @ mix}, r, seed=5)
    res = overlap([str(one), str(orth), str(mixed)])
    m = np.array(res["matrix"], dtype=float)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    assert m[0, 1] == pytest.approx(0.0, abs=1e-9)
    by_layer = {(p["a"], p["b"]): p["by_layer"] for p in res["pairs"]}
    assert by_layer[("one", "half")]["0"] == pytest.approx(0.5, abs=1e-9)
    assert by_layer[("one", "half")]["1"] == pytest.approx(0.0, abs=1e-9)
    assert m[0, 2] == pytest.approx(0.25, abs=1e-9)
    assert res["pairs"][0]["chance"] == pytest.approx(r / d)


def test_overlap_reads_real_peft_files(env: dict[str, Any]) -> None:
    res = overlap([str(env["adapter"]), str(env["adapter2"])])
    assert res["labels"] == ["act", "tok"]
    pair = next(p for p in res["pairs"] if p["a"] == "act" and p["b"] == "tok")
    assert set(pair["by_module"]) == {"q_proj", "k_proj", "o_proj"} and pair["compared"] == 12
    # Two independent random rank-4 updates: far below 1, near chance (r / d_out).
    assert res["matrix"][0][0] == pytest.approx(1.0, abs=1e-9)
    assert res["matrix"][0][1] < 0.5


def test_subspace_overlap_of_random_subspaces_is_near_chance() -> None:
    g = torch.Generator().manual_seed(0)
    vals = [subspace_overlap(torch.linalg.qr(torch.randn(256, 8, generator=g, dtype=torch.float64))[0],
                             torch.linalg.qr(torch.randn(256, 8, generator=g, dtype=torch.float64))[0])
            for _ in range(20)]
    assert np.mean(vals) == pytest.approx(8 / 256, rel=0.3)


def test_overlap_refuses_non_lora(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(IA2Error, match="needs LoRA"):
        overlap([str(tmp_path)])


# ----------------------------------------------------------------------------- CLI and report


def test_cli_writes_json_and_png_and_report_uses_them(env: dict[str, Any], tmp_path: Path) -> None:
    sweep = mark_as_sweep(tmp_path / "sweep")
    adir = sweep / "analysis"
    res = runner.invoke(app, ["analyze", "similarity", "--cache", env["eval"].cache, "--adapter",
                              str(env["adapter"]), "--adapter", str(env["adapter2"]), "--out", str(adir),
                              "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert [e["label"] for e in got["methods"]] == ["base", "act", "tok"]
    assert Path(got["files"]["png"]).stat().st_size > 1000
    assert Path(got["files"]["json"]).name == "similarity-task-n16-s0.json"
    res = runner.invoke(app, ["analyze", "overlap", "--adapter", str(env["adapter"]), "--adapter",
                              str(env["adapter2"]), "--out", str(adir), "--json"])
    assert res.exit_code == 0, res.output
    assert (adir / "overlap.png").is_file()
    rows = [{"task": "task", "method": m, "n": n, "seed": 0, "accuracy": a, "ece_equal_mass": 0.1,
             "ece_equal_width": 0.1} for m, n, a in (("base", 0, 0.1), ("act", 16, 0.4), ("tok", 16, 0.6))]
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from ia2cache.report import report

    rep = report(sweep)
    assert "How ICL-like" in rep["markdown"] and "analysis/similarity-task-n16-s0.png" in rep["markdown"]
    assert str(sweep / "task_similarity_vs_metrics.png") in rep["plots"]
    assert "LoRA subspace overlap" in rep["markdown"]


def test_cli_bad_input_exits_2(env: dict[str, Any], tmp_path: Path) -> None:
    res = runner.invoke(app, ["analyze", "overlap", "--adapter", str(tmp_path)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["collect", "--split", "test"])
    assert res.exit_code == 2 and "--split" in res.output


# ----------------------------------------------------------------------------- review fixes


def _sim_entry(method: str, n: int, cos: float, nmse: float | None) -> dict[str, Any]:
    return {"method": method, "label": method, "task": "task", "n": n, "seed": 0, "cosine": [cos, cos],
            "nmse": [nmse, nmse], "mean_cosine": cos, "mean_nmse": nmse}


def _fake_similarity(folder: Path) -> dict[str, Any]:
    sim = {"task": "task", "n": 16, "seed": 0, "k": 4, "site": "attn", "rows": 10, "split": "eval",
           "layers": [0, 1], "methods": [_sim_entry("base", 0, 0.5, 1.0), _sim_entry("act", 16, 0.9, None)]}
    (folder / "analysis").mkdir(parents=True)
    (folder / "analysis" / "similarity-task-n16-s0.json").write_text(json.dumps(sim))
    return sim


def test_scatter_pairs_similarity_with_in_distribution_rows_only(tmp_path: Path) -> None:
    """sweep --eval-task rows share task/method/N/seed with the in-distribution row; the similarity
    (measured on the training task) must pair with the in-distribution accuracy only."""
    from ia2cache.analyze import scatter_points
    from ia2cache.report import report

    sim = _fake_similarity(tmp_path)
    ind = {"task": "task", "method": "act", "n": 16, "seed": 0, "accuracy": 0.8, "ece_equal_mass": 0.1}
    ood = {**ind, "eval_task": "other", "accuracy": 0.2}
    same = {**ind, "eval_task": "task", "accuracy": 0.7}  # eval_task == task: in distribution
    for rows, want in (([ind, ood], 0.8), ([ood, ind], 0.8), ([same, ood], 0.7), ([ood], None)):
        pts = scatter_points([sim], rows)
        got = [r["accuracy"] for m, _, r in pts.get("task", []) if m == "act"]
        assert got == ([] if want is None else [want]), rows
    # The report passes results.jsonl rows as read: OOD rows alone give no scatter.
    mark_as_sweep(tmp_path)
    (tmp_path / "results.jsonl").write_text(json.dumps(ood) + "\n")
    rep = report(tmp_path)
    assert not any(p.endswith("_similarity_vs_metrics.png") for p in rep["plots"])
    (tmp_path / "results.jsonl").write_text(json.dumps(ood) + "\n" + json.dumps(ind) + "\n")
    rep = report(tmp_path)
    assert str(tmp_path / "task_similarity_vs_metrics.png") in rep["plots"]
    assert "| act | 0.900 | – |" in rep["markdown"]  # a null nMSE is shown as undefined


def test_zero_teacher_variance_writes_null_not_infinity() -> None:
    from ia2cache.analyze import _summary, _Sums

    sums = _Sums(2, 3)
    sums.cos[:] = [4.0, 3.0]
    sums.sq[:] = [2.0, 1.0]
    sums.count = 4
    sums.cos_t[:, 0] = 1.0
    sums.sq_t[:, 0] = 0.5
    sums.count_t[0] = 1
    out = _summary(sums, var=np.array([0.0, 2.0]), energy=np.array([0.0, 4.0]))
    json.dumps(out, allow_nan=False)  # valid JSON: no Infinity / NaN
    assert out["nmse"] == [None, 0.125] and out["rel_mse"] == [None, 0.0625]
    assert out["mean_nmse"] is None and out["mean_rel_mse"] is None
    assert out["mean_cosine"] == pytest.approx(0.875)
    assert out["by_position"]["nmse"][0][0] is None and out["by_position"]["nmse"][1][0] == 0.25


def test_an_empty_cache_is_an_ia2error_not_an_assertion() -> None:
    from types import SimpleNamespace

    from ia2cache.analyze import _variance

    with pytest.raises(IA2Error, match="holds no rows"):
        _variance(SimpleNamespace(n_rows=0, path="/x/cache"), None, [0], "attn", 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "a\\b", ""])
def test_names_that_leave_out_are_refused(name: str, tmp_path: Path) -> None:
    from ia2cache.analyze import check_name, save_result

    with pytest.raises(IA2Error, match="--name"):
        check_name(name)
    with pytest.raises(IA2Error, match="--name"):
        save_result({"labels": [], "matrix": [], "pairs": []}, tmp_path / "out", name, "overlap")
    assert not any(tmp_path.rglob("*.json"))
    assert check_name("similarity-task-n16-s0") == "similarity-task-n16-s0"


def test_overlap_with_a_torn_run_json_names_the_file(tmp_path: Path) -> None:
    d = _fake_lora(tmp_path / "a", {0: torch.eye(24)[:, :4]}, r=4)
    (d / "run.json").write_text('{"config": ')
    with pytest.raises(IA2Error, match=r"a/run\.json: not a readable JSON file"):
        overlap([str(d)])


def test_similarity_reads_a_cache_in_a_remote_store(env: dict[str, Any]) -> None:
    """--store memory://... (an fsspec URL) reads the same cache as the local store."""
    import fsspec

    key = env["eval"].key
    fs = fsspec.filesystem("memory")
    root = "/h2-analyze-remote/store"
    fs.put(str(env["eval"].cache), f"{root}/{key}", recursive=True)
    try:
        remote = similarity(SimilarityConfig(cache=key, store=f"memory://{root}",
                                             adapters=(str(env["adapter"]),)))
        local = similarity(SimilarityConfig(cache=key, store=env["common"]["store"],
                                            adapters=(str(env["adapter"]),)))
    finally:
        fs.rm(root, recursive=True)
    assert remote["cache"] == f"memory://{root}/{key}"
    assert remote["rows"] == local["rows"] == 13
    for r, lo in zip(remote["methods"], local["methods"], strict=True):
        assert r["cosine"] == lo["cosine"] and r["nmse"] == lo["nmse"]
