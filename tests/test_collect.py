from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.models import load_model
from ia2cache.prompts import PromptConfig, build_pairs
from ia2cache.sites import SITES, decoder_layers
from ia2cache.store import Cache, decode_activations
from ia2cache.tasks import load_task
from tests.conftest import mixed_length_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    return mixed_length_env(tmp_path_factory, tiny_model_dir, "collect")


@pytest.fixture(scope="module")
def loaded(env: dict[str, Any]) -> Any:
    return load_model(env["model"], device="cpu")


def _cfg(env: dict[str, Any], store: Path, **kw: Any) -> CollectConfig:
    base = dict(model=env["model"], task=env["task"], n=12, k=3, dev=6, store=str(store), dtype="fp32",
                batch_size=4, shard_rows=8, chunk_rows=4)
    base.update(kw)
    return CollectConfig(**base)


def _arrays(path: str) -> dict[str, np.ndarray]:
    c = Cache.open(path)
    return {p: c.read(p, 0, c.n_rows) for p in c.specs}


def _hook_reference(model: Any, site: str, layer: int, seq: list[int], pos: list[int]) -> torch.Tensor:
    """The activation computed by a plain forward at batch size 1 with a forward hook."""
    got: dict[str, torch.Tensor] = {}
    mod = SITES[site].module(decoder_layers(model)[layer])
    h = mod.register_forward_hook(lambda m, a, o: got.__setitem__("x", o))
    with torch.no_grad():
        model(input_ids=torch.tensor([seq]))
    h.remove()
    return got["x"][0, pos]


@pytest.mark.parametrize("response,t", [("icl", 1), ("icl", 3), ("target", 2)])
def test_batched_equals_unbatched_and_hook_reference(env: dict[str, Any], loaded: Any, tmp_path: Path,
                                                     response: str, t: int) -> None:
    a = collect(_cfg(env, tmp_path / "a", response=response, max_new_tokens=t, batch_size=8), loaded)
    b = collect(_cfg(env, tmp_path / "b", response=response, max_new_tokens=t, batch_size=1), loaded)
    assert a.key == b.key  # batch size is not part of the key
    xa, xb = _arrays(a.cache), _arrays(b.cache)
    for p in xa:
        if p.startswith("acts/"):
            np.testing.assert_allclose(xa[p], xb[p], atol=2e-5, rtol=1e-4, err_msg=p)
        else:
            np.testing.assert_array_equal(xa[p], xb[p], err_msg=p)
    # Against a plain bs=1 forward with hooks, on the stored response.
    for r in (0, 5, 13):
        ids = list(xa["tokens/teacher_ids"][r, : xa["tokens/teacher_len"][r]])
        resp = list(xa["tokens/response_ids"][r, : xa["tokens/response_len"][r]])
        n = xa["tokens/positions_len"][r]
        pos = list(xa["tokens/teacher_positions"][r, :n])
        ref = _hook_reference(loaded.model, "attn", 2, ids + resp, pos)
        np.testing.assert_allclose(xa["acts/attn"][r, 2, :n], ref.numpy(), atol=2e-5, rtol=1e-4)
        assert not xa["acts/attn"][r, 2, n:].any()  # pads are zero
        if response == "icl":  # the response is the teacher's greedy continuation
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([ids + resp])).logits[0]
            greedy = logits[[len(ids) - 1 + j for j in range(len(resp))]].argmax(-1).tolist()
            assert resp == greedy


def test_positions_and_tokens_match_prompt_pairs(env: dict[str, Any], loaded: Any, tmp_path: Path) -> None:
    res = collect(_cfg(env, tmp_path, response="target", max_new_tokens=2, positions="query+response"),
                  loaded)
    x = _arrays(res.cache)
    task = load_task(env["task"])
    pairs = build_pairs(task, loaded.tokenizer, PromptConfig(n=12, k=3, seed=0, dev=6)).rows
    assert res.rows == len(pairs) == 18
    for r, p in enumerate(pairs):
        n_resp = min(2, len(p.label_ids(2)))  # gold labels: target, then the stop (T > 1)
        tp, sp = p.positions(n_resp, "query+response")
        n = x["tokens/positions_len"][r]
        assert n == len(tp) == p.query_len - 1 + n_resp
        assert list(x["tokens/teacher_positions"][r, :n]) == tp
        assert list(x["tokens/student_positions"][r, :n]) == sp
        assert list(x["tokens/student_ids"][r, : x["tokens/student_len"][r]]) == list(p.student_ids)
        assert x["tokens/teacher_len"][r] - 1 == tp[p.query_len - 1]  # hand-computed: last prompt token
        assert x["rows/split"][r] == (0 if p.split == "train" else 1)
        assert task.pool[x["rows/example_index"][r]].id == p.example_id


@pytest.mark.parametrize("site", sorted(SITES))
def test_sites_and_layer_subsets_give_right_shapes(env: dict[str, Any], loaded: Any, tmp_path: Path,
                                                   site: str) -> None:
    res = collect(_cfg(env, tmp_path, site=site, layers="0,2-3", max_new_tokens=2, topk_logits=4), loaded)
    c = Cache.open(res.cache)
    acts = sorted(p for p in c.specs if p.startswith("acts/"))
    assert acts == [f"acts/{site}"]  # one array, the layers along its second axis
    assert c.read(acts[0], 0, 3).shape == (3, 3, 2, 64)
    assert np.array_equal(c.read(acts[0], 0, 3, layers=[3])[:, 0], c.read(acts[0], 0, 3)[:, 2])
    assert c.read("logits/topk_ids", 0, 3).shape == (3, 2, 4)
    assert c.manifest["site"] == site and c.manifest["layers"] == [0, 2, 3]
    x = _arrays(res.cache)
    r, n = 4, x["tokens/positions_len"][4]
    ids = list(x["tokens/teacher_ids"][r, : x["tokens/teacher_len"][r]])
    resp = list(x["tokens/response_ids"][r, : x["tokens/response_len"][r]])
    ref = _hook_reference(loaded.model, site, 3, ids + resp, list(x["tokens/teacher_positions"][r, :n]))
    np.testing.assert_allclose(x[f"acts/{site}"][r, 2, :n], ref.numpy(), atol=2e-5, rtol=1e-4)  # layer 3


def test_bf16_store_is_bit_exact_rounding_of_fp32(env: dict[str, Any], loaded: Any, tmp_path: Path) -> None:
    f32 = _arrays(collect(_cfg(env, tmp_path / "f", dtype="fp32"), loaded).cache)
    b16 = collect(_cfg(env, tmp_path / "b", dtype="bf16"), loaded)
    c = Cache.open(b16.cache)
    raw = c.read("acts/attn", 0, c.n_rows)
    assert raw.dtype == np.uint16
    want = torch.from_numpy(f32["acts/attn"]).to(torch.bfloat16).view(torch.uint16).numpy()
    np.testing.assert_array_equal(raw, want)


def test_reuse_does_no_model_work_and_resume_only_missing(env: dict[str, Any], tmp_path: Path) -> None:
    lm = load_model(env["model"], device="cpu")
    calls = {"n": 0}
    orig = lm.model.forward

    def counting(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return orig(*a, **k)

    lm.model.forward = counting
    cfg = _cfg(env, tmp_path, batch_size=4, shard_rows=4, chunk_rows=4)
    first = collect(cfg, lm)
    assert not first.reused and first.status == "complete" and calls["n"] == 5  # 18 rows / 4
    calls["n"] = 0
    again = collect(cfg, lm)
    assert again.reused and calls["n"] == 0 and again.key == first.key
    # Drop two shards' ledger entries (as if killed before them): only those are recomputed.
    c = Cache.open(first.cache)
    for s in (1, 3):
        (c.path / "ledger" / f"shard_{s:06d}.json").unlink()
    m = json.loads((c.path / "zarr.json").read_text())
    m["attributes"]["manifest"]["status"] = "partial"
    (c.path / "zarr.json").write_text(json.dumps(m))
    before = _arrays(first.cache)
    resumed = collect(cfg, lm)
    assert not resumed.reused and resumed.shards_computed == 2 and calls["n"] == 2
    after = _arrays(first.cache)
    for p in before:
        np.testing.assert_array_equal(before[p], after[p], err_msg=p)


def test_key_changes_with_what_changes_the_data(env: dict[str, Any], loaded: Any, tmp_path: Path) -> None:
    base = _cfg(env, tmp_path)
    keys = {collect(base, loaded).key}
    for change in ({"seed": 1}, {"site": "mlp"}, {"layers": "0-1"}, {"dtype": "bf16"}, {"n": 10}):
        keys.add(collect(replace(base, **change), loaded).key)
    assert len(keys) == 6


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"site": "nope"}, "--site nope"),
        ({"layers": "0-9"}, "--layers 0-9: layer 9 does not exist"),
        ({"layers": "a"}, "--layers a"),
        ({"n": 500}, "--n 500"),
        ({"response": "x"}, "--response x"),
        ({"dtype": "int4"}, "--dtype int4"),
        ({"max_new_tokens": 0}, "--max-new-tokens 0"),
        ({"shard_rows": 6}, "--shard-rows 6"),
        ({"k": 40}, "--k 40"),
        ({"k": 11, "max_new_tokens": 2000}, "exceeds the model's context"),
    ],
)
def test_bad_collect_input(env: dict[str, Any], loaded: Any, tmp_path: Path, kw: dict[str, Any],
                           needle: str) -> None:
    with pytest.raises(IA2Error, match=needle):
        collect(_cfg(env, tmp_path, **kw), loaded)
    assert not any((tmp_path).glob("*/zarr.json"))  # nothing half-made


def test_fp16_overflow_refused_and_nothing_marked_complete(env: dict[str, Any], tmp_path: Path) -> None:
    lm = load_model(env["model"], device="cpu")
    with torch.no_grad():
        decoder_layers(lm.model)[1].self_attn.o_proj.weight.mul_(1e6)
    with pytest.raises(IA2Error, match="fp16"):
        collect(_cfg(env, tmp_path, dtype="fp16"), lm)
    (cache,) = [p.parent for p in tmp_path.glob("*/zarr.json")]
    assert Cache.open(cache).status == "partial"


_CHILD = """
import sys
from ia2cache.collect import CollectConfig, collect
m, t, s = sys.argv[1:4]
collect(CollectConfig(model=m, task=t, n=30, k=4, store=s, batch_size=2, shard_rows=2, chunk_rows=2,
                      max_new_tokens=2, topk_logits=3))
"""


def _run_child(env: dict[str, Any], store: Path, fault: str | None) -> subprocess.CompletedProcess:
    script = env["dir"] / "child.py"
    script.write_text(_CHILD)
    e = dict(os.environ)
    e.pop("IA2CACHE_FAULT", None)
    if fault:
        e["IA2CACHE_FAULT"] = fault
    return subprocess.run([sys.executable, str(script), env["model"], env["task"], str(store)],
                          env=e, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def clean_run(env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("clean")
    clean = _run_child(env, store, None)
    assert clean.returncode == 0, clean.stderr
    (ref,) = [p.parent for p in store.glob("*/zarr.json")]
    return ref


@pytest.mark.parametrize(
    ("fault", "partial"),
    [
        # T=2 with top-k logits; tests/test_faults.py kills at every fault point.
        ("store.mid_shard:7", True),  # between two arrays of one shard
        ("store.before_ledger:11", True),  # shard written, ledger entry not yet
    ],
)
def test_sigkill_then_rerun_is_bit_identical(env: dict[str, Any], tmp_path: Path, clean_run: Path,
                                            fault: str, partial: bool) -> None:
    killed = _run_child(env, tmp_path / "killed", fault)
    assert killed.returncode == -signal.SIGKILL
    (cache,) = [p.parent for p in (tmp_path / "killed").glob("*/zarr.json")]
    assert Cache.open(cache).status == ("partial" if partial else "complete")
    rerun = _run_child(env, tmp_path / "killed", None)
    assert rerun.returncode == 0, rerun.stderr
    ref = clean_run
    assert ref.name == cache.name
    a, b = _arrays(str(ref)), _arrays(str(cache))
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(a[p], b[p], err_msg=p)
    assert Cache.open(cache).verify() == [] and Cache.open(cache).status == "complete"


def test_readme_store_drawing_matches_a_real_cache(env: dict[str, Any], loaded: Any, tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- store-layout -->", 1)[1].split("```")[1]
    drawn = set()
    for line in block.splitlines()[2:]:
        m = re.match(r"[│├└─ ]+(\S+)", line)
        if m:
            drawn.add(m.group(1))
    res = collect(_cfg(env, tmp_path, topk_logits=3), loaded)
    cache = Cache.open(res.cache)
    real = {re.sub(r"^(acts|scales)/attn$", r"\1/<site>", p) for p in cache.specs}
    real.add("scales/<site>")  # drawn for --dtype int8 only
    real.add("ledger/shard_NNNNNN.json")
    assert drawn == real
    assert all(re.fullmatch(r"shard_\d{6}\.json", p.name) for p in (cache.path / "ledger").iterdir())


def test_how_to_read_and_the_readme_recipe_rebuild_values_with_numpy_and_zarr_alone(
    env: dict[str, Any], loaded: Any, tmp_path: Path
) -> None:
    """inspect's how-to-read and the README's NumPy snippet, run against a real bf16 cache, give
    exactly the values ia2cache itself decodes."""
    from typer.testing import CliRunner

    from cli.main import app

    res = collect(_cfg(env, tmp_path, max_new_tokens=2, dtype="bf16"), loaded)
    cache = Cache.open(res.cache)
    text = json.loads(CliRunner().invoke(app, ["inspect", res.cache, "--json"]).stdout)["how_to_read"]
    assert "acts/attn[r, l, j]" in text and "(a.astype(np.uint32) << 16).view(np.float32)" in text
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = readme.split("<!-- store-layout -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(snippet.replace("<store>/<key>", res.cache), scope)  # noqa: S102 - the README's own code
    want = decode_activations(cache.read("acts/attn", 0, 8, layers=[cache.manifest.layers[2]])[:, 0],
                              "bfloat16").float().numpy()
    assert np.array_equal(scope["x"], want) and scope["n"] == cache.read("tokens/positions_len", 0, 1)[0]


def test_disk_full_gives_a_clear_error_leaves_partial_and_resumes(env: dict[str, Any], loaded: Any,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import ia2cache.store.locations as store_mod  # where the ledger's writes go through

    cfg = _cfg(env, tmp_path, shard_rows=4, chunk_rows=4)
    real = store_mod.write_json_atomic
    calls = {"n": 0}

    def full_after_two(path: Path, obj: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(store_mod, "write_json_atomic", full_after_two)
    with pytest.raises(IA2Error, match="No space left on device.*partial with 2 of 5 shards"):
        collect(cfg, loaded)
    (cache,) = [p.parent for p in tmp_path.glob("*/zarr.json")]
    assert Cache.open(cache).status == "partial"
    monkeypatch.setattr(store_mod, "write_json_atomic", real)
    done = collect(cfg, loaded)
    assert done.status == "complete" and done.shards_computed == 3
    assert Cache.open(cache).verify() == []


def test_icl_capture_inside_decoding_equals_teacher_forced_pass(env: dict[str, Any], loaded: Any,
                                                                tmp_path: Path) -> None:
    """icl with T>1 captures during the KV-cached greedy decode (no second pass): every stored
    value must equal a teacher-forced bs-1 forward over prompt + response, query positions and
    top-k log-probs included, and the responses must equal transformers' own generate."""
    from ia2cache.collect import Teacher
    from ia2cache.padding import pad

    res = collect(_cfg(env, tmp_path, response="icl", max_new_tokens=4, positions="query+response",
                       topk_logits=5, batch_size=8), loaded)
    x = _arrays(res.cache)
    model, tok = loaded.model, loaded.tokenizer
    for r in range(res.rows):
        ids = [int(i) for i in x["tokens/teacher_ids"][r, : x["tokens/teacher_len"][r]]]
        resp = [int(i) for i in x["tokens/response_ids"][r, : x["tokens/response_len"][r]]]
        n = x["tokens/positions_len"][r]
        pos = [int(p) for p in x["tokens/teacher_positions"][r, :n]]
        ref = _hook_reference(model, "attn", 1, ids + resp, pos)
        np.testing.assert_allclose(x["acts/attn"][r, 1, :n], ref.numpy(), atol=2e-5, rtol=1e-4)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids + resp])).logits[0, pos].log_softmax(-1)
        v, ix = logp.topk(5, dim=-1)
        np.testing.assert_allclose(x["logits/topk_values"][r, :n], v.numpy(), atol=1e-4)
        assert (x["logits/topk_ids"][r, :n] == ix.numpy()).mean() > 0.99  # ties may swap
        # transformers' generate, one row at a time, gives the same greedy response.
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, min_new_tokens=1,
                             do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert out[: len(resp)] == resp
    # One prefill plus at most T-1 one-token steps per micro-batch: no teacher-forced second pass.
    teacher = Teacher(model, tok, "attn", [0], 0)
    pairs = list(build_pairs(load_task(env["task"]), tok, PromptConfig(n=12, k=3, seed=0, dev=6)).rows[:8])
    teacher.run(pairs, 4, "icl", "response", "", 4)
    assert 1 <= teacher.forwards <= 4
    ids, mask = pad([list(p.teacher_ids) for p in pairs], tok.pad_token_id, left=True)
    assert teacher.tokens <= int(mask.sum()) + 3 * len(pairs)


def test_decode_stops_at_the_token_that_ends_the_response_and_bars_eos_first(loaded: Any) -> None:
    from ia2cache.collect import Teacher
    from ia2cache.prompts import response_length

    tok = loaded.tokenizer
    teacher = Teacher(loaded.model, tok, "attn", [0], 0)
    assert tok.eos_token_id in teacher.eos
    ids = tok.encode("up\n", add_special_tokens=False)
    # The token that completes the stop string ends the row at once, not one step later.
    assert teacher._finished(ids, "\n") and not teacher._finished(ids[:-1], "\n")
    assert response_length(tok, ids + [5, 6], "\n", teacher.eos) == len(ids)
    assert teacher._finished([7, tok.eos_token_id], "")
    logits = torch.zeros((2, len(tok)))
    logits[:, tok.eos_token_id] = 10.0
    logits[1, 3] = 5.0
    first = teacher._greedy(logits, first=True)
    assert tok.eos_token_id not in first and first[1] == 3
    assert teacher._greedy(logits, first=False) == [tok.eos_token_id] * 2


def test_a_cache_written_with_the_earlier_codecs_resumes_and_repairs_keeping_them(
        env: dict[str, Any], loaded: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches written before every array went uncompressed (blosc-lz4 activations, blosc-zstd token
    arrays) keep their codecs when collect resumes or repairs them: the codec is not in the key."""
    import ia2cache.collect as collect_mod

    now = collect_mod.cache_arrays

    def earlier(**kw: Any) -> Any:
        return [replace(s, codec="lz4" if s.path.startswith("acts/") else "zstd") for s in now(**kw)]

    monkeypatch.setattr(collect_mod, "cache_arrays", earlier)
    first = collect(_cfg(env, tmp_path / "store"), loaded)
    monkeypatch.setattr(collect_mod, "cache_arrays", now)
    path = Path(first.cache)
    acts = next(p for p in Cache.open(path).specs if p.startswith("acts/"))
    want = Cache.open(path).read(acts, 0, 8)
    shard = path / acts / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # damage: verify finds it, repair recomputes the shard
    shard.write_bytes(bytes(data))
    assert Cache.open(path).verify() != []
    again = collect(_cfg(env, tmp_path / "store", repair=True), loaded)
    cache = Cache.open(again.cache)
    assert again.key == first.key and cache.status == "complete" and cache.verify() == []
    assert {s.path: s.codec for s in cache.specs.values()} == {
        p: ("lz4" if p.startswith("acts/") else "zstd") for p in cache.specs}
    np.testing.assert_array_equal(cache.read(acts, 0, 8), want)  # recomputed bit for bit
