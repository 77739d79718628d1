"""Integrity: a loader reading damaged chunks refuses, naming the array and rows (or, told to, trains
without those rows), and a teacher that writes NaN/Inf is stopped before its shard is written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.models import load_model
from ia2cache.store import Cache
from tests.conftest import mixed_length_env

ROOT = Path(__file__).resolve().parent.parent
ACTS = "acts/attn"  # every layer of the activations: one array


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    return mixed_length_env(tmp_path_factory, tiny_model_dir, "integrity")


@pytest.fixture(scope="module")
def loaded(env: dict[str, Any]) -> Any:
    return load_model(env["model"], device="cpu")


def _cfg(env: dict[str, Any], store: Path, **kw: Any) -> CollectConfig:
    """30 train + 15 dev rows; shards of 8 rows in chunks of 4."""
    base: dict[str, Any] = dict(model=env["model"], task=env["task"], n=30, k=3, store=str(store),
                                dtype="bf16", batch_size=4, shard_rows=8, chunk_rows=4, max_new_tokens=2,
                                topk_logits=3)
    base.update(kw)
    return CollectConfig(**base)


@pytest.fixture(scope="module")
def clean(env: dict[str, Any], loaded: Any) -> Path:
    return Path(collect(_cfg(env, env["dir"] / "store"), loaded).cache)


def _shard_file(cache: Path, array: str, shard: int) -> Path:
    arr = Cache.open(cache).array(array)
    return cache / array / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def _flip(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 8):
        raw[i] ^= 0xFF
    p.write_bytes(bytes(raw))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete(p: Path) -> None:
    p.unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": _flip, "truncate": _truncate, "delete": _delete}
# (array, shard): the activations, a token array, the top-k logits; shard 1 = rows [8, 16).
TARGETS = [(ACTS, 1), ("tokens/student_ids", 1), ("logits/topk_values", 2)]


def _damaged_copy(clean: Path, tmp_path: Path, array: str, shard: int, how: str) -> Path:
    cache = tmp_path / clean.name
    shutil.copytree(clean, cache)
    DAMAGE[how](_shard_file(cache, array, shard))
    return cache


def _verify_rows(cache: Path, array: str) -> set[int]:
    """The rows ``verify`` (the independent oracle) reports damaged in ``array``."""
    out: set[int] = set()
    for p in Cache.open(cache).verify():
        assert p.array == array, p
        out.update(range(*p.rows))
    return out


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize(("array", "shard"), TARGETS)
def test_loader_refuses_a_damaged_chunk_naming_array_and_rows(clean: Path, tmp_path: Path, array: str,
                                                              shard: int, how: str) -> None:
    cache = _damaged_copy(clean, tmp_path, array, shard, how)
    bad = _verify_rows(cache, array)
    assert bad and bad <= set(range(8 * shard, 8 * shard + 8))
    with pytest.raises(IA2Error) as e:
        for _ in CacheLoader(cache, LoaderConfig(batch_size=4)):
            pass
    msg = str(e.value)
    m = re.search(rf"array {re.escape(array)} rows \[(\d+), (\d+)\) are damaged", msg)
    assert m, msg
    assert set(range(int(m[1]), int(m[2]))) <= bad  # a chunk verify also names
    assert "--skip-damaged" in msg and str(cache) in msg


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize(("array", "shard"), TARGETS)
def test_skip_damaged_drops_exactly_those_rows_and_keeps_the_rest_intact(
    clean: Path, tmp_path: Path, array: str, shard: int, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _damaged_copy(clean, tmp_path, array, shard, how)
    bad = _verify_rows(cache, array)
    for split, rows in (("train", range(0, 30)), ("dev", range(30, 45))):
        cfg = LoaderConfig(batch_size=4, split=split, skip_damaged=True, shuffle=split == "train")
        with caplog.at_level("WARNING", logger="ia2cache.loader"):
            loader = CacheLoader(cache, cfg)
        want = sorted(set(rows) - bad)
        assert loader.skipped_rows == len(set(rows) & bad)
        if loader.skipped_rows:
            assert f"skipping {loader.skipped_rows} of {len(rows)} {split} rows" in caplog.text
        plain = CacheLoader(clean, LoaderConfig(batch_size=1, split=split, shuffle=False))
        reference = {int(b.rows[0]): b for b in plain}
        for epoch in range(2):  # the second epoch comes from memory: still without those rows
            batches = list(loader)
            assert len(batches) == len(loader) == -(-len(want) // 4), epoch
            got = [int(r) for b in batches for r in b.rows]
            assert sorted(got) == want  # every good row once, no damaged row
            for b in batches:
                for i, r in enumerate(b.rows.tolist()):
                    ref = reference[r]
                    for layer, a in b.acts.items():
                        assert torch.equal(a[i], ref.acts[layer][0]), (r, layer)
                    assert torch.equal(b.topk_values[i], ref.topk_values[0])
                    n = int(b.student_len[i])
                    assert b.student_ids[i, :n].tolist() == ref.student_ids[0, :n].tolist()


def test_every_row_damaged_is_refused_even_when_skipping(clean: Path, tmp_path: Path) -> None:
    cache = tmp_path / clean.name
    shutil.copytree(clean, cache)
    for s in range(3, 6):  # rows 24..44: all dev rows (30..44)
        _delete(_shard_file(cache, ACTS, s))
    with pytest.raises(IA2Error, match="every dev row is damaged"):
        CacheLoader(cache, LoaderConfig(split="dev", skip_damaged=True))


def test_a_swapped_shard_file_passes_crc32c_but_not_sha256(clean: Path, tmp_path: Path) -> None:
    """Another shard's file in place of shard 1's is intact for zarr's crc32c (every chunk matches its
    own crc), so a plain read takes it; the ledger's sha256 does not match it: verify, the loader
    with ``checksums`` and the ``skip_damaged`` scan all name it."""
    cache = tmp_path / clean.name
    shutil.copytree(clean, cache)
    shutil.copyfile(_shard_file(cache, ACTS, 2), _shard_file(cache, ACTS, 1))
    assert {p.rows for p in Cache.open(cache).verify()} == {(8, 12), (12, 16)}
    assert len(list(CacheLoader(cache, LoaderConfig(batch_size=4)))) == 8  # crc32c alone: no damage seen
    with pytest.raises(IA2Error, match=r"array acts/attn rows \[(8|12), (12|16)\) are damaged: checksum"):
        list(CacheLoader(cache, LoaderConfig(batch_size=4, checksums=True)))
    assert CacheLoader(cache, LoaderConfig(batch_size=4, skip_damaged=True)).skipped_rows == 8


def test_an_intact_cache_reads_the_same_with_and_without_checksums(clean: Path) -> None:
    on = list(CacheLoader(clean, LoaderConfig(batch_size=4, seed=3, checksums=True)))
    off = list(CacheLoader(clean, LoaderConfig(batch_size=4, seed=3)))
    assert [b.rows.tolist() for b in on] == [b.rows.tolist() for b in off]
    for x, y in zip(on, off, strict=True):
        assert all(torch.equal(x.acts[i], y.acts[i]) for i in x.acts)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_distill_cli_refuses_damage_and_skips_it_with_the_flag(env: dict[str, Any], clean: Path,
                                                              tmp_path: Path) -> None:
    cache = _damaged_copy(clean, tmp_path, ACTS, 1, "flip")
    bad = _verify_rows(cache, ACTS)
    args = ["distill", "--cache", str(cache), "--model", env["model"], "--method", "act", "--epochs", "1",
            "--lr", "1e-3", "--json"]
    refused = _cli(*args, "--out", str(tmp_path / "a"))
    assert refused.returncode == 2, refused.stderr
    msg = " ".join(refused.stderr.split())
    assert f"array {ACTS} rows [" in msg and "--skip-damaged" in msg and "Traceback" not in msg
    assert not (tmp_path / "a" / "run.json").exists()
    done = _cli(*args, "--out", str(tmp_path / "b"), "--skip-damaged")
    assert done.returncode == 0, done.stderr
    assert f"skipping {len(bad)} of 30 train rows" in " ".join(done.stderr.split())
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["skipped_damaged_rows"] == {"train": len(bad), "dev": 0}


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_from_the_teacher_stops_collect_naming_layer_and_row(
    env: dict[str, Any], loaded: Any, clean: Path, tmp_path: Path, value: float
) -> None:
    """A hook poisons layer 1's attention input for one row of the third forward pass (the first
    batch of shard 1). collect stops before writing shard 1, names layer 1 and that row, and
    leaves the cache partial; with the teacher fixed, the rerun completes to the clean cache."""
    c = Cache.open(clean)
    lens = c.read("tokens/teacher_len", 8, 16)
    expect_row = 8 + sorted(range(8), key=lambda i: (int(lens[i]), i))[1]  # by-length order, element 1
    calls = {"n": 0}

    def poison(_m: Any, _a: Any, o: torch.Tensor) -> torch.Tensor | None:
        calls["n"] += 1
        if calls["n"] != 3:  # response=target: one traced forward per batch of 4, 2 per shard
            return None
        o = o.clone()
        o[1] = value
        return o

    cfg = _cfg(env, tmp_path, response="target")
    # On the norm before layer 1's attention: nnsight saves module outputs before forward hooks
    # run, so a hook on the site module itself would only show from layer 2 on.
    hook = loaded.model.model.layers[1].input_layernorm.register_forward_hook(poison)
    try:
        with pytest.raises(IA2Error) as e:
            collect(cfg, loaded)
    finally:
        hook.remove()
    msg = str(e.value)
    assert "non-finite activations" in msg and "layer 1," in msg and f"rows [{expect_row}]" in msg, msg
    counts = re.search(r"\((\d+) NaN, (\d+) Inf\)", msg)  # inf through attention becomes NaN
    assert counts and int(counts[1]) + int(counts[2]) > 0
    (path,) = [p.parent for p in tmp_path.glob("*/zarr.json")]
    cache = Cache.open(path)
    assert cache.status == "partial" and cache.done_shards() == {0}
    assert any(p.reason == "missing (partial cache)" and p.rows == (8, 16) for p in cache.verify())
    done = collect(cfg, loaded)  # the teacher fixed: the rerun computes the missing shards only
    assert done.status == "complete" and done.shards_computed == cache.n_shards - 1
    assert Cache.open(path).verify() == []


def test_collect_cli_with_a_nan_model_exits_2_and_leaves_no_complete_cache(env: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(env["model"])
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[0, 0] = float("nan")
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(env["model"]).save_pretrained(bad)
    r = _cli("collect", "--model", str(bad), "--task", env["task"], "--n", "8", "--shard-rows", "8",
             "--response", "target", "--max-new-tokens", "1", "--store", str(tmp_path / "store"), "--json")
    assert r.returncode == 2, r.stderr
    msg = " ".join(r.stderr.split())
    assert "non-finite activations" in msg and "layer 2," in msg and "Traceback" not in msg
    assert r.stdout == ""
    (path,) = [p.parent for p in (tmp_path / "store").glob("*/zarr.json")]
    assert Cache.open(path).status == "partial" and not Cache.open(path).done_shards()
    v = _cli("verify", str(path), "--json")
    assert v.returncode == 1 and not json.loads(v.stdout)["ok"]


def test_verify_reports_nan_recorded_in_a_ledger(clean: Path, tmp_path: Path) -> None:
    """NaN that reached a ledger by another route (an older ia2cache, a hand-written cache): the
    stats keep the count and verify reports it as a problem."""
    cache = tmp_path / clean.name
    shutil.copytree(clean, cache)
    entry_path = cache / "ledger" / "shard_000002.json"
    entry = json.loads(entry_path.read_text())
    entry["arrays"][ACTS]["stats"][1]["nan_count"] = 7  # layer 1 (the cache holds layers 0-3)
    entry_path.write_text(json.dumps(entry))
    c = Cache.open(cache)
    assert c.stats(ACTS, 1)["nan_count"] == 7 and c.stats(ACTS, 2)["nan_count"] == 0
    probs = c.verify()
    assert [(p.array, p.rows, p.reason) for p in probs] == [
        (ACTS, (16, 24), "7 NaN values written by the teacher at layer 1")]


@pytest.mark.parametrize(("exc", "damage"), [(RuntimeError("blosc: decompression error"), True),
                                             (AttributeError("a bug, not damage"), False),
                                             (KeyError("a bug, not damage"), False)])
def test_skip_damaged_skips_decode_errors_but_never_hides_a_bug(
    clean: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception, damage: bool
) -> None:
    """Under --skip-damaged, only what a damaged chunk raises (codec/zarr/IA2Error) drops rows; any
    other exception while reading is a bug and must propagate instead of silently losing rows."""
    real = Cache.read

    def read(self: Cache, path: str, start: int, stop: int, layers: Any = None) -> Any:
        if path == ACTS and start < 12 and stop > 8:  # the chunk of rows [8, 12)
            raise exc
        return real(self, path, start, stop, layers)

    monkeypatch.setattr(Cache, "read", read)
    cfg = LoaderConfig(batch_size=4, split="train", skip_damaged=True, shuffle=False)
    if damage:
        loader = CacheLoader(clean, cfg)
        assert loader.skipped_rows == 4
        rows = sorted(int(r) for b in loader for r in b.rows)
        assert rows == sorted(set(range(30)) - set(range(8, 12)))
    else:
        with pytest.raises(type(exc), match="a bug"):
            CacheLoader(clean, cfg)
