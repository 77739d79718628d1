"""Crash tests with real processes: SIGKILL at every write point of collect and distill, a real
full disk, and two collects racing on one key. Each ends with a cache equal, file by file and
byte by byte, to one written by an uninterrupted run, and with ``verify`` passing.

The processes run the real CLI (``python -m cli``); faults are armed through the environment
(see ``ia2cache/_faults.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ia2cache.store import VOLATILE_FIELDS, Cache
from tests.conftest import mixed_length_env

ROOT = Path(__file__).resolve().parent.parent
# 30 train + 15 dev rows in 6 shards of 8 rows (the last one short), top-k logits included.
COLLECT = ["--n", "30", "--k", "4", "--batch-size", "2", "--shard-rows", "8", "--max-new-tokens", "2",
           "--topk-logits", "3", "--dtype", "bf16"]


def _env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("IA2CACHE_FAULT", "IA2CACHE_HOLD")}
    e["OMP_NUM_THREADS"] = "1"
    e.update(extra)
    return e


def _cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    return mixed_length_env(tmp_path_factory, tiny_model_dir, "faults")


def _collect(env: dict[str, Any], store: Path, **fault_env: str) -> subprocess.CompletedProcess:
    return _cli("collect", "--model", env["model"], "--task", env["task"], *COLLECT, "--store", str(store),
                "--json", **fault_env)


def _cache_dir(store: Path) -> Path:
    (path,) = [p for p in store.iterdir() if p.is_dir()]
    return path


def snapshot(cache: Path) -> dict[str, Any]:
    """Every file of a cache by relative path: raw bytes for array data and array metadata, the
    manifest without its volatile fields, ledger entries without their write time. The lock
    file is left out (it holds the last writer's pid)."""
    out: dict[str, Any] = {}
    for p in sorted(cache.rglob("*")):
        if not p.is_file() or p.name == ".lock":
            continue
        rel = p.relative_to(cache).as_posix()
        if rel == "zarr.json":
            meta = json.loads(p.read_text())
            m = meta["attributes"]["manifest"]
            meta["attributes"]["manifest"] = {k: v for k, v in m.items() if k not in VOLATILE_FIELDS}
            out[rel] = meta
        elif rel.startswith("ledger/"):
            out[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k != "written"}
        else:
            out[rel] = p.read_bytes()
    return out


def rows_lost(cache: Path, clean: Path) -> int:
    """Rows of the clean run whose ledger entry is missing or differs in the cache."""
    c = Cache.open(cache)
    a, b = snapshot(cache), snapshot(clean)
    lost = 0
    for s in range(c.n_shards):
        rel = f"ledger/shard_{s:06d}.json"
        if a.get(rel) != b.get(rel):
            lost += len(range(*c.shard_rows(s)))
    return lost


@pytest.fixture(scope="module")
def clean(env: dict[str, Any]) -> Path:
    store = env["dir"] / "clean"
    r = _collect(env, store)
    assert r.returncode == 0, r.stderr
    path = _cache_dir(store)
    assert json.loads(r.stdout)["status"] == "complete"
    v = _cli("verify", str(path), "--json")
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout
    return path


def _assert_equals_clean(cache: Path, clean: Path) -> None:
    a, b = snapshot(cache), snapshot(clean)
    assert sorted(a) == sorted(b), set(a) ^ set(b)  # no file missing, none left over
    for rel in b:
        assert a[rel] == b[rel], rel
    assert rows_lost(cache, clean) == 0
    assert Cache.open(cache).verify() == []


# (fault, status the killed run leaves). Creating the cache makes 65 metadata writes, then each
# shard writes 20 files: zarr.before_rename:100 lands inside the write of a file of shard 1 (shard
# 0 done), store.manifest_write:1 inside the cache's creation, :2 inside the final "complete"
# manifest write.
FAULTS = [
    ("collect.before_first_shard", "partial"),
    ("store.manifest_write:1", None),
    ("zarr.before_rename:100", "partial"),
    ("store.mid_shard:7", "partial"),
    ("store.before_ledger:3", "partial"),
    ("store.before_finalize", "partial"),
    ("store.manifest_write:2", "partial"),
    ("collect.end", "complete"),
]


@pytest.mark.parametrize(("fault", "left"), FAULTS, ids=[f for f, _ in FAULTS])
def test_sigkill_during_collect_then_rerun_equals_an_uninterrupted_run(
    env: dict[str, Any], clean: Path, tmp_path: Path, fault: str, left: str | None
) -> None:
    killed = _collect(env, tmp_path, IA2CACHE_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cache = _cache_dir(tmp_path)
    if left is None:  # killed while the manifest was first written: no cache yet
        assert not (cache / "zarr.json").exists()
    else:
        assert Cache.open(cache).status == left
    if left == "partial":
        assert Cache.open(cache).verify()  # a partial cache never passes verify
    rerun = _collect(env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["status"] == "complete"
    _assert_equals_clean(cache, clean)


def test_two_collects_on_one_key_one_exits_2_naming_the_holder(env: dict[str, Any], clean: Path,
                                                               tmp_path: Path) -> None:
    """The first collect holds the lock (paused inside it); a second one on the same key exits 2
    at once with a message naming the cache and the holder, writing nothing."""
    release = tmp_path / "release"
    store = tmp_path / "store"
    first = subprocess.Popen(
        [sys.executable, "-m", "cli", "collect", "--model", env["model"], "--task", env["task"], *COLLECT,
         "--store", str(store), "--json"],
        cwd=ROOT, env=_env(IA2CACHE_HOLD=f"collect.before_first_shard:{release}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{release}.reached").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first collect never reached its pause"
            time.sleep(0.05)
        cache = _cache_dir(store)
        before = snapshot(cache)
        second = _collect(env, store)
        assert second.returncode == 2, second.stderr
        msg = " ".join(second.stderr.split())
        assert "another ia2cache process is writing" in msg and cache.name in msg
        assert f"pid {first.pid}" in msg
        assert second.stdout == ""
        assert snapshot(cache) == before  # the loser wrote nothing
    finally:
        release.touch()
        out, errs = first.communicate(timeout=300)
    assert first.returncode == 0, errs
    assert json.loads(out)["status"] == "complete"
    again = _collect(env, store)
    assert again.returncode == 0 and json.loads(again.stdout)["reused"] is True
    _assert_equals_clean(cache, clean)


@pytest.mark.parametrize("stagger", [0.0, 0.1, 0.5, 1.5])
def test_two_collects_started_together_never_fail_badly(env: dict[str, Any], clean: Path, tmp_path: Path,
                                                        stagger: float) -> None:
    """Racing from the start (creation included): each exits 0 or 2, at least one completes, and
    the cache equals an uninterrupted run."""
    args = [sys.executable, "-m", "cli", "collect", "--model", env["model"], "--task", env["task"], *COLLECT,
            "--store", str(tmp_path), "--json"]
    pipes = dict(cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = subprocess.Popen(args, **pipes)  # type: ignore[call-overload]
    time.sleep(stagger)
    b = subprocess.Popen(args, **pipes)  # type: ignore[call-overload]
    results = [(p.wait(timeout=300), *p.communicate()) for p in (a, b)]
    codes = sorted(rc for rc, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for rc, _out, errs in results:
        if rc == 2:
            assert "another ia2cache process is writing" in " ".join(errs.split())
    _assert_equals_clean(_cache_dir(tmp_path), clean)


# ----------------------------------------------------------------------------- a real full disk


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


_DISK_FULL = r"""
set -u
COLLECT="python -m cli collect --model $MODEL --task $TASK $ARGS --store $MNT/store --json"
PAGE=$(getconf PAGESIZE)
# What the whole cache takes on this tmpfs (small files take whole pages): a run with room.
mount -t tmpfs -o size=64m tmpfs "$MNT" || exit 90
$COLLECT >"$OUT/ref.out" 2>"$OUT/ref.err" || exit 91
USED=$(df -k "$MNT" | awk 'NR==2 {print $3}')
umount "$MNT"
for CASE in create mid finalize; do
  case $CASE in
    create) SIZE=$((PAGE * 8 / 1024)) ;;  # no room for the cache: refused before any write
    mid) SIZE=$((USED / 2)) ;;  # full halfway through the shards
    finalize) SIZE=$USED ;;  # room for the cache, not for the manifest's temp file
  esac
  mount -t tmpfs -o size=${SIZE}k tmpfs "$MNT" || exit 92
  $COLLECT >"$OUT/$CASE.1.out" 2>"$OUT/$CASE.1.err"
  echo $? >"$OUT/$CASE.1.rc"
  cp -a "$MNT/store" "$OUT/$CASE.failed"
  mount -o remount,size=64m "$MNT" || exit 93  # free space (as deleting other files would)
  $COLLECT >"$OUT/$CASE.2.out" 2>"$OUT/$CASE.2.err"
  echo $? >"$OUT/$CASE.2.rc"
  cp -a "$MNT/store" "$OUT/$CASE.final"
  umount "$MNT"
done
"""


def _in_private_mount(tmp_path: Path, env: dict[str, Any],
                      script: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run a shell ``script`` in a private user+mount namespace with $MNT (a mount point), $OUT
    (for its outputs), $MODEL, $TASK and the collect $ARGS set; returns (the run, $MNT, $OUT)."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    e = _env(MNT=str(mnt), OUT=str(out), MODEL=env["model"], TASK=env["task"], ARGS=" ".join(COLLECT))
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                       env=e, capture_output=True, text=True, timeout=600)
    return r, mnt, out


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user+mount namespaces for a tmpfs")
def test_real_full_disk_exits_2_leaves_partial_and_resumes(env: dict[str, Any], clean: Path,
                                                          tmp_path: Path) -> None:
    """collect into a real tmpfs that (1) has no room for the cache (refused before any write),
    fills up (2) halfway through the shards, (3) when the manifest is marked complete: exit 2
    naming the store and what failed, the cache never marked complete; after space is freed the
    rerun completes to a cache equal to an uninterrupted run."""
    r, mnt, out = _in_private_mount(tmp_path, env, _DISK_FULL)
    ref_err = (out / "ref.err").read_text() if (out / "ref.err").exists() else ""
    assert r.returncode == 0, (r.returncode, r.stderr, ref_err)
    # A filesystem too small for the cache's data is refused before anything is written (the
    # room check); one that fills up anyway (small files take whole pages, other writers) fails
    # with the OS's error, halfway through the shards or when the manifest is marked complete.
    phases = (("create", "filesystem has"), ("mid", "writing shard"), ("finalize", "complete failed"))
    for case, what in phases:
        err1 = " ".join((out / f"{case}.1.err").read_text().split())
        assert int((out / f"{case}.1.rc").read_text()) == 2, (case, err1)
        assert str(mnt / "store") in err1 and what in err1, (case, err1)
        assert case == "create" or "No space left on device" in err1, (case, err1)
        assert "Traceback" not in err1 and (out / f"{case}.1.out").read_text() == ""
        for cache in (out / f"{case}.failed").iterdir():  # never marked complete
            if (cache / "zarr.json").exists():
                assert Cache.open(cache).status == "partial", case
        assert int((out / f"{case}.2.rc").read_text()) == 0, (case, (out / f"{case}.2.err").read_text())
        assert json.loads((out / f"{case}.2.out").read_text())["status"] == "complete"
        final = _cache_dir(out / f"{case}.final")
        a, b = snapshot(final), snapshot(clean)
        assert sorted(a) == sorted(b), (case, set(a) ^ set(b))
        assert all(a[k] == b[k] for k in b), case
        assert Cache.open(final).verify() == [] and rows_lost(final, clean) == 0


_READ_ONLY = r"""
set -u
run() { name=$1; shift; "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"; echo $? >"$OUT/$name.rc"; }
COLLECT="python -m cli collect --model $MODEL --task $TASK $ARGS --json"
DISTILL="python -m cli distill --model $MODEL --method act --epochs 1 --json"
mount -t tmpfs -o size=64m tmpfs "$MNT" || exit 90
mkdir "$MNT/empty"
$COLLECT --store "$MNT/full" >"$OUT/w.out" 2>"$OUT/w.err" || exit 91
mount -o remount,ro "$MNT" || exit 92
KEY=$(ls "$MNT/full")
run new $COLLECT --store "$MNT/empty/store"
run reuse $COLLECT --store "$MNT/full"
run verify python -m cli verify "$KEY" --store "$MNT/full" --json
run distill $DISTILL --cache "$KEY" --store "$MNT/full" --out "$OUT/run"
run distill_ro $DISTILL --cache "$KEY" --store "$MNT/full" --out "$MNT/run"
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user+mount namespaces for a tmpfs")
def test_read_only_store_refuses_new_caches_and_serves_complete_ones(env: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    """A store on a read-only file system (a real ro mount, which binds root too): a new cache
    is refused with exit 2 naming the store; a complete one is reused, verified and trained from;
    an --out on it is refused naming --out."""
    r, mnt, out = _in_private_mount(tmp_path, env, _READ_ONLY)
    assert r.returncode == 0, (r.returncode, r.stderr)

    def res(name: str) -> tuple[int, str, str]:
        return (int((out / f"{name}.rc").read_text()), (out / f"{name}.out").read_text(),
                " ".join((out / f"{name}.err").read_text().split()))

    rc, stdout, err = res("new")
    assert rc == 2 and stdout == "" and "Traceback" not in err, err
    assert f"--store {mnt}/empty/store" in err and "Read-only file system" in err
    rc, stdout, err = res("reuse")
    assert rc == 0 and json.loads(stdout)["reused"] is True, err
    rc, stdout, err = res("verify")
    assert rc == 0 and json.loads(stdout)["ok"] is True, err
    rc, stdout, err = res("distill")
    assert rc == 0 and (out / "run" / "adapter_model.safetensors").is_file(), err
    rc, stdout, err = res("distill_ro")
    assert rc == 2 and f"--out {mnt}/run" in err and "not writable" in err, err


# ----------------------------------------------------------------------------- distill


def test_sigkill_inside_a_checkpoint_write_resumes_to_the_same_weights(env: dict[str, Any], clean: Path,
                                                                       tmp_path: Path) -> None:
    """Killed after the new adapter weights but before the new state.json: the rerun resumes
    from the previous checkpoint and ends with the uninterrupted run's weights."""
    args = ["distill", "--cache", str(clean), "--model", env["model"], "--method", "a2t", "--lr", "1e-2",
            "--epochs", "3", "--json"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    killed = _cli(*args, "--out", str(tmp_path / "run"), IA2CACHE_FAULT="distill.mid_checkpoint:4")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()
    done = _cli(*args, "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "ref" / "run.json").read_text())["history"]
    hb = json.loads((tmp_path / "run" / "run.json").read_text())["history"]
    assert ha == hb
