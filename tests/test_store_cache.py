"""Tests for ia2cache.store.cache: round trips, resume, ledger, verify, stats, paths and locks (format 2)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from ia2cache.errors import IA2Error
from ia2cache.store import (
    ArraySpec,
    Cache,
    Damage,
    decode_activations,
    encode_activations,
    list_caches,
    resolve_cache,
)
from ia2cache.store.ledger import shard_digest

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef"
N_ROWS, RPS, RPC, T, H = 10, 4, 2, 3, 5  # shards: [0,4) [4,8) [8,10); the last is short
LAYERS = [3, 7]  # the model layers stored: acts[:, 0] is layer 3, acts[:, 1] layer 7
ACTS, MLP = "acts/attn", "acts/mlp"


def _specs(codec: str = "lz4") -> list[ArraySpec]:
    return [
        ArraySpec(ACTS, (2, T, H), "uint16", "bfloat16", stats=True, codec=codec, chunk=(1, T, H)),
        ArraySpec(MLP, (2, T, H), "float32", stats=True, codec="none"),
        ArraySpec("tokens/student_ids", (T,), "int32"),
        ArraySpec("rows/example_id", (), "int64"),
    ]


def _rows(seed: int = 0) -> dict[str, np.ndarray]:
    """Full-size data for every array of _specs(); shard data are slices of it."""
    g = torch.Generator().manual_seed(seed)
    return {
        ACTS: encode_activations(torch.randn(N_ROWS, 2, T, H, generator=g) * 3, "bf16").values,
        MLP: encode_activations(torch.randn(N_ROWS, 2, T, H, generator=g) + 1, "fp32").values,
        "tokens/student_ids": np.arange(N_ROWS * T, dtype=np.int32).reshape(N_ROWS, T),
        "rows/example_id": np.arange(100, 100 + N_ROWS, dtype=np.int64),
    }


def _make(store: Path, manifest: dict | None = None, **kw) -> Cache:
    return Cache.create_or_open(
        store,
        KEY,
        manifest or {"model": "tiny", "n": 8, "site": "attn", "layers": LAYERS},
        kw.pop("specs", _specs()),
        N_ROWS,
        RPS,
        RPC,
    )


def _fill(cache: Cache, full: dict[str, np.ndarray], shards=None) -> None:
    for s in range(cache.n_shards) if shards is None else shards:
        a, b = cache.shard_rows(s)
        cache.write_shard(s, {p: v[a:b] for p, v in full.items()})


def _shard_file(cache: Cache, path: str, shard: int) -> Path:
    ndim = 1 + len(cache.specs[path].shape)
    f = cache.path / path / "c" / "/".join([str(shard)] + ["0"] * (ndim - 1))
    assert f.is_file(), f
    return f


def _flip_middle_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the chunk data, before the index at the end
    f.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ round trip


def test_round_trip_several_arrays_and_a_short_last_shard(tmp_path):
    cache = _make(tmp_path)
    full = _rows()
    assert cache.n_shards == 3 and cache.shard_rows(2) == (8, 10)
    assert cache.status == "partial" and cache.missing_shards() == [0, 1, 2]
    _fill(cache, full)
    cache.finalize({"seconds": 1.5, "bytes": 123})
    assert cache.status == "complete"

    again = Cache.open(cache.path)
    assert again.status == "complete" and again.manifest["seconds"] == 1.5
    assert again.manifest["model"] == "tiny" and again.manifest["rows"] == N_ROWS
    assert again.specs == {s.path: s for s in _specs()}
    for p, v in full.items():
        got = again.read(p, 0, N_ROWS)
        assert got.dtype == v.dtype and np.array_equal(got, v), p
        assert np.array_equal(again.read(p, 3, 9), v[3:9])
        assert again.array(p).shards[0] == RPS and again.array(p).chunks[0] == RPC
    acts = decode_activations(again.read(ACTS, 0, N_ROWS), "bfloat16")
    assert torch.equal(acts.view(torch.uint16), torch.from_numpy(full[ACTS]))
    assert again.array(ACTS).attrs["logical_dtype"] == "bfloat16"
    assert again.array(ACTS).chunks == (RPC, 1, T, H) and again.array(MLP).chunks == (RPC, 2, T, H)
    # a layer subset is one read, in the order asked
    assert np.array_equal(again.read(ACTS, 2, 9, layers=[7]), full[ACTS][2:9, 1:])
    assert np.array_equal(again.read(ACTS, 2, 9, layers=[7, 3]), full[ACTS][2:9, ::-1])
    assert [a.shape for a in again.read_many([(ACTS, 0, 2), (MLP, 4, 9)], layers=[3])] == [
        (2, 1, T, H), (5, 1, T, H)]
    with pytest.raises(IA2Error, match=r"layer\(s\) \[4\] not in cache"):
        again.read(ACTS, 0, 2, layers=[4])
    assert again.bytes_on_disk() > sum(v.nbytes for v in full.values()) // 4
    assert again.verify() == []


def test_write_shard_checks_its_input(tmp_path):
    cache = _make(tmp_path)
    full = _rows()
    data = {p: v[0:4] for p, v in full.items()}
    with pytest.raises(ValueError, match="missing arrays"):
        cache.write_shard(0, {k: v for k, v in data.items() if k != "rows/example_id"})
    with pytest.raises(ValueError, match="expected shape"):
        cache.write_shard(0, {**data, "rows/example_id": full["rows/example_id"][0:3]})
    with pytest.raises(ValueError, match="dtype"):
        cache.write_shard(0, {**data, "rows/example_id": data["rows/example_id"].astype("int32")})
    with pytest.raises(IndexError):
        cache.write_shard(3, data)
    assert cache.done_shards() == set()


def test_array_spec_refuses_bad_paths():
    for bad in ("../x", "/abs", "a/../b", "a//b", "ledger/x", ".lock", ""):
        with pytest.raises(ValueError):
            ArraySpec(bad, (1,), "float32")
    with pytest.raises(ValueError):
        ArraySpec("x", (1,), "float32", logical_dtype="bfloat16")
    with pytest.raises(ValueError, match="codec"):
        ArraySpec("x", (1,), "float32", codec="gzip")
    with pytest.raises(ValueError, match="chunk"):
        ArraySpec("x", (4, 2), "float32", chunk=(5, 2))


# ---------------------------------------------------------------------- resume, manifest


def test_resume_reports_missing_shards(tmp_path):
    full = _rows()
    cache = _make(tmp_path)
    _fill(cache, full, shards=[0, 2])
    again = _make(tmp_path)  # same manifest: resume, not overwrite
    assert again.done_shards() == {0, 2}
    assert again.missing_shards() == [1]
    assert np.array_equal(again.read("tokens/student_ids", 0, 4), full["tokens/student_ids"][:4])
    with pytest.raises(IA2Error, match="1 of 3 shards missing"):
        again.finalize()
    assert Cache.open(again.path).status == "partial"
    reader = Cache.open(again.path)  # opened read-only; writing reopens it for writing
    _fill(reader, full, shards=[1])
    reader.finalize()
    assert again.missing_shards() == [] and Cache.open(again.path).status == "complete"
    assert reader.verify() == []
    with pytest.raises(IA2Error, match="complete"):
        _fill(reader, full, shards=[1])


def test_create_or_open_refuses_a_different_manifest(tmp_path):
    _make(tmp_path, {"model": "tiny", "n": 8, "versions": {"zarr": "3.1"}})
    # volatile fields may differ
    _make(tmp_path, {"model": "tiny", "n": 8, "versions": {"zarr": "9.9"}})
    with pytest.raises(IA2Error) as e:
        _make(tmp_path, {"model": "tiny", "n": 16})
    assert "n" in str(e.value) and "16" in str(e.value) and "refusing" in str(e.value)
    with pytest.raises(IA2Error, match="seed"):
        _make(tmp_path, {"model": "tiny", "n": 8, "seed": 3})
    other = _specs()
    other[1] = ArraySpec(MLP, (2, T, H), "float16", stats=True, codec="none")
    with pytest.raises(IA2Error, match=r"arrays\.acts/mlp\.dtype"):
        _make(tmp_path, specs=other)
    with pytest.raises(IA2Error, match="rows_per_shard"):
        Cache.create_or_open(tmp_path, KEY, {"model": "tiny", "n": 8}, _specs(), N_ROWS, 2, 2)


def test_create_or_open_recreates_an_array_a_crash_left_out(tmp_path):
    cache = _make(tmp_path)
    shutil.rmtree(cache.path / "rows" / "example_id")
    again = _make(tmp_path)
    assert again.array("rows/example_id").shape == (N_ROWS,)
    _fill(again, _rows())
    again.finalize()
    assert again.verify() == []
    # an array whose layout differs from the manifest is refused, not rewritten
    shutil.rmtree(cache.path / "rows" / "example_id")
    zarr.create_array(cache.path, name="rows/example_id", shape=(N_ROWS,), dtype="int32")
    with pytest.raises(IA2Error, match="rows/example_id"):
        _make(tmp_path)


def test_open_refuses_what_is_not_a_cache(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(IA2Error, match="plain"):
        Cache.open(tmp_path / "plain")
    with pytest.raises(IA2Error, match="nowhere"):
        Cache.open(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- ledger


def test_ledger_entries_are_written_atomically(tmp_path):
    cache = _make(tmp_path)
    full = _rows()
    _fill(cache, full)
    ledger = cache.path / "ledger"
    names = sorted(os.listdir(ledger))
    assert names == ["shard_000000.json", "shard_000001.json", "shard_000002.json"]
    entry = json.loads((ledger / "shard_000002.json").read_text())
    assert entry["shard"] == 2 and entry["rows"] == [8, 10]
    acts = entry["arrays"][ACTS]
    assert acts["chunks"] == [hashlib.sha256(full[ACTS][8:10].tobytes()).hexdigest()]
    assert acts["sha256"] == shard_digest(acts["chunks"])
    assert (
        len(acts["chunks"]) == 1
        and len(
            json.loads((ledger / "shard_000000.json").read_text())["arrays"]["tokens/student_ids"][
                "chunks"
            ]
        )
        == 2
    )
    assert len(acts["stats"]) == 2  # one per layer
    assert set(acts["stats"][1]) >= {"mean", "std", "max_abs", "nan_count", "inf_count"}
    assert "stats" not in entry["arrays"]["tokens/student_ids"]


def test_failed_ledger_write_leaves_no_temp_file(tmp_path, monkeypatch):
    cache = _make(tmp_path)
    full = _rows()

    real_replace = os.replace

    def failing_ledger_rename(src, dst, *a, **k):
        # zarr renames its own files too: fail only the ledger's rename (by name, in its folder's fd)
        if Path(dst).name.startswith("shard_"):
            raise OSError("disk full")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing_ledger_rename)
    with pytest.raises(OSError, match="disk full"):
        _fill(cache, full, shards=[0])
    monkeypatch.undo()
    assert os.listdir(cache.path / "ledger") == []  # no temp file, and shard 0 is not done
    assert cache.missing_shards() == [0, 1, 2]


# ---------------------------------------------------------------------------------- verify


@pytest.fixture
def complete(tmp_path) -> Cache:
    cache = _make(tmp_path, specs=_specs(codec="none"))
    _fill(cache, _rows())
    cache.finalize()
    assert cache.verify() == []
    return cache


def test_verify_names_array_and_rows_of_a_flipped_byte(complete):
    _flip_middle_byte(_shard_file(complete, MLP, 1))
    problems = Cache.open(complete.path).verify()
    assert len(problems) == 1, problems
    p = problems[0]
    # zarr's crc32c refuses the chunk on read; the ledger's sha256 would have caught it as well
    assert p.array == MLP and ("crc32c" in p.reason.lower() or "checksum" in p.reason), p.reason
    assert p.rows in {(4, 6), (6, 8)}  # one chunk of shard 1, not the whole shard
    assert p.to_dict() == {"array": p.array, "rows": list(p.rows), "reason": p.reason}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verify_reports_damage_in_a_compressed_shard(tmp_path, seed):
    # big enough, and compressible enough, that blosc really stores a zstd stream
    spec = ArraySpec("acts/resid", (2, 16, 64), "uint16", "bfloat16", codec="zstd")
    cache = Cache.create_or_open(tmp_path, KEY, {"m": 1}, [spec], 8, 4, 2)
    g = torch.Generator().manual_seed(seed)
    x = encode_activations(torch.randint(0, 3, (8, 2, 16, 64), generator=g).float(), "bf16").values
    for s in range(cache.n_shards):
        a, b = cache.shard_rows(s)
        cache.write_shard(s, {spec.path: x[a:b]})
    cache.finalize()
    assert cache.verify() == []
    f = _shard_file(cache, spec.path, 1)
    assert f.stat().st_size < x[4:8].nbytes // 4  # compressed
    _flip_middle_byte(f)
    problems = cache.verify()
    assert problems, "damage went unnoticed"
    for p in problems:
        assert p.array == spec.path and 4 <= p.rows[0] < p.rows[1] <= 8, p
        assert "unreadable" in p.reason or "checksum" in p.reason, p.reason


def test_verify_reports_a_deleted_shard_file(complete):
    _shard_file(complete, "tokens/student_ids", 2).unlink()
    problems = complete.verify()
    assert [(p.array, p.rows) for p in problems] == [("tokens/student_ids", (8, 10))]
    assert "missing" in problems[0].reason


def test_all_zero_shard_is_still_written_and_verifiable(tmp_path):
    cache = _make(tmp_path)
    zeros = {p: np.zeros_like(v) for p, v in _rows().items()}
    _fill(cache, zeros)
    assert _shard_file(cache, "rows/example_id", 0).stat().st_size > 0
    cache.finalize()
    assert cache.verify() == []


def test_verify_reports_missing_ledger_entries(complete, tmp_path):
    (complete.path / "ledger" / "shard_000001.json").unlink()
    assert complete.verify() == [Damage("*", (4, 8), "shard not in ledger")]
    partial = Cache.create_or_open(tmp_path / "other", KEY, {"m": 1}, _specs(), N_ROWS, RPS, RPC)
    _fill(partial, _rows(), shards=[1])
    assert partial.verify() == [
        Damage("*", (0, 4), "missing (partial cache)"),
        Damage("*", (8, 10), "missing (partial cache)"),
    ]


# ----------------------------------------------------------------------------------- stats


def test_pooled_stats_equal_numpy_over_the_whole_array(tmp_path):
    cache = _make(tmp_path)
    full = _rows()
    _fill(cache, full)
    for p, logical in ((ACTS, "bfloat16"), (MLP, None)):
        for j, layer in enumerate(LAYERS):
            x = decode_activations(full[p], logical)[:, j].double().numpy()
            st = cache.stats(p, layer)
            assert st["count"] == x.size and st["shards"] == 3
            assert st["mean"] == pytest.approx(x.mean(), rel=1e-9, abs=1e-12)
            assert st["var"] == pytest.approx(x.var(), rel=1e-6)
            assert st["max_abs"] == np.abs(x).max()
            assert st["nan_count"] == 0 and st["inf_count"] == 0
    with pytest.raises(ValueError):
        cache.stats("tokens/student_ids")
    with pytest.raises(ValueError, match="name the layer"):
        cache.stats(ACTS)


def test_nan_in_an_activation_shard_shows_in_stats_and_verify(tmp_path):
    cache = _make(tmp_path)
    full = _rows()
    acts = decode_activations(full[ACTS], "bfloat16").clone()
    acts[5, 1, 1, 2] = float("nan")
    acts[6, 1, 0, 0] = float("nan")
    acts[9, 0, 2, 4] = float("inf")
    full[ACTS] = encode_activations(acts, "bf16").values
    _fill(cache, full)
    cache.finalize()
    st = cache.stats(ACTS, 7)
    assert st["nan_count"] == 2 and st["inf_count"] == 0 and cache.stats(ACTS, 3)["inf_count"] == 1
    finite = acts[:, 1].double().numpy()
    finite = finite[np.isfinite(finite)]
    assert st["count"] == finite.size and st["var"] == pytest.approx(finite.var(), rel=1e-6)
    problems = cache.verify()
    assert Damage(ACTS, (4, 8), "2 NaN values written by the teacher at layer 7") in problems
    assert Damage(ACTS, (8, 10), "1 Inf values written by the teacher at layer 3") in problems
    assert len(problems) == 2


# ----------------------------------------------------------------------- resolving, listing


def test_resolve_cache(tmp_path):
    store = tmp_path / "store"
    cache = _make(store)
    assert resolve_cache(store, KEY) == cache.path.resolve()
    assert resolve_cache(str(store), str(cache.path.resolve())) == cache.path.resolve()
    assert resolve_cache(store, "fedcba9876543210") == (store / "fedcba9876543210").resolve()
    for bad in ("../x", "..", f"{KEY}/../../x", "."):
        with pytest.raises(IA2Error, match="outside the store"):
            resolve_cache(store, bad)
    (tmp_path / "elsewhere").mkdir()
    for bad in (str(tmp_path / "elsewhere"), "/etc"):
        with pytest.raises(IA2Error, match="not an ia2cache cache"):
            resolve_cache(store, bad)
    with pytest.raises(IA2Error, match="16-hex-char key"):
        resolve_cache(store, "nosuchname")
    os.symlink(tmp_path / "elsewhere", store / "link")
    with pytest.raises(IA2Error, match="outside the store"):
        resolve_cache(store, "link")


def test_list_caches_sorted_by_created(tmp_path):
    assert list_caches(tmp_path / "none") == []
    a = Cache.create_or_open(tmp_path, "aaaaaaaaaaaaaaaa", {"m": 1}, _specs(), N_ROWS, RPS, RPC)
    b = Cache.create_or_open(tmp_path, "bbbbbbbbbbbbbbbb", {"m": 2}, _specs(), N_ROWS, RPS, RPC)
    (tmp_path / "junk").mkdir()
    listed = list_caches(tmp_path)
    assert [m["key"] for m in listed] == [a.key, b.key]
    assert listed[1]["m"] == 2 and listed[1]["status"] == "partial"
    assert listed[0]["created"] <= listed[1]["created"]


# ------------------------------------------------------------------------------------ lock

_HOLD_LOCK = """
import sys
from ia2cache.store import Cache
with Cache.open(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_lock_refuses_a_second_writer(tmp_path):
    cache = _make(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(cache.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(IA2Error, match="another ia2cache process is writing"), cache.lock():
            pass
    finally:
        proc.communicate("", timeout=30)
    assert proc.returncode == 0
    # released when the holder is gone; a second lock in this process is refused too
    with cache.lock(), pytest.raises(IA2Error, match="another ia2cache process is writing"), cache.lock():
        pass
    with cache.lock():
        pass


def test_resolve_cache_accepts_a_path_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    key = "0123456789abcdef"
    Cache.create_or_open(store, key, {"n": 1}, [ArraySpec("a", (), "int32")], 4, 4, 2)
    monkeypatch.chdir(tmp_path)
    assert resolve_cache(tmp_path / "elsewhere", f"store/{key}") == (store / key).resolve()
    (tmp_path / "link").symlink_to(store / key)
    assert resolve_cache(tmp_path / "elsewhere", "link") == (store / key).resolve()
    with pytest.raises(IA2Error, match="outside the store"):
        resolve_cache(store, "../store")  # a directory that is not a cache is still refused
