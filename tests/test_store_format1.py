"""Tests for ia2cache.store.format1: store-format-1 caches are refused with a pointer to `ia2cache
migrate`, which rewrites them as format 2 in place (same key, bit-identical values, verified), and a
kill at any point of it leaves the format-1 cache usable.

The format-1 caches are real ones, made by the last ia2cache that wrote that format
(``tests/data/make_format1_fixture.py``): a complete bf16 cache with top-k logits and a partial
fp32 one, of 12 rows in shards of 4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.store import Cache, FormatError, list_caches, migrate, verify_cache
from tests.test_faults import snapshot

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "format1_caches.tar.gz"


@pytest.fixture
def fx(tmp_path: Path) -> dict[str, Any]:
    """The fixture's store, unpacked afresh: ``{"store", "complete", "partial", "task"}``."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    meta = json.loads((tmp_path / "fixture.json").read_text())
    (tmp_path / "task.jsonl").write_text(meta["task"])
    return {"store": tmp_path / "store", "complete": meta["complete"], "partial": meta["partial"],
            "task": tmp_path / "task.jsonl"}


def _v1_values(cache: Path) -> dict[str, np.ndarray]:
    """Every array of a format-1 cache, read with zarr alone (the per-layer arrays too)."""
    m = json.loads((cache / "zarr.json").read_text())["attributes"]["manifest"]
    group = zarr.open_group(str(cache), mode="r")
    return {p: np.asarray(group[p][:]) for p in m["arrays"]}


def _files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache folder but its lock (which holds the last writer's pid)."""
    return {p.relative_to(cache).as_posix(): p.read_bytes()
            for p in sorted(cache.rglob("*")) if p.is_file() and p.name != ".lock"}


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "IA2CACHE_FAULT"}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**e, "OMP_NUM_THREADS": "1", **env})


def test_a_format1_cache_is_refused_naming_migrate(fx: dict[str, Any]) -> None:
    key, store = fx["complete"], fx["store"]
    with pytest.raises(FormatError, match=rf"store format 1 .*`ia2cache migrate {key} --store {store}`"):
        Cache.open(store / key)
    with pytest.raises(FormatError):
        verify_cache(store / key)
    listed = {m["key"]: m for m in list_caches(store)}
    assert listed[key]["format"] == 1 and listed[key]["status"] == "complete"
    r = _cli("ls", "--store", str(store))
    assert r.returncode == 0 and "format 1" in r.stdout
    assert f"ia2cache migrate {key}" in " ".join(r.stdout.split())
    r = _cli("verify", key, "--store", str(store))
    assert r.returncode == 2 and "ia2cache migrate" in " ".join(r.stderr.split()), r.stderr


def test_migrate_rewrites_a_complete_cache_with_the_same_values(fx: dict[str, Any]) -> None:
    key, store = fx["complete"], fx["store"]
    path = store / key
    before = _v1_values(path)
    v1 = json.loads((path / "zarr.json").read_text())["attributes"]["manifest"]
    r = _cli("migrate", key, "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["migrated"], res["from_format"], res["to_format"], res["status"]) == (True, 1, 2, "complete")
    assert res["shards_migrated"] == 3 and res["shards_left"] == [] and res["key"] == key
    cache = Cache.open(path)
    assert cache.manifest.format == 2 and cache.key == key and cache.verify() == []
    assert cache.manifest.diff({k: v for k, v in v1.items()
                                if k not in ("schema", "arrays", "manifest_sha256", "how_to_read")}) == []
    acts = cache.read("acts/attn", 0, cache.n_rows)
    for j, layer in enumerate(v1["layers"]):  # each layer, bit for bit, where it was
        assert np.array_equal(acts[:, j], before[f"acts/attn/layer_{layer:03d}"]), layer
    for p, want in before.items():
        if not p.startswith("acts/"):
            got = cache.read(p, 0, cache.n_rows)
            assert got.dtype == want.dtype and np.array_equal(got, want), p
    for layer in v1["layers"]:  # the ledger's per-layer stats equal the format-1 ones
        old = json.loads((ROOT / path / "ledger" / "shard_000000.json").read_text())
        assert old["arrays"]["acts/attn"]["stats"][v1["layers"].index(layer)]["count"] > 0
    assert sorted(p.name for p in store.iterdir()) == sorted([fx["complete"], fx["partial"]])  # no leftover
    assert len(list(CacheLoader(path, LoaderConfig(batch_size=4)))) == 2  # 8 train rows
    again = migrate(path)
    assert not again.migrated and again.status == "complete"


def test_a_migrated_partial_cache_is_resumed_by_collect_to_equal_a_fresh_one(
    fx: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The format-2 cache migrate makes is the one collect makes: collect finds it under the same
    key, computes only its missing shards, and ends with a cache equal, file by file, to a fresh
    format-2 collect (array bytes, ledger entries, manifest)."""
    res = migrate(fx["store"] / fx["partial"])
    assert res.status == "partial" and res.shards_migrated == 1 and res.shards_left == [1, 2]
    model = tmp_path / "model"  # the model's name is its folder's, as when the fixture was made
    shutil.copytree(tiny_model_dir, model)
    cfg = dict(model=str(model), task=str(fx["task"]), n=8, dev=4, max_new_tokens=2, chunk_rows=2,
               shard_rows=4, batch_size=4, dtype="fp32")
    resumed = collect(CollectConfig(**cfg, store=str(fx["store"])))
    assert resumed.key == fx["partial"] and not resumed.reused and resumed.shards_computed == 2
    fresh = collect(CollectConfig(**cfg, store=str(tmp_path / "fresh")))
    a, b = snapshot(Path(resumed.cache)), snapshot(Path(fresh.cache))
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for rel in b:
        assert a[rel] == b[rel], rel


def test_damaged_format1_shards_are_left_for_collect(fx: dict[str, Any]) -> None:
    path = fx["store"] / fx["complete"]
    shard = path / "acts" / "attn" / "layer_001" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = migrate(path)
    assert res.migrated and res.status == "partial" and res.shards_left == [1] and res.shards_migrated == 2
    problems = Cache.open(path).verify()
    assert [(p.rows, p.reason) for p in problems] == [((4, 8), "missing (partial cache)")]


@pytest.mark.parametrize("fault", ["migrate.shard:2", "migrate.before_swap", "migrate.after_swap"])
def test_sigkill_during_migrate_leaves_a_usable_cache(fx: dict[str, Any], fault: str) -> None:
    """Before the swap the key's folder is the format-1 cache, byte for byte, and a rerun
    migrates it; after it, it is the verified format-2 cache, and a rerun only tidies up."""
    key, store = fx["complete"], fx["store"]
    path = store / key
    original, values = _files(path), _v1_values(path)
    killed = _cli("migrate", key, "--store", str(store), "--json", IA2CACHE_FAULT=fault)
    assert killed.returncode == -9, killed.stderr
    if fault == "migrate.after_swap":
        assert Cache.open(path).verify() == [] and (store / f".{key}.migrating").exists()
    else:
        assert _files(path) == original  # untouched: an older ia2cache would use it as it was
        with pytest.raises(FormatError):
            Cache.open(path)
    again = _cli("migrate", key, "--store", str(store), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["migrated"] == (fault != "migrate.after_swap")
    assert not (store / f".{key}.migrating").exists()
    cache = Cache.open(path)
    assert cache.verify() == []
    layer2 = cache.read("acts/attn", 0, cache.n_rows, layers=[2])[:, 0]
    assert np.array_equal(layer2, values["acts/attn/layer_002"])


def test_an_object_store_cache_is_not_migrated_in_place(fx: dict[str, Any]) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    url = f"memory://ia2-{os.urandom(4).hex()}"
    fs.put(str(fx["store"] / fx["complete"]), f"{url}/{fx['complete']}", recursive=True)
    with pytest.raises(FormatError, match="ia2cache migrate"):
        Cache.open(f"{url}/{fx['complete']}")
    with pytest.raises(IA2Error, match="copy it to a local store"):
        migrate(f"{url}/{fx['complete']}")
    assert fs.exists(f"{url}/{fx['complete']}/acts/attn/layer_000/zarr.json")  # untouched
    shutil.rmtree(fx["store"])
