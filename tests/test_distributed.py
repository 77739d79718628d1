"""torchrun: collect split by rank and DDP distill, against single-process runs (gloo, CPU).

The multi-process tests launch the real launcher, ``python -m torch.distributed.run`` (what the
``torchrun`` script runs), with two ranks on the tiny model: about 50 s together on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ia2cache import distributed
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.errors import IA2Error
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.store import VOLATILE_FIELDS, Cache
from tests.conftest import mixed_length_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    return mixed_length_env(tmp_path_factory, tiny_model_dir, "dist")


def _collect_args(env: dict[str, Any], store: Path, t: int) -> list[str]:
    return ["collect", "--model", env["model"], "--task", env["task"], "--n", "12", "--k", "3", "--dev", "6",
            "--dtype", "fp32", "--batch-size", "4", "--shard-rows", "8", "--max-new-tokens", str(t),
            "--store", str(store), "--json"]


def _cfg(env: dict[str, Any], store: Path, t: int) -> CollectConfig:
    return CollectConfig(model=env["model"], task=env["task"], n=12, k=3, dev=6, dtype="fp32", batch_size=4,
                         shard_rows=8, max_new_tokens=t, store=str(store))


def _launch(args: list[str], home: Path, nproc: int = 2, **extra: str) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node=N -m cli -- ARGS``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IA2CACHE_HOME": str(home),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "IA2CACHE_FAULT"):
        env.pop(v, None)
    env.update(extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cli", "--", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _torchrun(args: list[str], home: Path, nproc: int = 2) -> dict[str, Any]:
    """:func:`_launch` that must succeed; the JSON rank 0 printed."""
    p = _launch(args, home, nproc)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stderr[-4000:]}"
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line (rank 0 only), got {lines}"
    return {**json.loads(lines[0]), "_stderr": p.stderr}


def _one_thread() -> Any:
    """torchrun runs each rank with OMP_NUM_THREADS=1; the in-process reference does too."""
    class _Ctx:
        def __enter__(self) -> None:
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc: Any) -> None:
            torch.set_num_threads(self.n)

    return _Ctx()


def _assert_same_cache(ref_path: str, got_path: str) -> None:
    """Every array bit for bit, every ledger entry (checksums, stats), the manifest."""
    a, b = Cache.open(ref_path), Cache.open(got_path)
    assert b.status == "complete" and b.verify() == []
    assert sorted(a.specs) == sorted(b.specs)
    for p in a.specs:
        x, y = a.read(p, 0, a.n_rows), b.read(p, 0, b.n_rows)
        assert x.dtype == y.dtype and x.shape == y.shape, p
        assert x.tobytes() == y.tobytes(), f"{p} differs"
    assert a.done_shards() == b.done_shards() == set(range(a.n_shards))
    for s in range(a.n_shards):
        ea, eb = a.ledger_entry(s).to_json(), b.ledger_entry(s).to_json()
        ea.pop("written")
        eb.pop("written")
        assert ea == eb, f"ledger entry of shard {s} differs"
    ma = {k: v for k, v in a.manifest.items() if k not in VOLATILE_FIELDS}
    mb = {k: v for k, v in b.manifest.items() if k not in VOLATILE_FIELDS}
    assert ma == mb


# ----------------------------------------------------------------------------- no processes


def test_helpers_are_no_ops_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.init() is False
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert distributed.my_share([3, 5, 8]) == [3, 5, 8]
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert distributed.my_share(list(range(8))) == [1, 4, 7]
    assert not distributed.is_main()
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(IA2Error, match="RANK=3"):
        distributed.rank()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(IA2Error, match="WORLD_SIZE='two'"):
        distributed.world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(IA2Error, match="torchrun"):
        distributed.init()


def test_each_rank_computes_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun with CUDA, rank r binds cuda:LOCAL_RANK before joining an NCCL+gloo group
    (CUDA mocked: these machines have none)."""
    import torch.distributed as dist

    from ia2cache.models import default_device

    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.device() == default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device() == torch.device("cuda")  # one process: the current GPU
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.device() == default_device() == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(IA2Error, match="LOCAL_RANK=5 but only 4 CUDA devices"):
        distributed.device()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU shown to each rank
    assert distributed.device() == torch.device("cuda", 0)
    # init: set_device(cuda:LOCAL_RANK), then the group with NCCL for CUDA tensors.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    calls: list[Any] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("group", backend, kw["rank"], kw["world_size"])))
    assert distributed.init() is True
    assert calls == [("set_device", torch.device("cuda", 3)), ("group", "cpu:gloo,cuda:nccl", 3, 4)]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA: gloo, no GPU bound
    assert distributed.init() is True
    assert calls == [("group", "gloo", 3, 4)]


def _collective_worker(out: str) -> None:
    """One rank of :func:`test_collectives_send_json_and_safetensors_not_pickle` (run as a
    subprocess with RANK/WORLD_SIZE/MASTER_* set)."""
    import torch.distributed as dist

    def no_pickle(*a: Any, **k: Any) -> None:
        raise AssertionError("pickled collective used")

    dist.broadcast_object_list = no_pickle  # type: ignore[assignment]
    dist.all_gather_object = no_pickle  # type: ignore[assignment]
    me = distributed.rank()
    res: dict[str, Any] = {}
    obj = {"a": [1, 2.5, None, "é"], "nan": float("nan"), "inf": float("inf")} if me == 0 else None
    got = distributed.broadcast_object(obj)
    res["obj"] = [got["a"], str(got["nan"]), got["inf"]]
    res["tuple"] = distributed.broadcast_object(((1, 2), {"k": 3}) if me == 0 else None)
    res["empty"] = distributed.broadcast_object("" if me == 0 else None)
    src = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "step": torch.tensor(7.0),
           "ids": torch.tensor([3, -1], dtype=torch.int64)}
    t = distributed.broadcast_tensors(src if me == 0 else None)
    res["tensors"] = {k: [str(v.dtype), list(v.shape), v.float().tolist()] for k, v in sorted(t.items())}
    res["no_tensors"] = distributed.broadcast_tensors({} if me == 0 else None)

    def fails() -> int:
        raise OSError(28, "No space left on device", "/full/disk")

    try:
        distributed.rank0_call(fails)
        res["error"] = None
    except IA2Error as e:
        res["error"] = ["IA2Error", str(e)]
    except OSError as e:
        res["error"] = ["OSError", str(e)]
    res["value"] = distributed.rank0_call(lambda: {"missing": [1, 3]})
    distributed.barrier()
    Path(out).write_text(json.dumps(res))


def test_collectives_send_json_and_safetensors_not_pickle(tmp_path: Path) -> None:
    """Two real gloo ranks (plain subprocesses, no torchrun): objects as JSON, tensors as
    safetensors, and rank 0's error reaches rank 1 as an IA2Error instead of a hang."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "IA2CACHE_DIST_TIMEOUT": "60",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = str(tmp_path / f"r{r}.json")
        code = f"from tests.test_distributed import _collective_worker; _collective_worker({out!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0["obj"] == r1["obj"] == [[1, 2.5, None, "é"], "nan", float("inf")]
    assert r1["tuple"] == [[1, 2], {"k": 3}] and r1["empty"] == ""
    assert r0["tensors"] == r1["tensors"] == {
        "ids": ["torch.int64", [2], [3.0, -1.0]], "step": ["torch.float32", [], 7.0],
        "w": ["torch.bfloat16", [2, 3], [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]}
    assert r1["no_tensors"] == {}
    assert r0["error"][0] == "OSError"  # rank 0 keeps its own exception
    assert r1["error"] == ["IA2Error", "rank 0: /full/disk: No space left on device"]
    assert r0["value"] == r1["value"] == {"missing": [1, 3]}


@pytest.fixture(scope="module")
def t1_cache(env: dict[str, Any]) -> str:
    with _one_thread():
        return collect(_cfg(env, env["dir"] / "ref1", t=1)).cache


def test_loader_shares_partition_each_global_batch(t1_cache: str) -> None:
    base = dict(batch_size=4, seed=3, layers=(1,))
    one = CacheLoader(t1_cache, LoaderConfig(**base))
    ranks = [CacheLoader(t1_cache, LoaderConfig(**base, rank=r, world_size=2)) for r in (0, 1)]
    for epoch in (0, 1):
        for ld in (one, *ranks):
            ld.set_epoch(epoch)
        single = list(one)
        shares = [list(ld) for ld in ranks]
        assert len(shares[0]) == len(shares[1]) == len(single) == len(one)
        for k, batch in enumerate(single):
            r0, r1 = shares[0][k], shares[1][k]
            assert r0.rows.tolist() == batch.rows.tolist()[0::2]
            assert r1.rows.tolist() == batch.rows.tolist()[1::2]
            assert r0.global_rows == r1.global_rows == len(batch) == batch.global_rows
            torch.testing.assert_close(torch.cat([r0.acts[1], r1.acts[1]]),
                                       batch.acts[1][[*range(0, len(batch), 2), *range(1, len(batch), 2)]])


def test_loader_refuses_a_rank_without_rows(t1_cache: str) -> None:
    # 12 train rows, batch 5: the last batch has 2 rows, fewer than 3 ranks.
    with pytest.raises(IA2Error, match="--batch-size 5 with 3 ranks"):
        CacheLoader(t1_cache, LoaderConfig(batch_size=5, rank=0, world_size=3))
    with pytest.raises(IA2Error, match="rank 2 of world size 2"):
        LoaderConfig(rank=2, world_size=2)


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_collect_equals_single_process(env: dict[str, Any], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """T=3 (batched decode path), 18 rows in 3 shards: rank 0 writes 2, rank 1 writes 1."""
    with _one_thread():
        ref = collect(_cfg(env, tmp_path / "ref", t=3))
    got = _torchrun(_collect_args(env, tmp_path / "ddp", t=3), tmp_path / "home")
    assert (got["key"], got["status"], got["reused"]) == (ref.key, "complete", False)
    assert got["rows_computed"] == 18 and got["shards_computed"] == 3  # summed over the ranks
    _assert_same_cache(ref.cache, got["cache"])

    # Resume: a single-process run stopped by a write error after its first shard leaves the
    # cache partial; torchrun finishes the two missing shards, one per rank.
    real_write = Cache.write_shard
    calls = {"n": 0}

    def failing(self: Cache, shard: int, data: dict, errors: dict | None = None) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_write(self, shard, data, errors)

    monkeypatch.setattr(Cache, "write_shard", failing)
    with _one_thread(), pytest.raises(IA2Error, match="left partial"):
        collect(_cfg(env, tmp_path / "resume", t=3))
    monkeypatch.undo()
    partial = Cache.open(tmp_path / "resume" / ref.key)
    assert partial.status == "partial" and partial.done_shards() == {0}
    # Another job holds the cache lock: rank 0 cannot take it, and every rank exits with the
    # lock's message instead of waiting at a barrier.
    with partial.lock():
        p = _launch(_collect_args(env, tmp_path / "resume", t=3), tmp_path / "home")
    assert p.returncode != 0
    assert p.stderr.count("another ia2cache process is writing") >= 2, p.stderr[-3000:]
    assert Cache.open(partial.path).done_shards() == {0}  # nothing was written
    again = _torchrun(_collect_args(env, tmp_path / "resume", t=3), tmp_path / "home")
    assert again["shards_computed"] == 2 and again["rows_computed"] == 10
    _assert_same_cache(ref.cache, again["cache"])


def test_torchrun_distill_matches_single_process(env: dict[str, Any], t1_cache: str,
                                                 tmp_path: Path) -> None:
    """Same global batch (4 rows = 2 per rank): the same losses and adapter within fp32 rounding,
    also when the job is killed in phase 2 and resumed from rank 0's checkpoint."""
    common = dict(cache=t1_cache, method="a2t", epochs=2, eval_every=3, batch_size=4, lr=1e-3, device="cpu")
    with _one_thread():
        one = distill(DistillConfig(**common, out=str(tmp_path / "one")))
    args = ["distill", "--cache", t1_cache, "--method", "a2t", "--epochs", "2", "--eval-every", "3",
            "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--out", str(tmp_path / "ddp"), "--json"]
    # 12 train rows, batch 4: 3 steps an epoch, an evaluation (and checkpoint) every epoch. SIGKILL
    # every rank after the 3rd checkpoint (phase 2, step 3), then rerun.
    killed = _launch(args, tmp_path / "home", IA2CACHE_FAULT="distill.after_checkpoint:3")
    assert killed.returncode != 0 and not killed.stdout.strip()
    ddp = tmp_path / "ddp"
    state = json.loads((ddp / "checkpoint" / "state.json").read_text())
    assert (state["phase"], state["step"]) == (1, 3) and not (ddp / "run.json").exists()
    got = _torchrun(args, tmp_path / "home")
    assert "resuming" in got["_stderr"]
    # Only rank 0 wrote: a finished run directory, no checkpoint left behind.
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not (ddp / "checkpoint").exists()
    run = json.loads((ddp / "run.json").read_text())
    assert got["epochs_run"] == one.epochs_run == [2, 2]
    for h1, h2 in zip(one.history, run["history"], strict=True):
        assert (h1["phase"], h1["epoch"]) == (h2["phase"], h2["epoch"])
        for k in ("train_loss", "dev_loss"):
            want = None if h1[k] is None else pytest.approx(h1[k], rel=1e-5, abs=1e-7)
            assert h2[k] == want, (k, h1, h2)
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "one" / "adapter_model.safetensors")
    w2 = load_file(ddp / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and w1
    moved = 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(w1[k], torch.zeros_like(w1[k])))
    assert moved > 0
    # A valid adapter: peft loads it onto the base model and it changes the output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(env["model"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, str(ddp))
        after = peft(input_ids=ids).logits
    assert not torch.allclose(before, after)
    assert np.isfinite(after.numpy()).all()


_NAN_ON_RANK_1 = """
import os, sys, torch
import ia2cache.collect as c
real = c.load_model
def poisoned(*a, **k):
    loaded = real(*a, **k)
    if os.environ["RANK"] == "1":  # a teacher that overflows on this rank only
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.fill_(float("nan"))
    return loaded
c.load_model = poisoned
from cli.main import main
sys.argv = ["ia2cache", *[a for a in sys.argv[1:2] if a != "--"], *sys.argv[2:]]
main()
"""


def test_a_failing_rank_stops_the_job_promptly(env: dict[str, Any], tmp_path: Path) -> None:
    """Rank 1's teacher gives NaN: it refuses its shard and exits 2 at once; torchrun's agent then
    stops rank 0, which waits at the barrier, long before the collective timeout (1800 s)."""
    import time

    e = {**os.environ, "OMP_NUM_THREADS": "1", "IA2CACHE_HOME": str(tmp_path / "home"),
         "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "IA2CACHE_FAULT",
              "IA2CACHE_DIST_TIMEOUT"):
        e.pop(v, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--no-python", sys.executable, "-c", _NAN_ON_RANK_1, "--",
           *_collect_args(env, tmp_path / "store", t=1)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert p.returncode != 0, p.stderr[-3000:]
    assert "the teacher produced non-finite activations" in p.stderr, p.stderr[-3000:]
    assert took < 90, f"the job took {took:.0f} s to stop"
    caches = list((tmp_path / "store").iterdir())
    assert len(caches) == 1 and Cache.open(caches[0]).status == "partial"
