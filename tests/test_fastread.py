"""The direct shard reader (ia2cache.fastread) returns exactly what zarr returns, or refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from ia2cache.errors import IA2Error
from ia2cache.fastread import open_reader
from ia2cache.store import ArraySpec, Cache, cache_key

ROWS, SHARD, CHUNK = 45, 16, 4  # a partial last shard and a partial last chunk

SPECS = [
    ArraySpec("acts/attn/layer_000", (3, 5), "uint16", "bfloat16", stats=True),
    ArraySpec("acts/attn/layer_001", (3, 5), "uint16", "bfloat16", stats=True, compress=False),
    ArraySpec("acts/resid/layer_000", (3, 5), "float16", stats=True),
    ArraySpec("acts/mlp/layer_000", (3, 5), "float32", stats=True, compress=False),
    ArraySpec("tokens/ids", (7,), "int32"),
    ArraySpec("tokens/len", (), "int32"),
    ArraySpec("rows/split", (), "uint8"),
]


def _data(rng: np.random.Generator, a: int, b: int) -> dict[str, np.ndarray]:
    n = b - a
    out: dict[str, np.ndarray] = {}
    for s in SPECS:
        if s.dtype == "uint16":
            out[s.path] = rng.integers(0, 2**16, (n, *s.shape), dtype=np.uint16)
        elif s.dtype.startswith("float"):
            out[s.path] = rng.standard_normal((n, *s.shape)).astype(s.dtype)
        else:
            out[s.path] = rng.integers(-1, 100, (n, *s.shape)).astype(s.dtype)
    return out


def _cache(root: Path, shards: list[int] | None = None) -> Cache:
    manifest = {"synthetic": "fastread", "rows": ROWS}
    cache = Cache.create_or_open(root, cache_key(manifest), manifest, SPECS, ROWS, SHARD, CHUNK)
    rng = np.random.default_rng(0)
    with cache.lock():
        for s in range(cache.n_shards):
            data = _data(rng, *cache.shard_rows(s))
            if shards is None or s in shards:
                cache.write_shard(s, data)
    return cache


def _zarr_read(cache: Cache, path: str, a: int, b: int) -> np.ndarray:
    return np.asarray(zarr.open_array(store=str(cache.path / path), mode="r")[a:b])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return _cache(tmp_path_factory.mktemp("fastread"))


@pytest.mark.parametrize("spec", SPECS, ids=[s.path for s in SPECS])
def test_every_row_range_equals_zarr(cache: Cache, spec: ArraySpec) -> None:
    reader = open_reader(cache.path / spec.path)
    assert reader is not None
    rng = np.random.default_rng(1)
    ranges = [(0, ROWS), (0, 1), (ROWS - 1, ROWS), (3, 21), (16, 32), (15, 17), (40, 45), (7, 7)]
    ranges += [tuple(sorted(rng.integers(0, ROWS + 1, 2))) for _ in range(30)]
    for a, b in ranges:
        want = _zarr_read(cache, spec.path, a, b)
        got = reader.read(int(a), int(b))
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{spec.path} rows {a}-{b}")


def test_cache_read_uses_it_and_missing_shards_read_as_fill(tmp_path: Path) -> None:
    partial = _cache(tmp_path, shards=[0, 2])  # shard 1 (rows 16-31) never written
    path = SPECS[0].path
    assert partial._direct_reader(path) is not None  # Cache.read takes the direct path
    got = partial.read(path, 0, ROWS)
    np.testing.assert_array_equal(got, _zarr_read(partial, path, 0, ROWS))
    assert not got[16:32].any() and got[:16].any()


def test_a_rewritten_shard_is_read_anew(tmp_path: Path) -> None:
    c = _cache(tmp_path)
    path = SPECS[1].path
    before = c.read(path, 0, 4).copy()
    new = _data(np.random.default_rng(7), 0, SHARD)
    c.array(path)[0:SHARD] = new[path]  # a different shard file, possibly the same size
    after = c.read(path, 0, 4)
    np.testing.assert_array_equal(after, new[path][:4])
    assert not np.array_equal(before, after)


def test_damage_is_refused_with_the_rows_named(tmp_path: Path) -> None:
    c = _cache(tmp_path)
    path = SPECS[0].path  # blosc-compressed
    reader = open_reader(c.path / path)
    assert reader is not None
    shard_file = reader._shard_file(1)
    raw = bytearray(shard_file.read_bytes())
    raw[:64] = bytes(64)  # wreck the first chunk's blosc header (rows 16-19)
    shard_file.write_bytes(bytes(raw))
    with pytest.raises(IA2Error, match=r"rows 16-19"):
        open_reader(c.path / path).read(0, ROWS)
    raw = bytearray(shard_file.read_bytes())
    raw[-6] ^= 0xFF  # the shard index, guarded by its crc32c
    shard_file.write_bytes(bytes(raw))
    with pytest.raises(IA2Error, match="index checksum"):
        open_reader(c.path / path).read(16, 20)
    shard_file.write_bytes(bytes(raw[:10]))  # truncated
    with pytest.raises(IA2Error, match="too short"):
        open_reader(c.path / path).read(16, 20)


def test_other_layouts_fall_back_to_zarr(tmp_path: Path) -> None:
    plain = zarr.create_array(store=str(tmp_path / "plain"), shape=(10, 3), chunks=(5, 3), dtype="int32")
    plain[:] = np.arange(30).reshape(10, 3)
    assert open_reader(tmp_path / "plain") is None  # not sharded
    col = zarr.create_array(store=str(tmp_path / "col"), shape=(8, 6), chunks=(4, 3), shards=(8, 6),
                            dtype="int32")
    col[:] = 1
    assert open_reader(tmp_path / "col") is None  # chunked along a trailing dimension
    assert open_reader(tmp_path / "nothing-here") is None
