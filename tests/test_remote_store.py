"""Remote stores: ``--store s3://bucket/prefix`` against an S3-compatible server on loopback.

The server is moto's standalone server (``pip install 'moto[server]' s3fs``, the ``test``
extra), started by the fixture on a free port of 127.0.0.1; the tests skip when it is absent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.errors import IA2Error
from ia2cache.store import Cache, list_caches, resolve_cache
from ia2cache.store import lock as lock_mod
from ia2cache.store.locations import RemotePath
from ia2cache.store.lock import remote_lock
from tests.conftest import mixed_length_env

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ia2cache-test"

try:
    import moto.server  # noqa: F401
    import s3fs
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"remote-store tests need moto[server] and s3fs (the test extra): {e}",
                allow_module_level=True)


# s3fs leaves aiohttp sessions for the garbage collector; their "Unclosed client session"
# report would be logged after pytest has closed its streams.
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback, the environment that points botocore at it, and a bucket."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.skip(f"moto server did not start: {log.read_text()[-500:]}")
                    time.sleep(0.1)
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(BUCKET)
            yield env
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    return mixed_length_env(tmp_path_factory, tiny_model_dir, "remote")


def _cli(args: list[str], s3_env: dict[str, str], home: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **s3_env, **extra, "OMP_NUM_THREADS": "1", "IA2CACHE_HOME": str(home),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _collect_args(task: dict[str, Any], store: str) -> list[str]:
    return ["collect", "--model", task["model"], "--task", task["task"], "--n", "12", "--dev", "6",
            "--k", "3",
            "--dtype", "fp32", "--batch-size", "4", "--shard-rows", "8", "--max-new-tokens", "1",
            "--store", store, "--json"]


def test_collect_kill_resume_verify_distill_on_s3(s3: dict[str, str], task: dict[str, Any],
                                                  tmp_path: Path) -> None:
    store = f"s3://{BUCKET}/runs/a"
    home = tmp_path / "home"
    # 1. SIGKILL after the second shard's arrays are written, before its ledger entry.
    killed = _cli(_collect_args(task, store), s3, home, IA2CACHE_FAULT="store.before_ledger:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    caches = list_caches(store)
    assert len(caches) == 1 and caches[0]["status"] == "partial"
    key = caches[0]["key"]
    part = Cache.open(f"{store}/{key}")
    assert isinstance(part.path, RemotePath) and part.done_shards() == {0}
    assert {(p.array, p.rows) for p in part.verify()} == {("*", (8, 16)), ("*", (16, 18))}
    # The killed writer's lock object was taken over (same host, its pid is gone).
    again = _cli(_collect_args(task, store), s3, home)
    assert again.returncode == 0, again.stderr[-2000:]
    res = json.loads(again.stdout)
    assert (res["key"], res["status"], res["shards_computed"]) == (key, "complete", 2)
    assert res["rows_computed"] == 10
    assert res["cache"] == f"{store}/{key}"
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/runs/a/{key}/.lock")  # released
    # 2. verify and ls through the URL, on the command line.
    v = _cli(["verify", key, "--store", store, "--json"], s3, home)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"] is True, v.stdout + v.stderr[-2000:]
    ls = _cli(["ls", "--store", store, "--json"], s3, home)
    assert [c["key"] for c in json.loads(ls.stdout)["caches"]] == [key]
    done = Cache.open(f"{store}/{key}")
    assert done.status == "complete" and done.bytes_on_disk() > 0
    # 3. Bit for bit what an uninterrupted local collect writes.
    ref = collect(CollectConfig(model=task["model"], task=task["task"], n=12, dev=6, k=3, dtype="fp32",
                                batch_size=4, shard_rows=8, max_new_tokens=1, store=str(tmp_path / "local")))
    assert ref.key == key
    a, b = Cache.open(ref.cache), Cache.open(f"{store}/{key}")
    for p in a.specs:
        assert a.read(p, 0, a.n_rows).tobytes() == b.read(p, 0, b.n_rows).tobytes(), p
    for s in range(a.n_shards):
        assert a.ledger_entry(s) == b.ledger_entry(s)  # every checksum and stat (not the write time)
    # 4. distill streams from the S3 cache, exactly as from the local copy.
    common = dict(method="a2t", epochs=2, batch_size=4, lr=1e-3, device="cpu")
    remote = distill(DistillConfig(cache=key, store=store, out=str(tmp_path / "d_s3"), **common))
    local = distill(DistillConfig(cache=ref.cache, out=str(tmp_path / "d_local"), **common))
    assert remote.history == local.history and len(remote.history) == 4
    assert json.loads((tmp_path / "d_s3" / "run.json").read_text())["cache"] == f"{store}/{key}"
    assert (tmp_path / "d_s3" / "adapter_model.safetensors").is_file()
    # 5. Damage on S3 is found and named: a shard object of the activations overwritten by another
    # (intact for its crc32c, not for the ledger's sha256), then one deleted (never read as zeros).
    arr = b.array("acts/attn")
    obj = f"{BUCKET}/runs/a/{key}/acts/attn/{arr.metadata.encode_chunk_key((1, 0, 0, 0))}"
    good = fs.cat_file(obj)
    fs.pipe_file(obj, fs.cat_file(f"{BUCKET}/runs/a/{key}/acts/attn/"
                                  f"{arr.metadata.encode_chunk_key((0, 0, 0, 0))}"))
    probs = Cache.open(f"{store}/{key}").verify()
    assert probs and {p.array for p in probs} == {"acts/attn"}
    assert all(8 <= p.rows[0] < p.rows[1] <= 16 for p in probs)
    assert {p.reason for p in probs} >= {"checksum mismatch"}
    fs.rm_file(obj)
    probs = Cache.open(f"{store}/{key}").verify()
    assert [(p.array, p.rows) for p in probs] == [("acts/attn", (8, 16))] and "missing" in probs[0].reason
    fs.pipe_file(obj, b"")  # an empty object, which zarr alone reads as fill values
    for rows in ((8, 9), (8, 16)):  # part of the shard, and all of it (zarr's whole-shard read)
        with pytest.raises(ValueError, match="read as 0 bytes"):
            Cache.open(f"{store}/{key}").read("acts/attn", *rows)
    probs = Cache.open(f"{store}/{key}").verify()
    assert {p.array for p in probs} == {"acts/attn"} and all("0 bytes" in p.reason for p in probs)
    fs.pipe_file(obj, good)
    assert Cache.open(f"{store}/{key}").verify() == []


def test_ledger_entry_is_one_put(s3: dict[str, str], task: dict[str, Any], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PUT goes through s3fs's _pipe_file (zarr's writes and ours): count them."""
    puts: list[tuple[str, str]] = []
    real = s3fs.S3FileSystem._pipe_file

    async def spy(self: Any, path: str, data: bytes, mode: str = "overwrite", **kw: Any) -> Any:
        puts.append((path, mode))
        return await real(self, path, data, mode=mode, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", spy)
    s3fs.S3FileSystem.clear_instance_cache()  # instances bind their sync methods when made
    res = collect(CollectConfig(model=task["model"], task=task["task"], n=4, dev=2, k=2, dtype="fp32",
                                batch_size=4, shard_rows=4, chunk_rows=4, max_new_tokens=1,
                                store=f"s3://{BUCKET}/runs/put"))
    ledger = [p for p, _ in puts if "/ledger/" in p]
    assert sorted(ledger) == [f"{BUCKET}/runs/put/{res.key}/ledger/shard_{i:06d}.json" for i in range(2)]
    assert [m for p, m in puts if p.endswith("/.lock")] == ["create"]  # conditional create
    for i in range(2):  # and each is whole, valid JSON
        entry = json.loads(s3fs.S3FileSystem().cat_file(ledger[i]))
        assert entry["shard"] == i and entry["arrays"]
    s3fs.S3FileSystem.clear_instance_cache()


def test_remote_lock_excludes_a_second_writer(s3: dict[str, str]) -> None:
    lock = RemotePath(f"s3://{BUCKET}/locks/0123456789abcdef") / ".lock"
    with remote_lock(lock):
        assert lock.exists()
        with pytest.raises(IA2Error, match=r"another ia2cache process is writing .*\.lock.*pid"), \
                remote_lock(lock):
            pass
        assert lock.exists()  # the refused attempt did not remove the holder's lock
    assert not lock.exists()
    # A lock left by a process of another host is refused, not taken over.
    lock.write_bytes(json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}).encode())
    with pytest.raises(IA2Error, match="host elsewhere"), remote_lock(lock):
        pass
    # One left by a dead process of this host is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_bytes(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "y"}).encode())
    with remote_lock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.parametrize("name", ["../other", "a/../../x", "/etc", "..", ".", "a/../0123456789abcdex"])
def test_cache_names_may_not_leave_a_remote_store(s3: dict[str, str], name: str) -> None:
    with pytest.raises(IA2Error, match="outside the store|no cache"):
        resolve_cache(f"s3://{BUCKET}/runs/a", name)


def test_key_resolves_inside_the_remote_store(s3: dict[str, str]) -> None:
    p = resolve_cache(f"s3://{BUCKET}/runs/a/", "0123456789abcdef")
    assert str(p) == f"s3://{BUCKET}/runs/a/0123456789abcdef"
    with pytest.raises(IA2Error, match="not an ia2cache cache"):
        resolve_cache("/nowhere", f"s3://{BUCKET}/runs/none/0123456789abcdef")


def test_missing_bucket_is_refused_not_created(s3: dict[str, str], task: dict[str, Any],
                                               tmp_path: Path) -> None:
    r = _cli(_collect_args(task, "s3://no-such-bucket-ia2/x"), s3, tmp_path / "home")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--store s3://no-such-bucket-ia2/x: not writable" in r.stderr
    assert not s3fs.S3FileSystem().exists("no-such-bucket-ia2")


def test_two_takers_of_a_stale_lock_one_wins(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes of this host find the same dead holder's lock at the same moment (forced:
    each waits for the other after reading it). Only one may take it over; the other is refused
    (the old unconditional delete let the second delete the first's fresh lock and both 'hold')."""
    import threading

    lock = RemotePath(f"s3://{BUCKET}/locks/race") / ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "token": "stale"}
    lock.write_bytes(json.dumps(stale).encode())
    both_read = threading.Barrier(2, timeout=30)
    real_alive = lock_mod._pid_alive

    def alive(pid: int) -> bool:
        if pid == dead.pid:
            both_read.wait()  # both have judged the same lock stale before either acts
        return real_alive(pid)

    monkeypatch.setattr(lock_mod, "_pid_alive", alive)
    after = threading.Barrier(2, timeout=30)
    results: dict[str, str] = {}

    def taker(name: str) -> None:
        try:
            with remote_lock(lock):
                results[name] = "held"
                after.wait()  # hold it until the other one is done
        except IA2Error as e:
            results[name] = str(e)
            after.wait()

    threads = [threading.Thread(target=taker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["a", "b"]
    assert sorted(results.values())[1] == "held", results  # "another ..." sorts before "held"
    assert "another ia2cache process is writing" in sorted(results.values())[0], results
    assert not lock.exists()  # the winner released it; the loser deleted nothing


def test_stale_takeover_is_conditional(s3: dict[str, str]) -> None:
    """_take_over replaces the stale object only while it is still the one read: S3 by If-Match
    on its ETag, memory:// (no conditional PUT) by re-reading the holder first."""
    from ia2cache.store.lock import _read_holder, _take_over

    for url in (f"s3://{BUCKET}/locks/cond", "memory://ia2cache-locks/cond"):
        lock = RemotePath(url) / ".lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_bytes(b'{"host": "h", "pid": 1, "token": "old"}')
        seen = _read_holder(lock)
        assert _take_over(lock, seen, b'{"token": "first"}'), url
        assert not _take_over(lock, seen, b'{"token": "second"}'), url  # too late: not stale now
        assert _read_holder(lock) == {"token": "first"}, url
        lock.unlink()


def test_unreachable_store_is_exit_2_naming_the_url(tmp_path: Path) -> None:
    """botocore's EndpointConnectionError is no OSError: still one line naming the URL, exit 2."""
    port = _free_port()  # nothing listens there
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard", "AWS_EC2_METADATA_DISABLED": "true"}
    for args in (["ls", "--store", "s3://bucket/x"],
                 ["verify", "0123456789abcdef", "--store", "s3://bucket/x"]):
        r = _cli(args, env, tmp_path / "home")
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert "s3://bucket/x" in r.stderr and "EndpointConnectionError" in r.stderr, r.stderr[-2000:]
