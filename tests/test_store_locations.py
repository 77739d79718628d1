"""Tests for ia2cache.store.locations: one Location type for local folders and fsspec URLs, the same
operations on both, strict reads of shard files, and no local/remote branch outside the module."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ia2cache.errors import IA2Error
from ia2cache.store import ArraySpec, Cache, location
from ia2cache.store.locations import LocalLocation, MissingShardError, RemoteLocation, RemotePath

ROOT = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef"


@pytest.fixture(params=["local", "memory"])
def loc(request: pytest.FixtureRequest, tmp_path: Path) -> LocalLocation | RemoteLocation:
    """A fresh folder: on disk, or in fsspec's in-memory filesystem (a remote store without a network)."""
    if request.param == "local":
        return location(tmp_path / "x")  # type: ignore[return-value]
    return location(f"memory://ia2-{os.urandom(4).hex()}/x")  # type: ignore[return-value]


def test_location_parses_every_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert location("~/store").path == tmp_path / "store"
    assert location(f"file://{tmp_path}/s").path == tmp_path / "s"
    assert isinstance(location(tmp_path), LocalLocation)
    assert isinstance(location("memory://b/p"), RemoteLocation)
    remote = location("memory://bucket/prefix/")
    assert str(remote).endswith("bucket/prefix") and str(remote / "k") == f"{remote}/k"  # no trailing /
    assert location(remote) is remote and location(remote.path) == remote
    assert (remote / "a" / ".." / "b").resolve() == remote / "b"
    assert (remote / "b").is_relative_to(remote) and not remote.is_relative_to(remote / "b")


def test_the_same_operations_on_both(loc: LocalLocation | RemoteLocation) -> None:
    loc.mkdir()
    assert loc.listdir("ledger") == [] and not loc.has("ledger/e.json")
    loc.write_json("ledger/e.json", {"b": 1, "a": [1, 2]})
    assert loc.has("ledger/e.json") and loc.listdir("ledger") == ["e.json"]
    assert json.loads(loc.read("ledger/e.json", 1 << 10)) == {"a": [1, 2], "b": 1}
    assert loc.file_problem("ledger/e.json") is None
    problem = loc.file_problem("ledger/none.json")
    assert problem is not None and "missing" in problem
    with pytest.raises(FileNotFoundError):
        loc.read("ledger/none.json", 1 << 10)
    assert loc.du() > 0 and [c.name for c in loc.children()] == ["ledger"]
    loc.remove("ledger/e.json")
    assert not loc.has("ledger/e.json")
    loc.remove("ledger/e.json")  # absent: nothing to do
    loc.probe_writable()
    with loc.lock(".lock"), pytest.raises(IA2Error, match="another ia2cache process is writing"), \
            loc.lock(".lock"):
        pass
    loc.remove_tree()
    assert not loc.has("ledger")


def test_reads_of_a_missing_shard_file_are_damage_never_zeros(loc: LocalLocation | RemoteLocation) -> None:
    spec = ArraySpec("acts/attn", (2, 3), "float32")
    cache = Cache.create_at(loc, KEY, {"n": 1}, [spec], 4, 2, 2)
    with cache.lock():
        for s in (0, 1):
            cache.write_shard(s, {spec.path: np.full((2, 2, 3), s + 1, np.float32)})
        cache.finalize()
    loc.remove("acts/attn/c/1")
    reader = Cache.open(loc)
    assert reader.read(spec.path, 0, 2).tolist() == np.ones((2, 2, 3)).tolist()
    with pytest.raises(MissingShardError, match="acts/attn/c/1/0/0 is missing"):
        reader.read(spec.path, 0, 4)
    assert [p.rows for p in reader.verify()] == [(2, 4)]


def test_local_refuses_links_and_swaps_folders_atomically(tmp_path: Path) -> None:
    a, b = location(tmp_path / "a"), location(tmp_path / "b")
    a.mkdir()
    b.mkdir()
    (tmp_path / "a" / "one").write_text("a")
    (tmp_path / "b" / "two").write_text("b")
    a.exchange(b)
    assert (tmp_path / "a" / "two").exists() and (tmp_path / "b" / "one").exists()
    (tmp_path / "a" / "link").symlink_to(tmp_path / "b" / "one")
    with pytest.raises(ValueError, match="symbolic link"):
        a.read("link", 10)
    assert [(rel, kind) for rel, kind in a.special_files()] == [("link", "symbolic link")]
    (tmp_path / "c").symlink_to(tmp_path / "a")
    with pytest.raises(IA2Error, match="symbolic link"):
        location(tmp_path / "c").check_folder()
    with pytest.raises(IA2Error, match="sibling"):
        a.exchange(location(tmp_path / "a" / "sub"))


def test_an_object_store_cannot_swap_and_says_how_to_migrate() -> None:
    remote = location("memory://bucket/k")
    assert not remote.can_swap and location(Path("/x")).can_swap
    with pytest.raises(IA2Error, match="copy it to a local store"):
        remote.exchange(location("memory://bucket/j"))


def _location_branches(path: Path) -> list[int]:
    """Lines of ``path`` that branch on a location's kind (isinstance with a location class)."""
    names = {"RemotePath", "LocalLocation", "RemoteLocation", "Location"}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        is_call = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
        if is_call and len(node.args) == 2:
            used = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            used |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            if used & names:
                out.append(node.lineno)
    return out


def test_no_local_or_remote_branch_outside_the_location_module() -> None:
    """Every store operation that differs between a local folder and an object store is a method
    of Location: nothing else in the library or the CLI asks which kind a location is."""
    own = ROOT / "ia2cache" / "store" / "locations.py"
    files = [*(ROOT / "ia2cache").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
    found = {str(p.relative_to(ROOT)): lines for p in files if p != own and (lines := _location_branches(p))}
    assert found == {}
    assert _location_branches(own)  # the check does see them where they are
    assert RemotePath("memory://b/p") == RemotePath("memory://b/p")
