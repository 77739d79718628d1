"""Tests for ia2cache.store.manifest: the key derivation, the frozen Manifest, its checks and diff."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ia2cache.store import ArraySpec, Manifest, cache_key, manifest_problems
from ia2cache.store.manifest import ManifestError, diff, format_of

FIXTURE = Path(__file__).parent / "data" / "format1_caches.tar.gz"
SPECS = [ArraySpec("acts/attn", (2, 3, 4), "uint16", "bfloat16", stats=True),
         ArraySpec("rows/split", (), "uint8")]
FIELDS = {"key_fields": {"n": 8, "site": "attn"}, "n": 8, "site": "attn", "layers": [0, 5]}


def _new(**extra: object) -> Manifest:
    fields = {**FIELDS, **extra}
    return Manifest.new(cache_key(fields["key_fields"]), fields, SPECS, 10, 4, 2)


def test_cache_key_is_canonical_json_with_the_key_schema() -> None:
    a = cache_key({"b": 1, "a": [1, 2]})
    assert a == cache_key({"a": [1, 2], "b": 1}) and a != cache_key({"b": 1, "a": [1, 3]})
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    text = json.dumps({"a": [1, 2], "b": 1, "schema": 1}, sort_keys=True, separators=(",", ":"))
    assert a == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_keys_do_not_depend_on_the_store_format(tmp_path: Path) -> None:
    """A format-1 cache's key_fields give the key it was filed under: migrate keeps every key."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    for key in json.loads((tmp_path / "fixture.json").read_text())["complete"], :
        raw = json.loads((tmp_path / "store" / key / "zarr.json").read_text())["attributes"]["manifest"]
        assert format_of(raw) == 1 and cache_key(raw["key_fields"]) == key


def test_a_manifest_is_frozen_and_reads_like_its_json() -> None:
    m = _new()
    assert (m.format, m.status, m.rows, m.rows_per_shard, m.rows_per_chunk) == (2, "partial", 10, 4, 2)
    assert m.specs == {s.path: s for s in SPECS} and m.site == "attn" and m.layers == (0, 5)
    assert m["n"] == 8 and m.get("absent") is None and "key_fields" in m
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.status = "complete"  # type: ignore[misc]
    m["layers"].append(9)  # a copy: the manifest is unchanged
    assert m["layers"] == [0, 5]
    done = m.updated(status="complete", seconds=1.5)
    assert done.status == "complete" and m.status == "partial" and done["seconds"] == 1.5
    assert done.diff(m) == [] and done.digest == m.digest  # status and seconds are volatile
    assert Manifest.from_json(done.to_json(), m.key) == done


def test_diff_names_every_differing_field_but_the_volatile_ones() -> None:
    a = {"n": 8, "model": {"name": "x", "fp": "1"}, "created": "then", "status": "partial"}
    assert diff(a, {"n": 8, "model": {"name": "x", "fp": "1"}, "created": "now", "status": "complete"}) == []
    assert diff(a, {"n": 9, "model": {"name": "y", "fp": "1"}, "seed": 0}) == ["model.name", "n", "seed"]


def test_manifest_problems_names_what_is_wrong() -> None:
    good = _new().to_json()
    assert manifest_problems(good) == [] and manifest_problems(good, good["key"]) == []
    assert any("folder is named" in p for p in manifest_problems(good, "f" * 16))
    for field, value, needle in [("format", 1, "format is 1"), ("status", "done", "status is 'done'"),
                                 ("rows", 0, "rows is 0"), ("layers", "all", "layers is 'all'"),
                                 ("arrays", {}, "arrays is missing")]:
        raw = {**good, field: value}
        assert any(needle in p for p in manifest_problems(raw)), (field, manifest_problems(raw))
        with pytest.raises(ManifestError):
            Manifest.from_json(raw)
    assert manifest_problems([1]) == ["the manifest is not a JSON object"]


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(["n", "site", "layers", "rows", "rows_per_chunk", "key_fields", "created"]),
       value=st.one_of(st.integers(-3, 99), st.text(max_size=5), st.lists(st.integers(0, 9), max_size=3)))
def test_any_edit_of_a_written_manifest_shows(field: str, value: object) -> None:
    """Every non-volatile field is sealed by the checksum: an edit is a problem, never silent."""
    good = _new().to_json()
    if good.get(field) == value:
        return
    problems = manifest_problems({**good, field: value})
    assert problems if field != "created" else problems == [], (field, value)
