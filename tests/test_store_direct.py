"""Tests for ia2cache.store.direct: the hand-written reader of uncompressed sharded arrays.

Everything it reads is compared with zarr's own read of the same files (zarr is the reference):
values, dtype and shape, for random layouts and selections; absent chunks; the caller's memory
(``alloc``); threads; and damage (a flipped byte, a damaged index, a truncated or deleted shard
file), which both paths must refuse, the loader naming the array and the rows of the chunk.
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from ia2cache.errors import IA2Error
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.store import ArraySpec, Cache, cache_arrays, encode_activations
from ia2cache.store.direct import ShardReader
from ia2cache.store.locations import LocalLocation, MissingShardError

KEY = "0123456789abcdef"
ACTS = "acts/attn"
TOKENS = "tokens/student_ids"
DTYPES = ("uint16", "int8", "float32", "int32")
FIXTURE_OK = settings(max_examples=50, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Layout:
    """One sharded array: its shape, shard shape and inner chunk shape (which divides the shard)."""

    shape: tuple[int, ...]
    shard: tuple[int, ...]
    inner: tuple[int, ...]
    dtype: str
    fill: int


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    """Random layouts: 1-4 axes, shapes that are not multiples of the shard (a last partial shard
    along every axis), inner chunks that may be larger than the axis itself."""
    ndim = draw(st.integers(1, 4))
    shape, shard, inner = [], [], []
    for axis in range(ndim):
        n = draw(st.integers(1, 30) if axis == 0 else st.integers(1, 6 if ndim <= 3 else 4))
        c = draw(st.integers(1, 5) if axis == 0 else st.integers(1, n + 1))
        k = draw(st.integers(1, 3))
        shape.append(n)
        inner.append(c)
        shard.append(c * k)
    return Layout(tuple(shape), tuple(shard), tuple(inner), draw(st.sampled_from(DTYPES)),
                  draw(st.sampled_from([0, 3])))


def _random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Random bits of ``dtype`` (any float32 bit pattern, NaNs included)."""
    dt = np.dtype(dtype)
    raw = rng.integers(0, 256, size=math.prod(shape) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def _layout_data(layout: Layout, seed: int, blank: tuple[int, int]) -> np.ndarray:
    """Random data with rows ``blank`` set to the fill value (so zarr leaves those inner chunks
    out), and one value unlike the fill at every shard's first element (so that every shard file
    exists: zarr writes no file for a shard that is all fill value, and a read-only store refuses
    a missing one)."""
    data = _random_values(np.random.default_rng(seed), layout.shape, layout.dtype)
    data[blank[0]:blank[1]] = layout.fill
    cells = [range(-(-n // s)) for n, s in zip(layout.shape, layout.shard, strict=True)]
    for cell in np.ndindex(*[len(c) for c in cells]):
        data[tuple(i * s for i, s in zip(cell, layout.shard, strict=True))] = 1 if layout.fill == 0 else 0
    return data


def _write_zarr(folder: Path, layout: Layout, data: np.ndarray, name: str = "acts/x", **kw: Any) -> None:
    """``data`` as a sharded array with zarr itself (bytes + crc32c inside, index at the end)."""
    group = zarr.open_group(store=LocalLocation(folder).zarr_store(read_only=False), mode="a", zarr_format=3)
    arr = group.create_array(
        name=name, shape=layout.shape, dtype=layout.dtype, fill_value=layout.fill,
        chunks=layout.shard,
        serializer=ShardingCodec(chunk_shape=layout.inner, codecs=[BytesCodec(), Crc32cCodec()]),
        compressors=None, **kw)
    arr[...] = data


def _open_ro(folder: Path, name: str = "acts/x") -> zarr.Array:
    """The array ``name`` read through ia2cache's read-only local store (the one with
    ``open_shard_file``)."""
    group = zarr.open_group(store=LocalLocation(folder).zarr_store(read_only=True), mode="r", zarr_format=3)
    arr = group[name]
    assert isinstance(arr, zarr.Array)
    return arr


def _assert_identical(got: np.ndarray, want: np.ndarray, what: object = "") -> None:
    """Same dtype, shape and bits (NaNs of float32 included)."""
    want = np.asarray(want)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), what


@st.composite
def selections(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Step-1 slices over 1..ndim leading axes (the rest whole): empty, unaligned, negative starts,
    open ends and stops past the end, as a caller may write them."""
    out = []
    for n in shape[: draw(st.integers(1, len(shape)))]:
        a = draw(st.integers(0, n))
        b = draw(st.integers(a, n))
        how = draw(st.sampled_from(["plain", "plain", "negative", "open", "past"]))
        if how == "negative" and a < n:
            out.append(slice(a - n, b))
        elif how == "open" and b == n:
            out.append(slice(None if a == 0 else a, None))
        elif how == "past" and b == n:
            out.append(slice(a, n + 7))
        else:
            out.append(slice(a, b))
    return tuple(out)


def _shard_index(f: Path, n_inner: int) -> np.ndarray:
    """The (offset, nbytes) pairs at the end of a shard file, after checking the index's crc32c."""
    raw = f.read_bytes()[-(16 * n_inner + 4):]
    assert google_crc32c.value(raw[:-4]) == int.from_bytes(raw[-4:], "little")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)


def _flip(f: Path, at: int) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0x5A
    f.write_bytes(bytes(data))


def _rewrite_index(f: Path, n_inner: int, change: Callable[[np.ndarray], None]) -> None:
    """Change a shard's index and give it a matching crc32c: damage its checksum cannot catch."""
    data = f.read_bytes()
    index = _shard_index(f, n_inner).copy()
    change(index)
    raw = index.astype("<u8").tobytes()
    f.write_bytes(data[: -(16 * n_inner + 4)] + raw + google_crc32c.value(raw).to_bytes(4, "little"))


def _act_cache(store: Path, *, n_rows: int, rpc: int, rps: int, n_layers: int, lc: int, p: int, h: int,
               dtype: str, seed: int, codec: str = "none") -> tuple[Cache, dict[str, np.ndarray], list[int]]:
    """A complete cache of activations (rows, layers, p, h) chunked by ``lc`` layers, plus a token
    array, written through the Cache API; returns it opened read-only, its data and its layers."""
    model_layers = [2 * i + 1 for i in range(n_layers)]
    specs = [
        ArraySpec(ACTS, (n_layers, p, h), dtype, "bfloat16" if dtype == "uint16" else None, stats=True,
                  codec=codec, chunk=(lc, p, h)),
        ArraySpec(TOKENS, (3,), "int32"),
    ]
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        acts = rng.standard_normal((n_rows, n_layers, p, h)).astype(np.float32)
    else:
        acts = rng.integers(-127 if dtype == "int8" else 0, 128, (n_rows, n_layers, p, h)).astype(dtype)
    acts[n_rows // 2 : n_rows // 2 + rpc] = 0  # all-zero chunks too
    data = {ACTS: acts, TOKENS: rng.integers(-1, 1000, (n_rows, 3)).astype(np.int32)}
    cache = Cache.create_or_open(store, KEY, {"model": "tiny", "n": n_rows, "site": "attn",
                                              "layers": model_layers}, specs, n_rows, rps, rpc)
    for s in range(cache.n_shards):
        a, b = cache.shard_rows(s)
        cache.write_shard(s, {k: v[a:b] for k, v in data.items()})
    cache.finalize()
    return Cache.open(cache.path), data, model_layers


def _damage_cache(store: Path) -> Cache:
    """Rows 16 in shards of 4 and chunks of 2, 4 layers in chunks of 2: a shard file holds 2 x 2
    inner chunks; chunk (i, j) of shard s holds rows [4s + 2i, 4s + 2i + 2) and layers [2j, 2j + 2)."""
    return _act_cache(store, n_rows=16, rpc=2, rps=4, n_layers=4, lc=2, p=2, h=3, dtype="uint16", seed=5)[0]


def _shard_path(cache: Cache, shard: int) -> tuple[str, Path]:
    key = f"{ACTS}/c/{shard}/0/0/0"
    f = Path(cache.path) / key
    assert f.is_file(), f
    return key, f


# ----------------------------------------------------------------------------- 1. random layouts


@FIXTURE_OK
@given(layout=layouts(), seed=st.integers(0, 2**31), data=st.data())
def test_reads_equal_zarr_for_random_layouts_and_selections(tmp_path: Path, layout: Layout, seed: int,
                                                             data: st.DataObject) -> None:
    n = layout.shape[0]
    z0 = data.draw(st.integers(0, n), label="blank from")
    blank = (z0, data.draw(st.integers(z0, n), label="blank to"))
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    _write_zarr(folder, layout, _layout_data(layout, seed, blank))
    arr = _open_ro(folder)
    reader = ShardReader.of(arr)
    assert reader is not None, layout
    for _ in range(data.draw(st.integers(1, 5), label="reads")):
        sel = data.draw(selections(layout.shape), label="sel")
        _assert_identical(reader.read(sel), arr[sel], (layout, sel))
    _assert_identical(reader.read(()), arr[...], (layout, "everything"))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_rows=st.integers(1, 24), rpc=st.integers(1, 3), k=st.integers(1, 3), n_layers=st.integers(1, 6),
       lc=st.integers(1, 6), p=st.integers(1, 3), h=st.integers(1, 4), dtype=st.sampled_from(DTYPES[:3]),
       seed=st.integers(0, 2**31), data=st.data())
def test_cache_read_and_read_many_read_directly_and_equal_the_data(
        tmp_path: Path, n_rows: int, rpc: int, k: int, n_layers: int, lc: int, p: int, h: int, dtype: str,
        seed: int, data: st.DataObject) -> None:
    lc = min(lc, n_layers)
    cache, full, model_layers = _act_cache(Path(tempfile.mkdtemp(dir=tmp_path)), n_rows=n_rows, rpc=rpc,
                                           rps=rpc * k, n_layers=n_layers, lc=lc, p=p, h=h, dtype=dtype,
                                           seed=seed)
    lo = data.draw(st.integers(0, n_layers - 1), label="first layer")
    run = model_layers[lo : data.draw(st.integers(lo + 1, n_layers), label="end layer")]  # contiguous
    picked = data.draw(st.lists(st.sampled_from(model_layers), min_size=1, max_size=n_layers, unique=True),
                       label="layers")  # any order, gaps
    calls: list[tuple[tuple[int, ...], np.dtype]] = []

    def alloc(shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
        calls.append((shape, dt))
        return np.full(shape, -1).astype(dt)

    for _ in range(3):
        a = data.draw(st.integers(0, n_rows), label="start")
        b = data.draw(st.integers(a, n_rows), label="stop")
        for layers in (None, run, picked):
            pos = list(range(n_layers)) if layers is None else [model_layers.index(i) for i in layers]
            _assert_identical(cache.read(ACTS, a, b, layers=layers), full[ACTS][a:b][:, pos], (a, b, layers))
            _assert_identical(cache.read(TOKENS, a, b, layers=layers), full[TOKENS][a:b])
        calls.clear()
        got = cache.read_many([(ACTS, a, b), (TOKENS, a, b), (ACTS, 0, n_rows)], layers=picked, alloc=alloc)
        pos = [model_layers.index(i) for i in picked]
        _assert_identical(got[0], full[ACTS][a:b][:, pos])
        _assert_identical(got[1], full[TOKENS][a:b])
        _assert_identical(got[2], full[ACTS][:, pos])
        assert len(calls) == 3  # all three read directly, into the caller's memory
    # both arrays were read by the direct reader, not by zarr
    assert isinstance(cache._direct[ACTS], ShardReader) and isinstance(cache._direct[TOKENS], ShardReader)


# ----------------------------------------------------------------------------- 2. absent chunks


@pytest.mark.parametrize("fill", [0, 9])
def test_absent_inner_chunks_read_as_the_fill_value(tmp_path: Path, fill: int) -> None:
    layout = Layout((11, 5), (4, 4), (2, 2), "int32", fill)
    data = np.arange(1, 56, dtype=np.int32).reshape(11, 5) + 100
    data[1:7] = fill  # shard 0: its second row of chunks; shard 1: its first
    _write_zarr(tmp_path, layout, data)
    # zarr left those chunks out of the shard files: their index entries are 2**64 - 1
    absent = _shard_index(tmp_path / "acts/x/c/1/0", 4)
    assert (absent[:2] == 2**64 - 1).all() and (absent[2:] != 2**64 - 1).all(), absent
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None
    for sel in [(), (slice(0, 11),), (slice(3, 6), slice(1, 4)), (slice(2, 4),), (slice(4, 6), slice(2, 4)),
                (slice(1, 9), slice(3, 5))]:
        got = reader.read(sel)
        _assert_identical(got, arr[sel], sel)
        _assert_identical(got, data[sel], sel)


# ----------------------------------------------------------------------------- 3. damage


@pytest.mark.parametrize("sel", [(slice(4, 8),), (slice(7, 8), slice(3, 4))], ids=["whole", "part"])
@pytest.mark.parametrize("where", ["data", "crc"])
def test_a_flipped_byte_in_a_chunk_is_refused_by_both(tmp_path: Path, sel: tuple[slice, ...],
                                                      where: str) -> None:
    cache = _damage_cache(tmp_path)
    key, f = _shard_path(cache, 1)
    index = _shard_index(f, 4)
    offset, nbytes = (int(x) for x in index[3])  # chunk (1, 1): rows [6, 8), layers [2, 4)
    _flip(f, offset + (1 if where == "data" else nbytes - 2))
    arr = Cache.open(cache.path).array(ACTS)
    reader = ShardReader.of(arr)
    assert reader is not None
    with pytest.raises(ValueError, match="crc32c") as e:
        reader.read(sel)
    assert key in str(e.value), e.value
    with pytest.raises(ValueError):
        arr[sel]
    # the other chunks of the same shard still read, the same by both
    for ok in [(slice(4, 6),), (slice(6, 8), slice(0, 2)), (slice(0, 4),), (slice(8, 16),)]:
        _assert_identical(reader.read(ok), arr[ok], ok)


@pytest.mark.parametrize("at", [0, 17, -5, -1])
def test_a_flipped_byte_in_the_shard_index_is_refused_by_both(tmp_path: Path, at: int) -> None:
    cache = _damage_cache(tmp_path)
    key, f = _shard_path(cache, 2)
    index_at = f.stat().st_size - (16 * 4 + 4)
    _flip(f, index_at + at if at >= 0 else f.stat().st_size + at)
    arr = Cache.open(cache.path).array(ACTS)
    reader = ShardReader.of(arr)
    assert reader is not None
    for sel in [(slice(8, 12),), (slice(9, 10), slice(1, 2))]:
        with pytest.raises(ValueError, match="crc32c") as e:
            reader.read(sel)
        assert key in str(e.value)
        with pytest.raises(ValueError):
            arr[sel]
    _assert_identical(reader.read((slice(0, 8),)), arr[0:8])


@pytest.mark.parametrize("keep", [0.5, -1, -10, 30, 0])
def test_a_truncated_shard_file_is_refused_by_both(tmp_path: Path, keep: float) -> None:
    """Down to an empty file, which zarr alone reads as "every chunk absent" (fill values)."""
    cache = _damage_cache(tmp_path)
    key, f = _shard_path(cache, 3)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    arr = Cache.open(cache.path).array(ACTS)
    reader = ShardReader.of(arr)
    assert reader is not None
    with pytest.raises(ValueError, match="truncated|crc32c") as e:
        reader.read((slice(12, 16),))
    assert key in str(e.value)
    with pytest.raises(ValueError, match="empty" if keep == 0 else None):
        arr[12:16]
    _assert_identical(reader.read((slice(0, 12),)), arr[0:12])


def test_a_deleted_shard_file_is_refused_by_both(tmp_path: Path) -> None:
    cache = _damage_cache(tmp_path)
    key, f = _shard_path(cache, 1)
    f.unlink()
    c = Cache.open(cache.path)
    arr = c.array(ACTS)
    reader = ShardReader.of(arr)
    assert reader is not None
    with pytest.raises(MissingShardError, match=key):
        reader.read((slice(5, 6),))
    with pytest.raises(MissingShardError, match=key):
        arr[5:6]
    with pytest.raises(MissingShardError):
        c.read(ACTS, 0, 16)
    _assert_identical(reader.read((slice(8, 16),)), arr[8:16])


@pytest.mark.parametrize("chunk", [1, 2])
def test_the_loader_names_the_array_and_rows_of_a_damaged_chunk(tmp_path: Path, chunk: int) -> None:
    """A flipped byte read by the direct reader reaches the loader's consumer as an IA2Error naming
    ``acts/attn`` and the rows of the one damaged chunk."""
    n_train, n_dev, rpc, p, h = 12, 4, 2, 2, 3
    n = n_train + n_dev
    specs = [ArraySpec(ACTS, (4, p, h), "uint16", "bfloat16", stats=True, chunk=(2, p, h))]
    ragged = ("student_ids", "response_ids", "target_ids", "student_positions")
    lens = ("student_len", "response_len", "target_len", "positions_len")
    specs += [ArraySpec(f"tokens/{k}", (4,), "int32") for k in ragged]
    specs += [ArraySpec(f"tokens/{k}", (), "int32") for k in lens]
    manifest = {"model": {"fingerprint": "a", "tokenizer_fingerprint": "b"}, "site": "attn",
                "layers": [1, 2, 3, 4], "n_train": n_train, "n_dev": n_dev}
    cache = Cache.create_or_open(tmp_path, KEY, manifest, specs, n, 2 * rpc, rpc)
    rows = np.arange(n)
    ids = np.where(np.arange(4)[None, :] < 2, rows[:, None], -1).astype(np.int32)
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 4, p, h) + 1
    full = ({f"tokens/{k}": ids for k in ragged} | {f"tokens/{k}": np.full(n, 2, np.int32) for k in lens}
            | {ACTS: encode_activations(x, "bf16").values})
    for s in range(cache.n_shards):
        a, b = cache.shard_rows(s)
        cache.write_shard(s, {k: v[a:b] for k, v in full.items()})
    cache.finalize()
    ro = Cache.open(cache.path)
    assert ShardReader.of(ro.array(ACTS)) is not None  # the loader reads these directly
    assert sum(len(b.rows) for b in CacheLoader(ro, LoaderConfig(batch_size=4, shuffle=False))) == n_train
    key, f = _shard_path(cache, 1)  # rows [4, 8): chunk (i, j) at index 2 i + j
    offset = int(_shard_index(f, 4)[chunk, 0])
    _flip(f, offset + 5)
    first = 4 + 2 * (chunk // 2)
    with pytest.raises(IA2Error) as e:
        for _ in CacheLoader(Cache.open(cache.path), LoaderConfig(batch_size=4, shuffle=False)):
            pass
    msg = str(e.value)
    assert f"array {ACTS}" in msg and f"rows [{first}, {first + 2})" in msg, msg
    assert "crc32c" in msg and key in msg, msg  # the direct reader's own refusal, passed on


_WRONG_ENTRIES: dict[str, Callable[[np.ndarray, int], tuple[int, int]]] = {
    # chunk (1, 1) of the shard: (what its index entry becomes) from (index, file size)
    "short": lambda ix, size: (int(ix[3, 0]), int(ix[3, 1]) - 1),
    "long": lambda ix, size: (int(ix[3, 0]), int(ix[3, 1]) + 4),
    "past-the-end": lambda ix, size: (size, int(ix[3, 1])),
    "into-the-index": lambda ix, size: (size - (16 * 4 + 4) - int(ix[3, 1]) + 1, int(ix[3, 1])),
    "length-absent": lambda ix, size: (int(ix[3, 0]), 2**64 - 1),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # zarr's own sum
@pytest.mark.parametrize("wrong", list(_WRONG_ENTRIES))
def test_an_index_entry_of_the_wrong_size_or_place_is_refused_by_both(tmp_path: Path, wrong: str) -> None:
    """An index whose crc32c matches but whose entry cannot be the chunk's (a writer's bug)."""
    cache = _damage_cache(tmp_path)
    key, f = _shard_path(cache, 1)
    size = f.stat().st_size

    def change(index: np.ndarray) -> None:
        index[3] = _WRONG_ENTRIES[wrong](index, size)

    _rewrite_index(f, 4, change)
    arr = Cache.open(cache.path).array(ACTS)
    reader = ShardReader.of(arr)
    assert reader is not None
    with pytest.raises(ValueError, match=key):
        reader.read((slice(4, 8),))
    with pytest.raises(ValueError):
        arr[4:8]
    _assert_identical(reader.read((slice(0, 4),)), arr[0:4])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # zarr's own sum
@pytest.mark.parametrize("offset", [2**64 - 8, 2**64 - 1], ids=["past_2_64", "absent_by_offset_alone"])
def test_an_index_entry_zarr_refuses_is_damage(tmp_path: Path, offset: int) -> None:
    """An offset whose sum with the length wraps around 2**64 (no OverflowError), and an offset of
    2**64 - 1 with a real length (absent only when both are): ValueError, as zarr."""
    cache = _damage_cache(tmp_path)
    _, f = _shard_path(cache, 1)

    def edit(index: np.ndarray) -> None:
        index[3, 0] = offset

    _rewrite_index(f, 4, edit)
    arr = Cache.open(cache.path).array(ACTS)
    with pytest.raises(ValueError):
        arr[4:8]
    reader = ShardReader.of(arr)
    assert reader is not None
    with pytest.raises(ValueError):
        reader.read((slice(4, 8),))


# ----------------------------------------------------------------------------- 4. eligibility


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_no_reader_for_a_compressed_array_which_zarr_reads(tmp_path: Path, codec: str) -> None:
    cache, full, layers = _act_cache(tmp_path, n_rows=9, rpc=2, rps=4, n_layers=3, lc=2, p=2, h=3,
                                     dtype="float32", seed=1, codec=codec)
    assert ShardReader.of(cache.array(ACTS)) is None
    assert ShardReader.of(cache.array(TOKENS)) is not None  # codec "none"
    _assert_identical(cache.read(ACTS, 1, 8, layers=[layers[2], layers[0]]), full[ACTS][1:8][:, [2, 0]])
    assert cache._direct[ACTS] is None


def test_an_empty_shard_file_of_a_compressed_array_is_damage_not_zeros(tmp_path: Path) -> None:
    """zarr reads an empty shard file as fill values; the store refuses it, naming the file, and
    the loader names the damaged rows."""
    cache, full, _ = _act_cache(tmp_path, n_rows=8, rpc=2, rps=4, n_layers=2, lc=2, p=2, h=3,
                                dtype="uint16", seed=3, codec="lz4")
    key, f = _shard_path(cache, 1)
    f.write_bytes(b"")
    c = Cache.open(cache.path)
    assert c._direct.get(ACTS) is None  # read through zarr
    for rows in ((4, 6), (4, 8)):  # part of the shard, and all of it (zarr reads it whole: zeros)
        with pytest.raises(ValueError, match=f"shard file {key} is empty"):
            c.read(ACTS, *rows)
    _assert_identical(c.read(ACTS, 0, 4), full[ACTS][0:4])
    # Rows 4-6 are all zeros: read as fill values they would match the ledger's sha256 too.
    assert not full[ACTS][4:6].any()
    assert {(p.array, p.rows) for p in c.verify()} == {(ACTS, (4, 6)), (ACTS, (6, 8))}


def test_no_reader_for_a_writable_store(tmp_path: Path) -> None:
    cache = Cache.create_or_open(tmp_path, KEY, {"model": "tiny", "site": "attn", "layers": [1]},
                                 [ArraySpec(ACTS, (1, 2, 3), "uint16", "bfloat16", stats=True)], 4, 2, 1)
    assert ShardReader.of(cache.array(ACTS)) is None  # the cache being written
    layout = Layout((8, 3), (4, 3), (2, 3), "int32", 0)
    _write_zarr(tmp_path / "z", layout, np.ones((8, 3), np.int32))
    group = zarr.open_group(store=LocalLocation(tmp_path / "z").zarr_store(read_only=False), mode="r+")
    assert ShardReader.of(group["acts/x"]) is None
    assert ShardReader.of(_open_ro(tmp_path / "z")) is not None
    plain = zarr.open_group(store=zarr.storage.LocalStore(tmp_path / "z", read_only=True), mode="r")
    assert ShardReader.of(plain["acts/x"]) is None  # zarr's own store: no open_shard_file


def test_no_reader_for_other_layouts(tmp_path: Path) -> None:
    layout = Layout((8, 3), (4, 3), (2, 3), "int32", 0)
    store = LocalLocation(tmp_path).zarr_store(read_only=False)
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    arrays = {
        "unsharded": dict(chunks=(2, 3), compressors=[Crc32cCodec()]),
        "no_crc": dict(chunks=(2, 3), shards=(4, 3), compressors=None),
        "big_endian": dict(chunks=(4, 3), serializer=ShardingCodec(
            chunk_shape=(2, 3), codecs=[BytesCodec(endian="big"), Crc32cCodec()]), compressors=None),
        "index_first": dict(chunks=(4, 3), serializer=ShardingCodec(
            chunk_shape=(2, 3), codecs=[BytesCodec(), Crc32cCodec()], index_location="start"),
            compressors=None),
        "dots": dict(chunks=(2, 3), shards=(4, 3), compressors=[Crc32cCodec()],
                     chunk_key_encoding={"name": "default", "separator": "."}),
        "booleans": dict(chunks=(2, 3), shards=(4, 3), compressors=[Crc32cCodec()], dtype="bool"),
        # 1-byte values need no byte order, but the index (uint64) does
        "int8_big_endian_index": dict(chunks=(4, 3), dtype="int8", serializer=ShardingCodec(
            chunk_shape=(2, 3), codecs=[BytesCodec(), Crc32cCodec()],
            index_codecs=[BytesCodec(endian="big"), Crc32cCodec()]), compressors=None),
    }
    for name, kw in arrays.items():
        kw = {"dtype": layout.dtype, **kw}
        group.create_array(name=name, shape=layout.shape, fill_value=0, **kw)[...] = 1
    _write_zarr(tmp_path, layout, np.ones((8, 3), np.int32), name="eligible")
    ro = zarr.open_group(store=LocalLocation(tmp_path).zarr_store(read_only=True), mode="r")
    for name in arrays:
        assert ShardReader.of(ro[name]) is None, name
    assert ShardReader.of(ro["eligible"]) is not None
    v2 = zarr.open_group(store=LocalLocation(tmp_path / "v2").zarr_store(read_only=False), mode="w",
                         zarr_format=2)
    v2.create_array(name="x", shape=(8, 3), chunks=(2, 3), dtype="int32", fill_value=0)[...] = 1
    assert ShardReader.of(zarr.open_group(store=LocalLocation(tmp_path / "v2").zarr_store(read_only=True),
                                          mode="r", zarr_format=2)["x"]) is None


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_every_array_collect_makes_is_read_directly(tmp_path: Path, dtype: str) -> None:
    specs = cache_arrays(site="attn", n_layers=5, slots=3, hidden=8, dtype=dtype, rows_per_chunk=2,
                         student_len=6, teacher_len=7, t=2, target_len=3, k=2, topk=4)
    assert specs[0].path == ACTS and specs[0].chunk is not None  # chunked along layers
    Cache.create_or_open(tmp_path, KEY, {"model": "tiny", "site": "attn", "layers": [0, 1, 2, 3, 4]},
                         specs, 10, 4, 2)
    ro = Cache.open(tmp_path / KEY)
    for spec in specs:
        assert ShardReader.of(ro.array(spec.path)) is not None, spec


# ----------------------------------------------------------------------------- 5. alloc


@pytest.mark.parametrize("sel", [
    (slice(1, 10), slice(1, 4)),  # partial chunks along both axes, absent chunks, a partial shard
    (slice(4, 11),),  # whole chunks (the edge ones as zarr pads them), read straight into place
    (slice(0, 8), slice(0, 4)),  # whole inner chunks, every one of them
    (slice(2, 4),),
], ids=["partial", "to-the-end", "whole", "one-row-of-chunks"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_element_of_the_callers_memory_is_written(tmp_path: Path, sel: tuple[slice, ...],
                                                         dtype: str) -> None:
    layout = Layout((11, 5), (4, 4), (2, 2), dtype, 0)
    data = _layout_data(layout, 3, (6, 8))
    _write_zarr(tmp_path, layout, data)
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None
    given: list[np.ndarray] = []

    def alloc(shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
        out = np.empty(shape, dt)
        out.view(np.uint8).fill(0xFF)
        given.append(out)
        return out

    got = reader.read(sel, alloc)
    assert len(given) == 1 and got is given[0]
    _assert_identical(got, arr[sel], sel)
    _assert_identical(got, data[sel], sel)


# ----------------------------------------------------------------------------- 6. threads


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_threads_reading_one_reader_at_once_get_their_own_rows(tmp_path: Path) -> None:
    """40 shard files (more than a thread keeps open: its open files are evicted while it reads),
    two threads reading different boxes of them 50 times each through one reader."""
    layout = Layout((40, 7), (2, 4), (1, 2), "float32", 0)
    _write_zarr(tmp_path, layout, _layout_data(layout, 11, (10, 14)))
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None
    plans: list[Sequence[tuple[slice, ...]]] = [
        [(slice(0, 40),), (slice(3, 37), slice(1, 6)), (slice(21, 22),)],
        [(slice(5, 33), slice(0, 3)), (slice(11, 40),), (slice(0, 19), slice(4, 7)), (slice(8, 8),)],
    ]
    want = [[np.asarray(arr[s]) for s in plan] for plan in plans]
    gc.collect()  # earlier tests' stores and readers, with their open files
    before = _open_fds()
    start = threading.Barrier(2)
    done = [0, 0]
    failures: list[str] = []

    def work(t: int) -> None:
        start.wait()
        try:
            for i in range(50):
                for sel, w in zip(plans[t], want[t], strict=True):
                    got = reader.read(sel)
                    if got.shape != w.shape or got.tobytes() != w.tobytes():
                        failures.append(f"thread {t}, round {i}: {sel} differs")
            done[t] += 1
        except Exception as e:  # reported below, in the test's thread
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    assert failures == [] and done == [1, 1], failures[:5]
    gc.collect()
    assert _open_fds() == before  # each thread's open shard files closed with it


# ----------------------------------------------------------------------------- contract with zarr


def test_a_reversed_slice_reads_empty_as_zarr(tmp_path: Path) -> None:
    layout = Layout((8, 3), (4, 3), (2, 3), "int32", 0)
    _write_zarr(tmp_path, layout, np.arange(1, 25, dtype=np.int32).reshape(8, 3))
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None
    for sel in [(slice(5, 3),), (slice(-1, 3),), (slice(0, 8), slice(2, 1))]:
        _assert_identical(reader.read(sel), arr[sel], sel)


# ----------------------------------------------------------------------------- 6. grouped reads


@pytest.mark.parametrize(("limit", "value"), [("_MAX_IOV", 3), ("_MAX_GROUP_BYTES", 1), ("_MAX_STAGES", 1)])
@pytest.mark.parametrize("sel", [(), (slice(1, 13),), (slice(0, 16), slice(1, 3)),
                                 (slice(3, 5), slice(0, 1))], ids=["all", "rows", "cut-layers", "part"])
def test_reads_split_at_every_limit_equal_zarr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str,
                                               value: int, sel: tuple[slice, ...]) -> None:
    """File-adjacent chunks are read together, up to a number of pieces, of bytes and of partly
    wanted chunks a call: with each limit at its smallest, every read still equals zarr's."""
    import ia2cache.store.direct as direct

    layout = Layout((16, 4, 3), (8, 4, 3), (2, 2, 3), "uint16", 0)
    _write_zarr(tmp_path, layout, _layout_data(layout, 3, (0, 0)))
    arr = _open_ro(tmp_path)
    want = arr[sel]
    calls: list[int] = []
    real = os.preadv

    def counted(fd: int, buffers: Any, offset: int) -> int:
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(direct.os, "preadv", counted)
    reader = ShardReader.of(arr)
    assert reader is not None
    _assert_identical(reader.read(sel), want, "defaults")
    grouped = len(calls)
    monkeypatch.setattr(direct, limit, value)
    calls.clear()
    _assert_identical(ShardReader.of(arr).read(sel), want, limit)  # type: ignore[union-attr]
    assert len(calls) >= grouped
    if limit == "_MAX_IOV" and sel == ():
        assert grouped == 2 and len(calls) > grouped  # one call a shard by default


@pytest.mark.parametrize("most", [1, 7, 1000])
def test_short_reads_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int) -> None:
    """``preadv`` may return fewer bytes than asked (a signal; Linux's 2 GiB a call): the reader
    reads on, and only a file that really ends early is damage."""
    import ia2cache.store.direct as direct

    layout = Layout((16, 4, 3), (8, 4, 3), (2, 2, 3), "int32", 0)
    _write_zarr(tmp_path, layout, _layout_data(layout, 5, (0, 0)))
    arr = _open_ro(tmp_path)
    real = os.preadv

    def short(fd: int, buffers: Any, offset: int) -> int:
        out, left = [], most
        for b in buffers:
            if left <= 0:
                break
            out.append(memoryview(b).cast("B")[:left])
            left -= out[-1].nbytes
        return real(fd, out, offset)

    monkeypatch.setattr(direct.os, "preadv", short)
    reader = ShardReader.of(arr)
    assert reader is not None
    _assert_identical(reader.read(()), arr[...], most)
    _assert_identical(reader.read((slice(3, 9), slice(1, 2))), arr[3:9, 1:2], most)


def test_a_remembered_index_does_not_hide_a_damaged_chunk_or_file(tmp_path: Path) -> None:
    """Shards with the same index bytes share one check of the index; their chunks are still
    each checked, and a file of another size is checked anew."""
    layout = Layout((16, 4), (8, 4), (2, 4), "uint16", 0)
    _write_zarr(tmp_path, layout, _layout_data(layout, 9, (0, 0)))
    files = sorted((tmp_path / "acts" / "x" / "c").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 2 and _shard_index(files[0], 4).tobytes() == _shard_index(files[1], 4).tobytes()
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None
    _assert_identical(reader.read((slice(0, 8),)), arr[0:8], "first shard")  # its index is remembered
    _flip(files[1], 5)  # a chunk of the second shard, whose index bytes are the same
    with pytest.raises(ValueError, match="crc32c"):
        reader.read((slice(8, 16),))
    data = files[1].read_bytes()
    files[1].write_bytes(data[:3] + data)  # same index at the end, but 3 more bytes: chunks moved
    with pytest.raises(ValueError):
        ShardReader.of(_open_ro(tmp_path)).read((slice(8, 16),))  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        reader.read((slice(8, 16),))


@pytest.mark.parametrize("shape", [(21,), (21, 5), (21, 2, 3)])
@pytest.mark.parametrize("sel", [(), (slice(0, 21),), (slice(3, 17),), (slice(5, 6),),
                                 (slice(2, 9), slice(1, 2))])
def test_arrays_chunked_by_rows_only_equal_zarr(tmp_path: Path, shape: tuple[int, ...],
                                                sel: tuple[slice, ...]) -> None:
    """Chunks of whole rows (the token arrays) take a shorter plan when whole rows are read: same
    values as zarr, absent chunks (rows 8-11 left as the fill value) and partial chunks included."""
    layout = Layout(shape, (8, *shape[1:]), (2, *shape[1:]), "int32", 3)
    _write_zarr(tmp_path, layout, _layout_data(layout, 11, (8, 12)))
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None and reader._by_rows
    sel = sel[: len(shape)]  # (a 1-D array has no second axis to cut)
    _assert_identical(reader.read(sel), arr[sel], (shape, sel))


@pytest.mark.parametrize("known", [16, 0])
def test_remembered_plans_follow_the_shard_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 known: int) -> None:
    """A read plan is remembered per (shard index, part of the shard, output shape): the full
    shards, whose index bytes are equal, share one; a shard with absent chunks (rows 8-11 left
    as the fill value) has its own. Reads of the same part of every shard, in both orders, and
    of boxes across shards (as a loader's token arrays are read) equal zarr's; with no index
    remembered (each load parses a new one, shard files reopened), no plan is used for another
    index."""
    import ia2cache.store.direct as direct

    monkeypatch.setattr(direct, "_KNOWN_INDEXES", known)
    monkeypatch.setattr(direct, "_KEEP_OPEN", 1)
    layout = Layout((40, 6), (8, 6), (2, 3), "uint16", 0)
    _write_zarr(tmp_path, layout, _layout_data(layout, 13, (8, 12)))
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None
    for s in [*range(5), *reversed(range(5))]:
        for a, b in [(2, 6), (0, 8), (1, 3)]:
            sel = (slice(8 * s + a, 8 * s + b),)
            _assert_identical(reader.read(sel), arr[sel], (known, sel))
    if known:
        assert len(reader._plans) == 2 * 3  # two indexes, three parts each
    for sel in [(), (slice(3, 37),), (slice(5, 30), slice(1, 5))]:
        for _ in range(2):
            _assert_identical(reader.read(sel), arr[sel], (known, sel))


def test_one_plan_serves_parts_at_other_places_of_the_output(tmp_path: Path) -> None:
    """Boxes across several shards on both axes, with absent (rows 2-3) and partly wanted chunks:
    the same part of a shard lands at other columns of equal-shaped outputs (one remembered
    plan, two shifts); each read twice, through one reader, equals zarr."""
    layout = Layout((8, 16), (4, 4), (2, 2), "int32", 3)
    _write_zarr(tmp_path, layout, _layout_data(layout, 17, (2, 4)))
    arr = _open_ro(tmp_path)
    reader = ShardReader.of(arr)
    assert reader is not None
    for sel in [(slice(0, 8), slice(1, 13)), (slice(0, 8), slice(3, 15)), (slice(1, 7), slice(2, 15))]:
        for _ in range(2):
            _assert_identical(reader.read(sel), arr[sel], sel)
