"""Hardening (issue 14), classes 2 and 4.

Class 2: nothing follows a link or opens a special file while writing or locking under the store or
``--out``, and reads of cache files never block on one. Every position ia2cache writes (lock, ledger
entry, manifest, shard file, write probe, ``run.json`` through ``write_json_atomic``) is tried with
every kind of trap (a symlink to a file, a symlink to a folder, a FIFO, a folder, a character
device): the operation is refused naming the path, and the link's target is untouched.

Class 4: a tampered or misfiled cache is detected (verify exit 1, ``Cache.open`` and so collect and
distill refuse it, ``ls`` lists it as damaged, bounded memory), and ``collect --repair`` recomputes
exactly the damaged shards, leaving the cache byte-identical to a clean run.

Anything that could block on a FIFO runs under :func:`_within`, which opens the FIFOs' write ends to
release a blocked reader and fails the test, so a regression never hangs CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from ia2cache._io import write_json_atomic
from ia2cache.collect import CollectConfig, collect
from ia2cache.errors import IA2Error
from ia2cache.loader import CacheLoader, LoaderConfig
from ia2cache.models import load_model
from ia2cache.store import (
    VOLATILE_FIELDS,
    ArraySpec,
    Cache,
    DamagedCacheError,
    cache_key,
    list_caches,
    manifest_problems,
    verify_cache,
)
from tests.conftest import mixed_length_env

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
T = TypeVar("T")

KINDS = ["symlink-to-file", "symlink-to-dir", "fifo", "directory", "char-device"]
WORDS = {"symlink-to-file": "symbolic link", "symlink-to-dir": "symbolic link", "fifo": "FIFO",
         "directory": "directory", "char-device": "character device"}


# ----------------------------------------------------------------------------- helpers


def _within(fn: Callable[[], T], seconds: float = 90.0) -> T:
    """``fn()`` in a thread; if it is still running after ``seconds`` (blocked on a FIFO), release
    every FIFO under the temp folders by opening its write end, and fail."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["ok"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for fifo in _FIFOS:  # the other end releases a blocked reader (write end) or writer (read end)
            for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, flags))
        t.join(10)
        pytest.fail(f"blocked for more than {seconds:.0f} s (on a FIFO?)")
    if "err" in box:
        raise box["err"]
    return box["ok"]


_FIFOS: list[Path] = []


def _plant(path: Path, kind: str, victims: Path) -> None:
    """Put a trap of ``kind`` at ``path`` (replacing what is there); links point into ``victims``."""
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    victims.mkdir(exist_ok=True)
    if kind == "symlink-to-file":
        target = victims / "precious.txt"
        if not target.exists():
            target.write_text("someone's precious file\n")
        path.symlink_to(target)
    elif kind == "symlink-to-dir":
        target = victims / "precious_dir"
        target.mkdir(exist_ok=True)
        (target / "keep.txt").write_text("keep\n")
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
        _FIFOS.append(path)
    elif kind == "directory":
        path.mkdir()
    else:
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("cannot create a character device here (needs CAP_MKNOD)")


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry below ``root`` (not following links) with its bytes or its kind."""
    out: dict[str, bytes | str] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d, name)
            mode = os.lstat(p).st_mode
            rel = str(p.relative_to(root))
            out[rel] = p.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode).__str__()
    return out


def _assert_refused(exc: BaseException, path: Path, kind: str) -> None:
    msg = str(exc)
    assert isinstance(exc, IA2Error), repr(exc)
    assert str(path) in msg and WORDS[kind] in msg, msg


# A small cache through the store API: 10 rows, shards of 4 (the last short), chunks of 2.
N_ROWS, RPS, RPC = 10, 4, 2
SPECS = [ArraySpec("acts/attn", (1, 3, 5), "float32", stats=True),
         ArraySpec("tokens/student_ids", (3,), "int32"),
         ArraySpec("rows/example_index", (), "int32")]
KEY_FIELDS = {"synthetic": "hardening", "n": 10}
KEY = cache_key(KEY_FIELDS)


def _data(a: int, b: int) -> dict[str, np.ndarray]:
    r = np.arange(a, b)
    return {"acts/attn": (r[:, None, None, None] + np.zeros((1, 1, 3, 5))).astype(np.float32),
            "tokens/student_ids": np.repeat(r[:, None], 3, 1).astype(np.int32),
            "rows/example_index": r.astype(np.int32)}


def _synthetic(store: Path, shards: list[int] | None = None, finalize: bool = False) -> Cache:
    cache = Cache.create_or_open(store, KEY, {"key_fields": KEY_FIELDS, "n": 10}, SPECS, N_ROWS, RPS, RPC)
    for s in range(cache.n_shards) if shards is None else shards:
        cache.write_shard(s, _data(*cache.shard_rows(s)))
    if finalize:
        cache.finalize()
    return cache


def _shard_file(cache_dir: Path, array: str, shard: int) -> Path:
    ndim = len(json.loads((cache_dir / array / "zarr.json").read_text())["shape"])
    return cache_dir / array / "c" / "/".join([str(shard)] + ["0"] * (ndim - 1))


def _edit_manifest(cache_dir: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((cache_dir / "zarr.json").read_text())
    edit(meta["attributes"]["manifest"])
    (cache_dir / "zarr.json").write_text(json.dumps(meta))


# ================================================================ class 2: writes and locks


@pytest.mark.parametrize("kind", KINDS)
def test_lock_refuses_a_link_or_special_file(tmp_path: Path, kind: str) -> None:
    cache = _synthetic(tmp_path / "store", shards=[0])
    lock = cache.path / ".lock"
    _plant(lock, kind, tmp_path / "victims")
    before = _tree(tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        _within(lambda: cache.lock().__enter__())
    _assert_refused(e.value, lock, kind)
    assert _tree(tmp_path / "victims") == before  # never truncated to the pid


@pytest.mark.parametrize("kind", KINDS)
def test_ledger_entry_write_refuses_a_link_or_special_file(tmp_path: Path, kind: str) -> None:
    cache = _synthetic(tmp_path / "store", shards=[0])
    entry = cache.path / "ledger" / "shard_000001.json"
    _plant(entry, kind, tmp_path / "victims")
    before = _tree(tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        _within(lambda: cache.write_shard(1, _data(4, 8)))
    _assert_refused(e.value, entry, kind)
    assert _tree(tmp_path / "victims") == before


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_write_refuses_a_link_or_special_file(tmp_path: Path, kind: str) -> None:
    """Marking complete rewrites zarr.json: never through a link nor over a special file."""
    cache = _synthetic(tmp_path / "store")
    manifest = cache.path / "zarr.json"
    (tmp_path / "victims").mkdir()
    shutil.copy(manifest, tmp_path / "victims" / "precious.txt")  # a link to a valid manifest
    _plant(manifest, kind, tmp_path / "victims")
    before = _tree(tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        _within(lambda: cache.finalize())
    _assert_refused(e.value, manifest, kind)
    assert _tree(tmp_path / "victims") == before


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_refuses_a_manifest_that_is_a_link_or_special_file(tmp_path: Path, kind: str) -> None:
    cache = _synthetic(tmp_path / "store", shards=[0])
    manifest = cache.path / "zarr.json"
    (tmp_path / "victims").mkdir()
    shutil.copy(manifest, tmp_path / "victims" / "precious.txt")
    _plant(manifest, kind, tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        _within(lambda: _synthetic(tmp_path / "store", shards=[1]))
    _assert_refused(e.value, manifest, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_shard_write_refuses_a_link_or_special_file(tmp_path: Path, kind: str) -> None:
    """Both before zarr is handed the cache (create_or_open walks it) and at zarr's own write."""
    cache = _synthetic(tmp_path / "store", shards=[0])
    shard = _shard_file(cache.path, "acts/attn", 1)
    _plant(shard, kind, tmp_path / "victims")
    before = _tree(tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        _within(lambda: cache.write_shard(1, _data(4, 8)))
    _assert_refused(e.value, shard, kind)
    with pytest.raises(IA2Error) as e:
        _within(lambda: _synthetic(tmp_path / "store", shards=[1]))
    _assert_refused(e.value, shard, kind)
    assert _tree(tmp_path / "victims") == before
    assert not (cache.path / "ledger" / "shard_000001.json").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_write_json_atomic_refuses_a_link_or_special_file(tmp_path: Path, kind: str) -> None:
    """distill's run.json and checkpoints, the ledger: a trap at the destination is refused."""
    out = tmp_path / "out"
    run_json = out / "run.json"
    _plant(run_json, kind, tmp_path / "victims")
    before = _tree(tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        _within(lambda: write_json_atomic(run_json, {"method": "act"}, indent=1))
    _assert_refused(e.value, run_json, kind)
    assert _tree(tmp_path / "victims") == before
    assert [p.name for p in out.iterdir()] == ["run.json"]  # no temp file left


def test_write_json_atomic_writes_through_a_root_the_user_linked(tmp_path: Path) -> None:
    """The folder given may itself be a symlink (``--out`` on another disk): that is allowed."""
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    write_json_atomic(tmp_path / "linked" / "run.json", {"a": 1})
    assert json.loads((tmp_path / "real" / "run.json").read_text()) == {"a": 1}


# ----------------------------------------------------------------- collect end to end


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    return mixed_length_env(tmp_path_factory, tiny_model_dir, "hardening")


@pytest.fixture(scope="module")
def loaded(env: dict[str, Any]) -> Any:
    return load_model(env["model"], device="cpu")


def _cfg(env: dict[str, Any], store: Path, **kw: Any) -> CollectConfig:
    base: dict[str, Any] = dict(model=env["model"], task=env["task"], n=8, k=2, store=str(store),
                                dtype="bf16", batch_size=4, shard_rows=4, chunk_rows=2, max_new_tokens=2)
    base.update(kw)
    return CollectConfig(**base)


@pytest.fixture(scope="module")
def clean(env: dict[str, Any], loaded: Any) -> Path:
    return Path(collect(_cfg(env, env["dir"] / "clean"), loaded).cache)


def _copy(clean: Path, tmp_path: Path, name: str | None = None) -> Path:
    cache = tmp_path / "store" / (name or clean.name)
    shutil.copytree(clean, cache, symlinks=True)
    return cache


def _partial(cache: Path) -> None:
    """Make a copied complete cache partial, its shard 1 not written."""
    (cache / "ledger" / "shard_000001.json").unlink()
    for arr in ("acts/attn", "tokens/student_ids"):
        shutil.rmtree(cache / arr / "c" / "1", ignore_errors=True)
    _edit_manifest(cache, lambda m: m.__setitem__("status", "partial"))


def test_collect_refuses_a_planted_lock_link_and_keeps_the_target(env: dict[str, Any], loaded: Any,
                                                                  clean: Path, tmp_path: Path) -> None:
    """The issue's example: the next collect truncated the link's target to its pid."""
    cache = _copy(clean, tmp_path)
    _partial(cache)
    _plant(cache / ".lock", "symlink-to-file", tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        collect(_cfg(env, tmp_path / "store"), loaded)
    _assert_refused(e.value, cache / ".lock", "symlink-to-file")
    assert (tmp_path / "victims" / "precious.txt").read_text() == "someone's precious file\n"


@pytest.mark.parametrize("target", ["outside", "another-cache"])
def test_collect_refuses_a_cache_folder_that_is_a_link(env: dict[str, Any], loaded: Any, clean: Path,
                                                       tmp_path: Path, target: str) -> None:
    """``<store>/<key>`` a link: to an empty folder outside the store, or to another cache."""
    store = tmp_path / "store"
    store.mkdir()
    if target == "outside":
        dest = tmp_path / "outside"
        dest.mkdir()
    else:
        dest = _copy(clean, tmp_path, "0123456789abcdef")
    (store / clean.name).symlink_to(dest)
    before = _tree(dest)
    with pytest.raises(IA2Error) as e:
        collect(_cfg(env, store), loaded)
    _assert_refused(e.value, store / clean.name, "symlink-to-dir")
    assert _tree(dest) == before  # nothing written there, nothing marked complete


@pytest.mark.parametrize("part", ["acts", "ledger", "acts/attn"])
def test_collect_refuses_a_linked_folder_inside_a_cache(env: dict[str, Any], loaded: Any, clean: Path,
                                                        tmp_path: Path, part: str) -> None:
    cache = _copy(clean, tmp_path)
    _partial(cache)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(cache / part, elsewhere)
    (cache / part).symlink_to(elsewhere)
    before = _tree(elsewhere)
    with pytest.raises(IA2Error) as e:
        collect(_cfg(env, tmp_path / "store"), loaded)
    _assert_refused(e.value, cache / part, "symlink-to-dir")
    assert _tree(elsewhere) == before


@pytest.mark.parametrize("kind", KINDS)
def test_write_probe_never_touches_what_sits_at_its_old_name(env: dict[str, Any], loaded: Any,
                                                             tmp_path: Path, kind: str) -> None:
    """The probe's name was guessable (the pid): a link there had its target truncated, a FIFO
    blocked collect, a device node was deleted. Now it is a fresh name, created exclusively."""
    store = tmp_path / "store"
    planted = store / f".ia2cache-write-probe-{os.getpid()}"
    _plant(planted, kind, tmp_path / "victims")
    before, mode = _tree(tmp_path / "victims"), os.lstat(planted).st_mode
    res = _within(lambda: collect(_cfg(env, store), loaded))
    assert res.status == "complete"
    assert _tree(tmp_path / "victims") == before
    assert os.lstat(planted).st_mode == mode  # still there, as it was
    assert not [p for p in store.iterdir() if p.name.startswith(".ia2cache-write-probe") and p != planted]


# ----------------------------------------------------------------- reads never block


def _read_everything(cache: Path, checksums: bool = False) -> None:
    for _ in CacheLoader(cache, LoaderConfig(batch_size=4, shuffle=False, checksums=checksums)):
        pass


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("what", ["shard file", "ledger entry"])
def test_reads_refuse_a_special_file_naming_it(clean: Path, tmp_path: Path, kind: str, what: str) -> None:
    """The loader (distill) raises IA2Error naming array, rows and the file; verify reports it;
    neither blocks on a FIFO nor gives a traceback on a folder. (The loader reads ledger entries only
    to compare sha256s, ``checksums``; crc32c alone needs none.)"""
    cache = _copy(clean, tmp_path)
    array = "acts/attn"
    bad = (_shard_file(cache, array, 1) if what == "shard file" else cache / "ledger" / "shard_000001.json")
    _plant(bad, kind, tmp_path / "victims")
    if what == "ledger entry":
        _within(lambda: _read_everything(cache))  # never opened: nothing to block on
    with pytest.raises(IA2Error) as e:
        _within(lambda: _read_everything(cache, checksums=what == "ledger entry"))
    msg = str(e.value)
    assert "rows [4, 6)" in msg and str(bad) in msg and WORDS[kind] in msg, msg
    verdict = _within(lambda: verify_cache(cache))
    assert verdict.problems and all(4 <= p.rows[0] < p.rows[1] <= 8 for p in verdict.problems), verdict
    assert any(str(bad.relative_to(cache)) in p.reason and WORDS[kind] in p.reason for p in verdict.problems)
    r = _within(lambda: runner.invoke(app, ["verify", str(cache), "--json"]))
    assert r.exit_code == 1, r.output
    assert not json.loads(r.stdout)["ok"]


@pytest.mark.parametrize("kind", KINDS)
def test_opening_a_cache_whose_manifest_is_special_never_blocks(clean: Path, tmp_path: Path,
                                                                kind: str) -> None:
    cache = _copy(clean, tmp_path)
    (tmp_path / "victims").mkdir()
    shutil.copy(cache / "zarr.json", tmp_path / "victims" / "precious.txt")
    _plant(cache / "zarr.json", kind, tmp_path / "victims")
    with pytest.raises(IA2Error) as e:
        _within(lambda: Cache.open(cache))
    _assert_refused(e.value, cache / "zarr.json", kind)
    r = _within(lambda: runner.invoke(app, ["verify", str(cache), "--json"]))
    assert r.exit_code == 1 and "zarr.json" in r.stdout, r.output


# ================================================================ class 4: tampering, misfiling

EDITS: dict[str, Callable[[dict], None]] = {
    "k": lambda m: m.__setitem__("k", m["k"] + 1),
    "n": lambda m: m.__setitem__("n", m["n"] * 2),
    "seed": lambda m: m.__setitem__("seed", 7),
    "task": lambda m: m.__setitem__("task", "antonyms"),
    "model name": lambda m: m["model"].__setitem__("name", "SmolLM2-1.7B"),
    "layers": lambda m: m.__setitem__("layers", m["layers"][:1]),
    "rows fewer": lambda m: m.__setitem__("rows", m["rows"] - 4),
    "rows one more": lambda m: m.__setitem__("rows", m["rows"] + 1),
    "site": lambda m: m.__setitem__("site", "resid"),
    "dtype": lambda m: m.__setitem__("dtype", "fp32"),
    "n_train": lambda m: m.__setitem__("n_train", m["n_train"] - 1),
    "key_fields.seed and seed": lambda m: (m["key_fields"].__setitem__("seed", 1), m.__setitem__("seed", 1)),
    "rows_per_shard": lambda m: m.__setitem__("rows_per_shard", 8),
    "arrays": lambda m: m["arrays"].pop("tokens/student_ids"),
    "key": lambda m: m.__setitem__("key", "0" * 16),
    "no key": lambda m: m.pop("key"),
    "no rows": lambda m: m.pop("rows"),
    "no arrays": lambda m: m.pop("arrays"),
    "no status": lambda m: m.pop("status"),
    "no rows_per_chunk": lambda m: m.pop("rows_per_chunk"),
    "no layers": lambda m: m.pop("layers"),
    "no key_fields": lambda m: m.pop("key_fields"),
    "key_fields a list": lambda m: m.__setitem__("key_fields", [1, 2]),
    "arrays malformed": lambda m: m["arrays"]["tokens/student_ids"].__setitem__("shape", "x"),
    "manifest a list": lambda m: (m.clear(), m.__setitem__("__list__", True)),
}


def _tamper(cache: Path, name: str) -> None:
    if name == "manifest a list":
        meta = json.loads((cache / "zarr.json").read_text())
        meta["attributes"]["manifest"] = [1, 2, 3]
        (cache / "zarr.json").write_text(json.dumps(meta))
    else:
        _edit_manifest(cache, EDITS[name])


@pytest.mark.parametrize("name", sorted(EDITS))
def test_a_tampered_manifest_is_damage_everywhere(clean: Path, tmp_path: Path, name: str) -> None:
    """verify: exit 1 naming the problem (no traceback); open, distill's loader and collect refuse
    it (exit 2); ls lists it as damaged. (Huge row counts: the bounded test below, in a subprocess,
    since the old verify ran out of memory on them.)"""
    cache = _copy(clean, tmp_path)
    _tamper(cache, name)
    verdict = _within(lambda: verify_cache(cache), 60)
    assert verdict.status == "damaged" and verdict.problems, verdict
    r = runner.invoke(app, ["verify", str(cache), "--json"])
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["status"] == "damaged" and out["problems"]
    with pytest.raises(DamagedCacheError, match=str(cache)):
        Cache.open(cache)
    with pytest.raises(IA2Error):
        CacheLoader(cache, LoaderConfig(batch_size=4))
    (listed,) = list_caches(tmp_path / "store")
    assert listed["status"] == "damaged" and listed["key"] == cache.name and listed["problems"]
    ls = runner.invoke(app, ["ls", "--store", str(tmp_path / "store")])
    assert ls.exit_code == 0 and "damaged" in ls.output, ls.output


_VERIFY_BOUNDED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from ia2cache.errors import IA2Error
from ia2cache.store import Cache, verify_cache
v = verify_cache(sys.argv[1])
try:
    Cache.open(sys.argv[1])
    opened = "opened"
except IA2Error:
    opened = "refused"
print(v.status, len(v.problems), opened)
"""


@pytest.mark.parametrize("rows", [10**12, 1e12, 2**62], ids=["10**12", "1e12", "2**62"])
@pytest.mark.parametrize("sealed", [True, False], ids=["edited", "old cache without checksum"])
def test_verify_of_a_huge_row_count_is_bounded(clean: Path, tmp_path: Path, rows: float,
                                                sealed: bool) -> None:
    """``rows=1e12`` ran verify out of memory: now a contradiction with the arrays' real shape (or
    not a row count at all), reported at once. In a subprocess under a 3 GiB address-space limit
    and a timeout, so a regression fails fast instead of taking the test run down."""
    cache = _copy(clean, tmp_path)

    def edit(m: dict) -> None:
        m["rows"] = rows
        if not sealed:  # as a cache written before manifests carried their checksum
            m.pop("manifest_sha256", None)

    _edit_manifest(cache, edit)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _VERIFY_BOUNDED, str(cache)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    status, n, opened = r.stdout.split()
    assert status == "damaged" and 1 <= int(n) <= 100 and opened == "refused", r.stdout


@pytest.mark.parametrize(("name", "says"), [
    ("k", "manifest field k is"), ("n", "manifest field n is"), ("seed", "manifest field seed is"),
    ("layers", "manifest field layers is"), ("site", "manifest field site is"),
    ("dtype", "manifest field dtype is"), ("rows fewer", "rows, the manifest says rows"),
    ("key", "produce key"), ("key_fields.seed and seed", "produce key"),
    ("arrays", "(shape, dtype"),
])
def test_contradictions_are_found_without_the_checksum(clean: Path, tmp_path: Path, name: str,
                                                       says: str) -> None:
    """A cache written before manifests carried ``manifest_sha256`` (or one whose checksum was
    stripped) is still checked: key fields against the key and the readable fields, rows against
    the arrays."""
    cache = _copy(clean, tmp_path)

    def edit(m: dict) -> None:
        EDITS[name](m)
        m.pop("manifest_sha256", None)

    _edit_manifest(cache, edit)
    if name == "arrays":  # the manifest drops an array: its spec for another no longer matches
        _edit_manifest(cache, lambda m: m["arrays"]["tokens/target_ids"].__setitem__("shape", [99]))
    verdict = verify_cache(cache)
    assert verdict.status == "damaged" and any(says in p.reason for p in verdict.problems), verdict
    with pytest.raises(DamagedCacheError, match=re.escape(says)):
        Cache.open(cache)


def test_a_truncated_root_zarr_json_is_damage_and_listed(clean: Path, tmp_path: Path) -> None:
    cache = _copy(clean, tmp_path)
    raw = (cache / "zarr.json").read_bytes()
    (cache / "zarr.json").write_bytes(raw[: len(raw) // 2])
    r = runner.invoke(app, ["verify", cache.name, "--store", str(tmp_path / "store"), "--json"])
    assert r.exit_code == 1, r.output
    assert "not valid JSON" in json.loads(r.stdout)["problems"][0]["reason"]
    ls = json.loads(runner.invoke(app, ["ls", "--store", str(tmp_path / "store"), "--json"]).stdout)
    assert [(c["key"], c["status"]) for c in ls["caches"]] == [(cache.name, "damaged")]


def test_a_cache_copied_into_another_keys_folder_is_never_reused(env: dict[str, Any], loaded: Any,
                                                                 clean: Path, tmp_path: Path) -> None:
    """The issue's example: a seed-0 cache copied into the seed-1 key's folder was reused by
    ``collect --seed 1`` and passed verify."""
    other = collect(_cfg(env, tmp_path / "probe", seed=1), loaded).key  # the seed-1 key
    cache = _copy(clean, tmp_path, other)
    with pytest.raises(DamagedCacheError) as e:
        collect(_cfg(env, tmp_path / "store", seed=1), loaded)
    assert other in str(e.value) and clean.name in str(e.value)  # both keys named
    assert verify_cache(cache).status == "damaged"
    r = runner.invoke(app, ["verify", other, "--store", str(tmp_path / "store")])
    assert r.exit_code == 1, r.output
    with pytest.raises(IA2Error, match="cannot be repaired|damaged"):
        collect(_cfg(env, tmp_path / "store", seed=1, repair=True), loaded)


def test_manifest_problems_accepts_what_collect_writes_and_names_contradictions(clean: Path) -> None:
    m = Cache.open(clean).manifest.to_json()
    assert manifest_problems(m, clean.name) == []
    m["k"] += 1
    problems = manifest_problems(m, clean.name)
    assert any("manifest field k is" in p and "key_fields.k" in p for p in problems), problems
    assert any("edited" in p for p in problems)


# ------------------------------------------------------------------------------ repair


def _snapshot(cache: Path) -> dict[str, Any]:
    """Every file: array data and metadata byte for byte, the manifest minus volatile fields,
    ledger entries minus their write time (the lock holds a pid)."""
    out: dict[str, Any] = {}
    for p in sorted(cache.rglob("*")):
        if p.is_dir() or p.name == ".lock":
            continue
        rel = p.relative_to(cache).as_posix()
        if rel == "zarr.json":
            m = json.loads(p.read_text())["attributes"]["manifest"]
            out[rel] = {k: v for k, v in m.items() if k not in VOLATILE_FIELDS}
        elif rel.startswith("ledger/"):
            out[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k != "written"}
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _flip(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    p.write_bytes(bytes(raw))


DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "flipped bytes": lambda c, v: _flip(_shard_file(c, "acts/attn", 1)),
    "truncated": lambda c, v: _shard_file(c, "tokens/student_ids", 2).write_bytes(b"x"),
    "deleted": lambda c, v: _shard_file(c, "acts/attn", 0).unlink(),
    "fifo shard": lambda c, v: _plant(_shard_file(c, "acts/attn", 1), "fifo", v),
    "symlinked shard": lambda c, v: _plant(_shard_file(c, "rows/split", 1), "symlink-to-file", v),
    "folder shard": lambda c, v: _plant(_shard_file(c, "acts/attn", 2), "directory", v),
    "lost ledger entry": lambda c, v: (c / "ledger" / "shard_000001.json").unlink(),
    "torn ledger entry": lambda c, v: (c / "ledger" / "shard_000002.json").write_text('{"shard": '),
    "fifo ledger entry": lambda c, v: _plant(c / "ledger" / "shard_000000.json", "fifo", v),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_collect_repair_recomputes_exactly_the_damaged_shards(env: dict[str, Any], loaded: Any, clean: Path,
                                                             tmp_path: Path, how: str) -> None:
    """collect, damage, collect --repair: every array and ledger entry equals a clean run's."""
    cache = _copy(clean, tmp_path)
    DAMAGE[how](cache, tmp_path / "victims")
    before = _tree(tmp_path / "victims") if (tmp_path / "victims").exists() else {}
    verdict = _within(lambda: verify_cache(cache))
    damaged = sorted({p.rows[0] // 4 for p in verdict.problems})
    assert verdict.problems and all(p.repair == "recompute" for p in verdict.problems), verdict
    plain = _within(lambda: collect(_cfg(env, tmp_path / "store"), loaded))
    assert plain.reused  # without --repair a complete cache is reused as before
    res = _within(lambda: collect(_cfg(env, tmp_path / "store", repair=True), loaded))
    assert not res.reused and res.status == "complete"
    assert res.shards_computed == len(damaged)  # exactly the damaged shards
    assert verify_cache(cache).problems == []
    a, b = _snapshot(cache), _snapshot(clean)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for rel in b:
        assert a[rel] == b[rel], rel
    if before:
        assert _tree(tmp_path / "victims") == before
    again = collect(_cfg(env, tmp_path / "store", repair=True), loaded)
    assert again.reused  # intact: nothing to recompute


def test_repair_refuses_damage_recomputing_cannot_fix(clean: Path, tmp_path: Path) -> None:
    cache = _copy(clean, tmp_path)
    _plant(cache / "acts" / "stray", "fifo", tmp_path / "victims")  # not where a shard belongs
    c = Cache.open(cache)
    with pytest.raises(IA2Error, match=r"cannot be repaired.*acts/stray is a FIFO"):
        _within(c.repair)
    assert Cache.open(cache).status == "complete"  # untouched


def test_the_loader_points_at_repair(clean: Path, tmp_path: Path) -> None:
    cache = _copy(clean, tmp_path)
    _flip(_shard_file(cache, "acts/attn", 1))
    with pytest.raises(IA2Error, match="--repair"):
        _read_everything(cache)



@pytest.mark.parametrize("parts", [[], [""], ["a", ".."], ["..", "f"], ["a", "."], ["a/b"], ["a", "f\0"]])
def test_open_parts_beneath_refuses_names_not_below_the_root(tmp_path: Path, parts: list[str]) -> None:
    from ia2cache._io import open_parts_beneath

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="not the names of a file below"):
        open_parts_beneath(tmp_path, parts, os.O_RDONLY)


def test_open_parts_beneath_follows_no_link_and_opens_regular_files_only(tmp_path: Path) -> None:
    from ia2cache._io import open_parts_beneath

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    fd = open_parts_beneath(tmp_path, ["a", "f"], os.O_RDONLY)
    try:
        assert os.read(fd, 1) == b"x"
    finally:
        os.close(fd)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "lf").symlink_to(tmp_path / "a" / "f")
    os.mkfifo(tmp_path / "a" / "fifo")
    for parts in (["link", "f"], ["a", "lf"], ["a", "fifo"]):
        with pytest.raises(IA2Error):
            open_parts_beneath(tmp_path, parts, os.O_RDONLY)
    with pytest.raises(FileNotFoundError):
        open_parts_beneath(tmp_path, ["a", "missing"], os.O_RDONLY)
