from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.loader import ORDER, Batch, CacheLoader, LoaderConfig, default_read_rows
from ia2cache.models import ModelInfo, load_model
from ia2cache.store import Cache, decode_activations
from tests.conftest import write_task

WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy", "The food was great"]
SITE = "attn"
ACTS = "acts/attn"
PAD = 7  # a pad id that is not 0, so that pad substitution is visible


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> str:
    """A bf16 cache with top-k logits: 30 train rows then 15 dev rows, in chunks of 4 rows.

    The split boundary (row 30) cuts the chunk [28, 32) in two partial chunks.
    """
    d = tmp_path_factory.mktemp("loader")
    write_task(d / "task.jsonl", ((" ".join(WORDS[: 1 + (i * 5) % 9]) + f" {i}", WORDS[(i * 3) % 5])
                                  for i in range(90)))
    loaded = load_model(str(tiny_model_dir), device="cpu")
    cfg = CollectConfig(model=str(tiny_model_dir), task=str(d / "task.jsonl"), n=30, k=3,
                        store=str(d / "store"), dtype="bf16", batch_size=8, shard_rows=8, chunk_rows=4,
                        max_new_tokens=2, topk_logits=3)
    res = collect(cfg, loaded)
    c = Cache.open(res.cache)
    m = c.manifest
    assert (m["n_train"], m["n_dev"], m["layers"], c.rows_per_chunk) == (30, 15, [0, 1, 2, 3], 4)
    return res.cache


def _loader(path: str | Cache, **kw: Any) -> CacheLoader:
    base: dict[str, Any] = {"batch_size": 3, "shuffle_buffer": 4, "read_rows": 4}  # the chunk
    base.update(kw)
    return CacheLoader(path, LoaderConfig(**base), pad_id=PAD)


def _rows(batches: list[Batch]) -> list[int]:
    return [r for b in batches for r in b.rows.tolist()]


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.acts.keys() == y.acts.keys()
        for name in ("rows", "student_ids", "response_ids", "target_ids", "student_positions",
                     "position_mask", "topk_values", "topk_ids"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or torch.equal(u, v), name
        for i in x.acts:
            assert torch.equal(x.acts[i], y.acts[i])


def _assert_matches_cache(c: Cache, batch: Batch, dtype: torch.dtype | None = None) -> None:
    """Every field of ``batch`` against reads of its rows straight from the cache (activations as
    stored, bf16, unless the loader converted them to ``dtype``)."""
    rows = batch.rows.tolist()

    def read(path: str) -> np.ndarray:
        return np.concatenate([c.read(path, r, r + 1) for r in rows])

    s_len = read("tokens/student_len")
    assert batch.student_len.tolist() == s_len.tolist()
    assert batch.student_ids.shape[1] == s_len.max()
    for i, r in enumerate(rows):
        ids = c.read("tokens/student_ids", r, r + 1)[0]
        assert batch.student_ids[i, : s_len[i]].tolist() == ids[: s_len[i]].tolist()
        assert (batch.student_ids[i, s_len[i] :] == PAD).all()
    resp, r_len = read("tokens/response_ids"), read("tokens/response_len")
    assert batch.response_len.tolist() == r_len.tolist()
    assert batch.response_ids.tolist() == np.where(resp < 0, PAD, resp).tolist()
    tgt, g_len = read("tokens/target_ids"), read("tokens/target_len")
    assert batch.target_len.tolist() == g_len.tolist()
    assert batch.target_ids.tolist() == np.where(tgt < 0, PAD, tgt)[:, : g_len.max()].tolist()
    n = read("tokens/positions_len")
    sp = read("tokens/student_positions")
    mask = np.arange(sp.shape[1])[None, :] < n[:, None]
    assert batch.position_mask.tolist() == mask.tolist()
    assert batch.student_positions.tolist() == np.where(mask, sp, 0).tolist()
    assert batch.topk_values is not None and batch.topk_ids is not None
    assert torch.equal(batch.topk_values, torch.from_numpy(read("logits/topk_values")))
    ids = read("logits/topk_ids")
    assert (ids[~mask] == -1).all()  # pads in the store ...
    assert batch.topk_ids.tolist() == np.where(ids < 0, 0, ids).tolist()  # ... are 0 in the batch
    for layer, a in batch.acts.items():
        bits = np.concatenate([c.read(ACTS, r, r + 1, layers=[layer])[:, 0] for r in rows])
        want = decode_activations(bits, c.specs[ACTS].logical_dtype)
        assert a.dtype == (dtype or torch.bfloat16)
        assert torch.equal(a, want if dtype is None else want.to(dtype)), layer


# ----------------------------------------------------------------------------- contents


def test_batches_hold_exactly_the_cache_rows(cache_path: str) -> None:
    c = Cache.open(cache_path)
    loader = _loader(c, batch_size=4, shuffle_buffer=3, prefetch=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 8  # ceil(30 / 4)
    assert [len(b) for b in batches] == [4] * 7 + [2]
    assert sorted(_rows(batches)) == list(range(30))
    for b in batches:
        _assert_matches_cache(c, b)
    assert loader.chunks_read == 8  # 7 whole chunks and the partial [28, 30), each once
    # Exactly the train rows of the 4 layers were read, as stored (2 bytes per bf16 value).
    _, p, h = c.specs[ACTS].shape
    assert loader.bytes_read == 4 * 30 * p * h * 2
    assert loader.wait_seconds > 0


def test_dev_split_in_row_order(cache_path: str) -> None:
    c = Cache.open(cache_path)
    dev = _loader(cache_path, split="dev", shuffle=False, batch_size=4)
    assert dev.rows == range(30, 45)
    batches = list(dev)
    assert _rows(batches) == list(range(30, 45)) == dev.order(0) == dev.order(3)
    for b in batches:
        _assert_matches_cache(c, b)
    assert dev.chunks_read == 5  # [30, 32) (cut by the boundary), [32, 36), ..., [44, 45)
    assert not set(_rows(batches)) & set(_loader(cache_path).order(0))
    assert _loader(cache_path, shuffle=False).order(0) == list(range(30))


def test_drop_last_and_batch_to(cache_path: str) -> None:
    loader = _loader(cache_path, batch_size=4, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 7 and all(len(b) == 4 for b in batches)
    assert _rows(batches) == loader.order(0)[:28]
    moved = batches[0].to("meta")
    assert moved.acts[2].device.type == "meta" and moved.student_ids.device.type == "meta"
    assert moved.topk_ids is not None and moved.topk_ids.device.type == "meta"
    assert batches[0].acts[2].device.type == "cpu"  # the original is untouched


# ----------------------------------------------------------------------------- order


def test_order_is_seeded_deterministic_and_a_permutation(cache_path: str) -> None:
    a, b = _loader(cache_path, seed=3), _loader(cache_path, seed=3)
    for epoch in range(2):
        ba, bb = list(a), list(b)
        _assert_same(ba, bb)
        assert _rows(ba) == a.order(epoch)
        assert sorted(_rows(ba)) == list(range(30))
        want = {"epoch": epoch + 1, "position": 0, "seed": 3, "order": ORDER, "read_rows": 4}
        assert a.state_dict() == want
    assert a.order(0) != a.order(1)
    other = _loader(cache_path, seed=4)
    assert other.order(0) != a.order(0) and sorted(other.order(0)) == list(range(30))


def test_order_follows_the_seeded_chunk_permutation(cache_path: str) -> None:
    """With a one-row window, rows leave in stream order: the chunks as the spec permutes them."""
    c, reads = _recording(cache_path)
    loader = _loader(c, shuffle_buffer=1, seed=5)
    chunks = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24), (24, 28), (28, 30)]
    for epoch in (0, 1):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, epoch])))
        want = [r for i in rng.permutation(len(chunks)) for r in range(*chunks[i])]
        assert loader.order(epoch) == want
    # A window as large as the split is a full shuffle: rows of one chunk spread out.
    big = _loader(c, shuffle_buffer=30, seed=5).order(0)
    assert sorted(big) == list(range(30)) and big != loader.order(0)
    assert reads == []  # the order is computed without reading data


@pytest.mark.parametrize("window", [3, 8, 11])
def test_order_permutes_each_window_of_the_chunk_stream(cache_path: str, window: int) -> None:
    """The spec of the module docstring: each consecutive run of ``shuffle_buffer`` rows of the
    permuted chunk stream is permuted in place, with the same generator, window after window."""
    chunks = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24), (24, 28), (28, 30)]
    got = _loader(cache_path, shuffle_buffer=window, seed=2).order(1)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([2, 1])))
    stream = [r for i in rng.permutation(len(chunks)) for r in range(*chunks[i])]
    want = []
    for s in range(0, 30, window):
        run = stream[s : s + window]
        want += [run[j] for j in rng.permutation(len(run))]
    assert got == want
    for s in range(0, 30, window):  # a row never leaves its window
        assert sorted(got[s : s + window]) == sorted(stream[s : s + window])


# ----------------------------------------------------------------------------- resume


def test_mid_epoch_resume_is_exact(cache_path: str) -> None:
    ref = list(_loader(cache_path, seed=1))
    first = _loader(cache_path, seed=1)
    it = iter(first)
    head = [next(it), next(it)]
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 2, "seed": 1, "order": ORDER, "read_rows": 4}
    it.close()
    assert first.state_dict() == state  # abandoning the iterator keeps the position
    resumed = _loader(cache_path, seed=1)
    resumed.load_state_dict(state)
    tail = list(resumed)
    _assert_same(head + tail, ref)
    # Chunks whose rows were all consumed by the first 2 batches are not read again.
    rest = resumed.order(0)[6:]
    assert resumed.chunks_read == len({r // 4 for r in rest})
    assert resumed.state_dict() == {"epoch": 1, "position": 0, "seed": 1, "order": ORDER, "read_rows": 4}


def test_resume_across_the_epoch_boundary(cache_path: str) -> None:
    ref = _loader(cache_path, seed=2)
    ref0, ref1 = list(ref), list(ref)
    run = _loader(cache_path, seed=2)
    states = []
    for _ in run:
        states.append(run.state_dict())
    # saved inside the loop
    assert states[-1] == {"epoch": 0, "position": len(run), "seed": 2, "order": ORDER, "read_rows": 4}
    it = iter(run)
    got = [next(it) for _ in range(3)]
    state = run.state_dict()
    it.close()
    assert state == {"epoch": 1, "position": 3, "seed": 2, "order": ORDER, "read_rows": 4}
    later = _loader(cache_path, seed=2)
    later.load_state_dict(state)
    _assert_same(got + list(later), ref1)
    # A state saved after the last batch, before the loop ended: the epoch has nothing left.
    end = _loader(cache_path, seed=2)
    end.load_state_dict(states[-1])
    assert list(end) == []
    assert end.state_dict() == {"epoch": 1, "position": 0, "seed": 2, "order": ORDER, "read_rows": 4}
    _assert_same(list(end), ref1)
    end.set_epoch(0)
    _assert_same(list(end), ref0)


def test_load_state_refuses_another_seed_or_range(cache_path: str) -> None:
    loader = _loader(cache_path, seed=0)
    with pytest.raises(IA2Error, match="--seed 0.*seed 9"):
        loader.load_state_dict({"epoch": 0, "position": 1, "seed": 9, "order": ORDER})
    with pytest.raises(IA2Error, match="out of range"):
        loader.load_state_dict({"epoch": 0, "position": len(loader) + 1, "seed": 0, "order": ORDER})


def test_load_state_refuses_a_mid_epoch_state_of_another_order(cache_path: str) -> None:
    """A state saved mid-epoch by a loader of the earlier row order (no "order": a shuffle
    buffer) cannot say which rows come next: refused. At an epoch's start it resumes."""
    loader = _loader(cache_path, seed=0)
    with pytest.raises(IA2Error, match="another row order.*'shuffle-buffer'.*epoch boundary"):
        loader.load_state_dict({"epoch": 0, "position": 1, "seed": 0})
    loader.load_state_dict({"epoch": 2, "position": 0, "seed": 0})
    assert loader.state_dict() == {"epoch": 2, "position": 0, "seed": 0, "order": ORDER, "read_rows": 4}


# ----------------------------------------------------------------------------- reading


def _recording(path: str) -> tuple[Cache, list[tuple[str, int, int, Any]]]:
    """A cache whose reads (one at a time, or several in one call) are recorded."""
    c = Cache.open(path)
    reads: list[tuple[str, int, int, Any]] = []
    orig, orig_many = c.read, c.read_many

    def read(p: str, a: int, b: int, layers: Any = None) -> np.ndarray:
        reads.append((p, a, b, layers))
        return orig(p, a, b, layers=layers)

    def read_many(requests: list[tuple[str, int, int]], layers: Any = None,
                  alloc: Any = np.empty) -> list[np.ndarray]:
        reads.extend((p, a, b, layers) for p, a, b in requests)
        return orig_many(requests, layers=layers, alloc=alloc)

    c.read = read  # type: ignore[method-assign]
    c.read_many = read_many  # type: ignore[method-assign]
    return c, reads


def test_layer_subset_reads_only_those_layers(cache_path: str) -> None:
    c, reads = _recording(cache_path)
    loader = _loader(c, layers=(3, 1))
    assert loader.layers == [3, 1]
    batches = list(loader)
    # One array, one read per chunk, for the asked layers only (in the order asked).
    assert {(p, tuple(layers)) for p, _, _, layers in reads if p.startswith("acts/")} == {(ACTS, (3, 1))}
    # Activations are read chunk by chunk, never the whole split at once.
    assert {b - a for p, a, b, _ in reads if p.startswith("acts/")} <= {2, 4}
    # Train rows only: the chunk the split cuts is read for its train rows.
    assert all(a >= 0 and b <= 30 for _, a, b, _ in reads)
    plain = Cache.open(cache_path)
    for b in batches:
        assert set(b.acts) == {1, 3}
        _assert_matches_cache(plain, b)
    c2, reads2 = _recording(cache_path)
    none = _loader(c2, layers=(), topk=False)
    batch = next(iter(none))
    assert batch.acts == {} and batch.topk_values is None and batch.topk_ids is None
    assert not [p for p, _, _, _ in reads2 if not p.startswith("tokens/")]
    assert none.bytes_read == 0


def test_bf16_decoding_is_exact(cache_path: str) -> None:
    c = Cache.open(cache_path)
    bf = next(iter(_loader(c, dtype="bfloat16", layers=(2,))))
    f32 = next(iter(_loader(c, dtype="float32", layers=(2,))))
    assert torch.equal(bf.rows, f32.rows)
    bits = np.concatenate([c.read(ACTS, r, r + 1, layers=[2])[:, 0] for r in bf.rows.tolist()])
    assert bits.dtype == np.uint16 and bits.any()
    assert bf.acts[2].dtype == torch.bfloat16
    assert np.array_equal(bf.acts[2].view(torch.uint16).numpy(), bits)
    assert f32.acts[2].dtype == torch.float32
    assert torch.equal(f32.acts[2], bf.acts[2].float())
    widened = (bits.astype(np.uint32) << 16).view(np.float32)  # bf16 -> fp32 by hand
    assert np.array_equal(f32.acts[2].numpy(), widened)


def test_batches_hold_the_stored_dtype_and_convert_on_the_device(cache_path: str, tmp_path: Path) -> None:
    batch = next(iter(_loader(cache_path, layers=(1, 2))))
    assert batch.acts[1].dtype == torch.bfloat16 and batch.act_scales is None
    on_device = batch.activations("cpu")
    assert set(on_device) == {1, 2}
    for layer, a in on_device.items():
        assert a.dtype == torch.float32 and torch.equal(a, batch.acts[layer].float())
    # int8: the int8 values and their per-vector scales travel; the product is taken on the device
    c = _synthetic(tmp_path, 12, 4, 4, dtype="int8")
    loader = CacheLoader(c, LoaderConfig(batch_size=4, seed=1))
    assert not loader._pin or torch.cuda.is_available()  # pinned memory only where CUDA is
    for b in loader:
        assert b.acts[5].dtype == torch.int8 and b.act_scales is not None
        assert b.act_scales[5].shape == (len(b), 2) and b.act_scales[5].dtype == torch.float32
        want = b.rows.float()[:, None, None].expand(-1, 2, 3)
        assert torch.equal(b.activations("cpu")[5], want)  # a constant vector is exact in int8
    f32 = CacheLoader(c, LoaderConfig(batch_size=4, seed=1, dtype="float32"))  # converted in the loader
    assert [torch.equal(x.acts[5], x.rows.float()[:, None, None].expand(-1, 2, 3)) for x in f32] == [True] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_with_cuda(cache_path: str) -> None:
    batch = next(iter(_loader(cache_path, layers=(1,), pin_memory=True)))
    assert batch.acts[1].is_pinned()
    assert batch.activations("cuda")[1].device.type == "cuda"


def test_reader_errors_reach_the_consumer(cache_path: str) -> None:
    c = Cache.open(cache_path)
    orig = c.read_many
    calls = {"n": 0}

    def flaky(requests: list[tuple[str, int, int]], layers: Any = None,
              alloc: Any = np.empty) -> list[np.ndarray]:
        if any(p.startswith("acts/") for p, _, _ in requests):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk on fire")
        return orig(requests, layers=layers, alloc=alloc)

    c.read_many = flaky  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk on fire"):
        list(_loader(c, layers=(0,), batch_size=4, prefetch=1))  # one chunk a read
    assert _loader_threads() == []


# ----------------------------------------------------------------------------- refusals


def test_partial_cache_refused(cache_path: str, tmp_path: Path) -> None:
    copy = tmp_path / "partial"
    shutil.copytree(cache_path, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["manifest"]["status"] = "partial"
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(IA2Error, match=r"partial, not complete.*ia2cache collect"):
        CacheLoader(copy, LoaderConfig())


def test_model_mismatch_refused_unless_allowed(cache_path: str, caplog: pytest.LogCaptureFixture) -> None:
    m = Cache.open(cache_path).manifest["model"]
    same = ModelInfo("tiny", "/x", m["fingerprint"], m["tokenizer_fingerprint"])
    assert len(CacheLoader(cache_path, LoaderConfig(), model_info=same)) == 8
    other = ModelInfo("other", "/y", "f" * 16, m["tokenizer_fingerprint"])
    with pytest.raises(IA2Error) as e:
        CacheLoader(cache_path, LoaderConfig(), model_info=other)
    msg = str(e.value)
    assert m["fingerprint"] in msg and "f" * 16 in msg and "--allow-model-mismatch" in msg
    tok = ModelInfo("tiny", "/x", m["fingerprint"], "0" * 16)
    with pytest.raises(IA2Error, match="0" * 16):
        CacheLoader(cache_path, LoaderConfig(), model_info=tok)
    loader = CacheLoader(cache_path, LoaderConfig(), model_info=other, allow_model_mismatch=True)
    assert len(next(iter(loader))) == 4
    assert "allow-model-mismatch" in caplog.text


def test_layer_not_in_cache_refused(cache_path: str) -> None:
    with pytest.raises(IA2Error, match=r"--layers 1,7: layer\(s\) \[7\] not in cache"):
        _loader(cache_path, layers=(1, 7))


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"batch_size": 0}, "--batch-size 0"),
        ({"split": "eval"}, "split 'eval'"),
        ({"layers": (1, 1)}, "--layers"),
        ({"seed": -1}, "--seed -1"),
        ({"shuffle_buffer": 0}, "shuffle_buffer 0"),
        ({"prefetch": 0}, "prefetch 0"),
        ({"dtype": "int8"}, "dtype 'int8'"),
    ],
)
def test_bad_config_refused(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(IA2Error, match=needle):
        LoaderConfig(**kw)


# ----------------------------------------------------------------------------- memory, thread


def test_batch_memory_is_reused_only_once_no_batch_holds_it(tmp_path: Path) -> None:
    """Batches are stacked into reused memory, but never into one a caller still holds: kept
    batches (or one layer's view of one) keep their values while the epoch goes on."""
    c = _synthetic(tmp_path, 64, 0, 4)
    cfg = LoaderConfig(batch_size=4, shuffle_buffer=8, seed=1, keep_in_memory_mb=0, pin_memory=False)
    kept = list(CacheLoader(c, cfg))  # every batch held: none may share memory with another
    assert len({b.acts[5].data_ptr() for b in kept}) == len(kept) == 16
    for b in kept:
        assert torch.equal(b.acts[5].float(), b.rows.float()[:, None, None].expand(-1, 2, 3))
    loader = CacheLoader(c, cfg)
    ptrs: set[int] = set()
    views: list[tuple[Any, torch.Tensor]] = []
    for i, b in enumerate(loader):  # each batch dropped at the next: its memory comes back
        ptrs.add(b.acts[5].data_ptr())
        assert torch.equal(b.acts[5].float(), b.rows.float()[:, None, None].expand(-1, 2, 3))
        if i == 2:  # a view of one layer outlives its batch
            views.append((b.acts[5][1:], b.rows[1:].clone()))
        if i == 5:  # and so does a NumPy view of it, or the same batch "moved" to the CPU
            views.append((b.acts[5].view(torch.int16).numpy(), b.rows.clone()))
            views.append((b.to("cpu").acts[5], b.rows.clone()))
    assert len(ptrs) < 16  # reused
    assert len(views) == 3
    for got, rows in views:
        want = rows.float()[:, None, None].expand(-1, 2, 3)
        if isinstance(got, np.ndarray):
            got = torch.from_numpy(got).view(torch.bfloat16)
        assert torch.equal(got.float(), want)


def test_memory_stays_bounded(cache_path: str) -> None:
    bs, buf, rpc, prefetch = 1, 4, 4, 1
    bound_rows = bs + 2 * (buf + rpc)  # see the module docstring
    for seed in range(4):
        loader = _loader(cache_path, batch_size=bs, shuffle_buffer=buf, prefetch=prefetch, seed=seed,
                         layers=(0,), keep_in_memory_mb=0)  # the streaming path
        for _ in range(2):
            assert len(list(loader)) == 30
        assert loader.chunks_read == 16  # 8 chunks per epoch, each read once
        assert 4 <= loader.max_rows_held <= bound_rows < 30
        assert loader.max_chunks_held <= math.ceil(bound_rows / rpc) + prefetch


def test_a_large_window_holds_its_chunks_and_no_more(tmp_path: Path) -> None:
    """A 64-row window over 8-row chunks: the chunks of the windows a batch touches are held (64
    rows here), never more than bs + 2 * (window + rpc); no row is copied but into its batch."""
    c = _synthetic(tmp_path, 400, 8, 8)
    for seed in range(3):
        loader = CacheLoader(c, LoaderConfig(batch_size=4, shuffle_buffer=64, seed=seed, keep_in_memory_mb=0))
        assert len(_rows(list(loader))) == 400
        assert 64 <= loader.max_rows_held <= 4 + 2 * (64 + 8)


def _loader_threads() -> list[threading.Thread]:
    deadline = time.monotonic() + 5
    while True:
        alive = [t for t in threading.enumerate() if t.name.startswith("ia2cache-loader") and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def test_reader_thread_ends_when_the_iteration_is_abandoned(cache_path: str) -> None:
    loader = _loader(cache_path, batch_size=1, prefetch=1)
    seen = []
    for b in loader:
        seen.append(b)
        running = [t for t in threading.enumerate() if t.name.startswith("ia2cache-loader")]
        assert running and all(t.daemon for t in running)
        break
    assert _loader_threads() == []
    assert loader.state_dict()["position"] == 1
    it: Iterator[Batch] = iter(loader)
    next(it)
    del it  # garbage, never closed explicitly
    assert _loader_threads() == []
    assert loader.state_dict()["position"] == 2


# ----------------------------------------------------------------------------- varied chunking


def _synthetic(store: Path, n_train: int, n_dev: int, rpc: int, dtype: str = "bf16") -> Cache:
    """A cache written through the store API whose activations spell out their row: x[r, j, h] = r."""
    from ia2cache.store import ACT_DTYPES, ArraySpec, encode_activations, scale_path

    n, p, h = n_train + n_dev, 2, 3
    d = ACT_DTYPES[dtype]
    scales = scale_path(SITE) if dtype == "int8" else None
    act = ArraySpec(ACTS, (1, p, h), d.stored, d.logical, stats=True, scales=scales)
    ragged = ("student_ids", "response_ids", "target_ids", "student_positions")
    lens = ("student_len", "response_len", "target_len", "positions_len")
    specs = [act, *(ArraySpec(f"tokens/{k}", (4,), "int32") for k in ragged),
             *(ArraySpec(f"tokens/{k}", (), "int32") for k in lens)]
    if scales:
        specs.append(ArraySpec(scales, (1, p), "float32"))
    manifest = {"model": {"fingerprint": "a", "tokenizer_fingerprint": "b"}, "site": SITE, "layers": [5],
                "n_train": n_train, "n_dev": n_dev}
    c = Cache.create_or_open(store, "0123456789abcdef", manifest, specs, n, rpc * 2, rpc)
    rows = np.arange(n)
    ids = np.where(np.arange(4)[None, :] < 2, rows[:, None], -1).astype(np.int32)
    data = {f"tokens/{k}": ids for k in ragged} | {f"tokens/{k}": np.full(n, 2, np.int32) for k in lens}
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, p, h)
    enc = encode_activations(x, dtype)
    data[act.path] = enc.values
    if scales:
        data[scales] = enc.scales
    for s in range(c.n_shards):
        a, b = c.shard_rows(s)
        c.write_shard(s, {k: v[a:b] for k, v in data.items()})
    c.finalize()
    return c


@pytest.mark.parametrize(
    ("n_train", "rpc", "bs", "buf", "drop_last"),
    [(29, 4, 3, 5, False), (29, 8, 2, 3, True), (40, 3, 4, 64, False), (17, 1, 5, 2, True)],
)
def test_every_resume_point_and_memory_bound(tmp_path: Path, n_train: int, rpc: int, bs: int, buf: int,
                                             drop_last: bool) -> None:
    c = _synthetic(tmp_path, n_train, 7, rpc)
    cfg = LoaderConfig(batch_size=bs, shuffle_buffer=buf, drop_last=drop_last, seed=11, prefetch=1)
    full = CacheLoader(c, cfg)
    unit = 2 * rpc  # the default read unit: two chunks (a shard of the synthetic cache)
    ref = [list(full) for _ in range(2)]
    n_batches = n_train // bs if drop_last else math.ceil(n_train / bs)
    for epoch, batches in enumerate(ref):
        assert len(batches) == len(full) == n_batches
        assert _rows(batches) == full.order(epoch)[: n_batches * bs]
        for b in batches:  # the activations name their own row
            assert torch.equal(b.acts[5].float(), b.rows.float()[:, None, None].expand(-1, 2, 3))
            assert b.student_ids.tolist() == [[r, r] for r in b.rows.tolist()]
    assert full.max_rows_held <= bs + 2 * (buf + unit)
    for pos in range(n_batches + 1):
        loader = CacheLoader(c, cfg)
        loader.load_state_dict({"epoch": 1, "position": pos, "seed": 11, "order": ORDER, "read_rows": unit})
        _assert_same(list(loader), ref[1][pos:])
        needed = {r // unit for r in full.order(1)[pos * bs : n_batches * bs]}
        assert loader.chunks_read == len(needed)


def test_read_rows_reads_bigger_units_and_keeps_every_row_once(tmp_path: Path) -> None:
    path = _synthetic(tmp_path, n_train=96, n_dev=4, rpc=4)  # shards of 8 rows
    small = CacheLoader(path, LoaderConfig(batch_size=8, seed=3, read_rows=4))
    default = CacheLoader(path, LoaderConfig(batch_size=8, seed=3))  # two chunks
    big = CacheLoader(path, LoaderConfig(batch_size=8, seed=3, read_rows=16))
    for loader in (small, default, big):
        rows = [int(r) for b in loader for r in b.rows]
        assert sorted(rows) == list(range(96))
    assert (small.chunks_read, default.chunks_read, big.chunks_read) == (24, 12, 6)
    assert default.state_dict()["read_rows"] == 8
    with pytest.raises(IA2Error, match="read_rows 6"):
        CacheLoader(path, LoaderConfig(read_rows=6))


@pytest.mark.parametrize(("rpc", "rps", "want"), [(4, 8, 8), (4, 12, 4), (8, 32, 16), (1, 1, 1), (3, 6, 6)])
def test_the_default_unit_is_two_chunks_where_a_shard_holds_an_even_number(rpc: int, rps: int,
                                                                             want: int) -> None:
    assert default_read_rows(rpc, rps) == want


def _head_and_state(path: Cache, n: int, **kw: Any) -> tuple[list[Batch], dict]:
    """The first ``n`` batches of a loader and its state after them."""
    loader = CacheLoader(path, LoaderConfig(batch_size=4, seed=1, **kw))
    it = iter(loader)
    head = [next(it) for _ in range(n)]
    state = loader.state_dict()
    it.close()
    return head, state


def test_a_mid_epoch_state_keeps_its_read_unit(tmp_path: Path) -> None:
    """The unit decides a shuffled order: a mid-epoch state records it. A loader left to its
    default unit (read_rows None: distill's) takes the state's, and one saved before units were
    recorded (no "read_rows") had read_rows or the chunk; an explicit other read_rows is refused.
    Every resume that is accepted continues exactly."""
    path = _synthetic(tmp_path, n_train=32, n_dev=4, rpc=4)  # shards of 8 rows: default unit 8

    def full(**kw: Any) -> list[Batch]:
        return list(CacheLoader(path, LoaderConfig(batch_size=4, seed=1, **kw)))

    head, state = _head_and_state(path, 2, read_rows=4)
    assert state["read_rows"] == 4
    with pytest.raises(IA2Error, match="units of 4 rows.*read_rows=8, 8 rows"):
        CacheLoader(path, LoaderConfig(batch_size=4, seed=1, read_rows=8)).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "read_rows"}
    for saved in (state, legacy):  # the default unit follows the state, legacy states the chunk
        resumed = CacheLoader(path, LoaderConfig(batch_size=4, seed=1))
        resumed.load_state_dict(saved)
        _assert_same(head + list(resumed), full(read_rows=4))
        assert resumed.state_dict()["read_rows"] == 4
    head16, state16 = _head_and_state(path, 3, read_rows=16)
    again = CacheLoader(path, LoaderConfig(batch_size=4, seed=1, read_rows=16))
    again.load_state_dict({k: v for k, v in state16.items() if k != "read_rows"})  # legacy, explicit unit
    _assert_same(head16 + list(again), full(read_rows=16))
    # Unshuffled, or at an epoch boundary, the rows to come do not depend on the unit.
    head_rows, state_rows = _head_and_state(path, 2, read_rows=4, shuffle=False)
    plain = CacheLoader(path, LoaderConfig(batch_size=4, seed=1, read_rows=8, shuffle=False))
    plain.load_state_dict(state_rows)
    _assert_same(head_rows + list(plain), full(read_rows=8, shuffle=False))
    fresh = CacheLoader(path, LoaderConfig(batch_size=4, seed=1, read_rows=8))
    fresh.load_state_dict({**state, "epoch": 1, "position": 0})
    assert _rows(list(fresh)) == fresh.order(1) and fresh.state_dict()["read_rows"] == 8


def test_small_split_is_kept_in_memory_after_the_first_epoch(cache_path: str) -> None:
    kept = _loader(cache_path, batch_size=4, seed=5)
    streamed = _loader(cache_path, batch_size=4, seed=5, keep_in_memory_mb=0)
    for epoch in range(3):
        a, b = list(kept), list(streamed)
        assert [x.rows.tolist() for x in a] == [y.rows.tolist() for y in b]
        for x, y in zip(a, b, strict=True):
            for layer in x.acts:
                assert torch.equal(x.acts[layer], y.acts[layer])
        assert kept.chunks_read == 8 and streamed.chunks_read == 8 * (epoch + 1)


def test_a_batch_alone_is_its_own_global_batch() -> None:
    z = torch.zeros(3, 2, dtype=torch.int64)
    n = torch.full((3,), 2, dtype=torch.int64)

    def batch(**kw: Any) -> Batch:
        return Batch(rows=torch.arange(3), student_ids=z, student_len=n, response_ids=z, response_len=n,
                     target_ids=z, target_len=n, student_positions=z, position_mask=z.bool(),
                     acts={1: torch.zeros(3, 2, 4)}, **kw)

    assert batch().global_rows == 3  # the docstring's "equals B alone"
    assert batch().to("cpu").global_rows == 3
    assert batch(global_rows=8).global_rows == 8  # a rank's share of a global batch of 8
