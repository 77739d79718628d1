"""Tests for ia2cache.store.ledger: entries round trip, malformed ones are named, stats pool exactly,
and the one chunk check tells intact, damaged and failing reads apart."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ia2cache.store import ArraySpec, LedgerEntry, Stats, check_chunk, digest
from ia2cache.store.ledger import shard_digest

SPECS = {"acts/attn": ArraySpec("acts/attn", (2, 3), "float32", stats=True),
         "tokens/ids": ArraySpec("tokens/ids", (4,), "int32")}


def _data(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {"acts/attn": rng.standard_normal((n, 2, 3)).astype(np.float32),
            "tokens/ids": rng.integers(0, 9, (n, 4)).astype(np.int32)}


def test_an_entry_holds_chunk_digests_per_layer_stats_and_round_trips() -> None:
    data = _data(5)
    e = LedgerEntry.build(1, (4, 9), data, SPECS, 2, {"acts/attn": (0.001, 0.002)})
    acts = e.arrays["acts/attn"]
    assert acts.chunks == tuple(digest(data["acts/attn"][i : i + 2]) for i in (0, 2, 4))
    assert acts.sha256 == shard_digest(acts.chunks)
    assert len(acts.stats) == 2 and acts.stats[1] == Stats.of(data["acts/attn"][:, 1])
    assert acts.max_rel_error == 0.001 and e.arrays["tokens/ids"].stats == ()
    assert LedgerEntry.from_json(e.to_json(), 1) == e


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda j: j.update(shard=2), "ledger says shard 2"),
    (lambda j: j.update(rows=[4]), "rows [4]"),
    (lambda j: j.pop("arrays"), "has no arrays"),
    (lambda j: j["arrays"]["acts/attn"].pop("sha256"), "array acts/attn: no sha256"),
    (lambda j: j["arrays"]["acts/attn"].update(chunks="abc"), "not a list"),
    (lambda j: j["arrays"]["acts/attn"]["stats"][0].pop("mean"), "array acts/attn"),
])
def test_a_malformed_entry_is_refused_naming_what(edit: object, needle: str) -> None:
    raw = LedgerEntry.build(1, (4, 9), _data(5), SPECS, 2).to_json()
    edit(raw)  # type: ignore[operator]
    with pytest.raises(ValueError) as e:
        LedgerEntry.from_json(raw, 1)
    assert needle in str(e.value)
    with pytest.raises(ValueError, match="not a JSON object"):
        LedgerEntry.from_json([], 1)


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5), seed=st.integers(0, 999),
       offset=st.floats(-100, 100), nan=st.booleans())
def test_stats_pooled_over_shards_equal_the_whole(sizes: list[int], seed: int, offset: float,
                                                  nan: bool) -> None:
    rng = np.random.default_rng(seed)
    parts = [(rng.standard_normal(n) * 3 + offset).astype(np.float32) for n in sizes]
    if nan:
        parts[0][0] = np.nan
        parts[-1] = np.append(parts[-1], np.float32(np.inf))
    pooled = Stats.pool([Stats.of(p) for p in parts])
    x = np.concatenate(parts).astype(np.float64)
    finite = x[np.isfinite(x)]
    assert pooled["count"] == finite.size and pooled["shards"] == len(parts)
    assert pooled["nan_count"] == int(nan) and pooled["inf_count"] == int(nan)
    if finite.size:
        assert pooled["mean"] == pytest.approx(finite.mean(), rel=1e-9, abs=1e-9)
        assert pooled["var"] == pytest.approx(finite.var(), rel=1e-5, abs=1e-9)
        assert pooled["max_abs"] == np.abs(finite).max()


def test_check_chunk_tells_intact_damaged_and_failing_reads_apart() -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert check_chunk(lambda: x, digest(x)).reason is None
    assert check_chunk(lambda: x, None).data is not None  # the read alone decides
    assert check_chunk(lambda: x + 1, digest(x)).reason == "checksum mismatch"

    def crc() -> np.ndarray:
        raise ValueError("Stored and computed checksum do not match")

    bad = check_chunk(crc, digest(x))
    assert bad.data is None and bad.reason is not None and "unreadable (ValueError" in bad.reason

    def disk() -> np.ndarray:
        raise OSError("disk on fire")

    with pytest.raises(OSError):  # the file system failing is not damage
        check_chunk(disk, None)

    def bug() -> np.ndarray:
        raise AttributeError("a bug")

    with pytest.raises(AttributeError):  # nor is a bug
        check_chunk(bug, None)
