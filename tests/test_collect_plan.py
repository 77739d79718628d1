"""Plan before paying: `collect --plan` (rows, positions, bytes, free space, a probe's time)
writes nothing, and a collect whose store cannot hold the cache is refused before it starts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ia2cache.collect as collect_mod
from cli.main import app
from ia2cache.collect import CollectConfig, collect, plan_collect
from ia2cache.errors import IA2Error
from tests.conftest import mixed_length_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    return mixed_length_env(tmp_path_factory, tiny_model_dir, "plan")


def _cfg(env: dict[str, Any], store: Path, **kw: Any) -> CollectConfig:
    base = dict(model=env["model"], task=env["task"], n=12, k=3, dev=6, store=str(store), max_new_tokens=2,
                batch_size=4, shard_rows=8, chunk_rows=4)
    return CollectConfig(**{**base, **kw})


@pytest.mark.parametrize(("dtype", "itemsize"), [("bf16", 2), ("fp16", 2), ("fp32", 4)])
def test_plan_counts_rows_positions_and_bytes_and_writes_nothing(env: dict[str, Any], tmp_path: Path,
                                                                 dtype: str, itemsize: int) -> None:
    store = tmp_path / "store"
    p = plan_collect(_cfg(env, store, dtype=dtype, layers="0,2"))
    assert (p.rows, p.rows_to_compute, p.position_slots, p.positions) == (18, 18, 2, 36)
    assert (p.layers, p.hidden, p.status) == (2, 64, "absent")
    assert p.bytes_activations == 18 * 2 * 2 * 64 * itemsize
    assert p.bytes_on_disk > p.bytes_activations and p.bytes_needed == p.bytes_on_disk
    assert p.free_bytes is not None and p.free_bytes > 0 and p.fits
    assert p.estimated_seconds is None and p.teacher_tokens > 18
    assert not store.exists()  # nothing written, not even the store folder


def test_plan_bounds_what_collect_writes_and_sees_a_complete_cache(env: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    cfg = _cfg(env, tmp_path / "store", dtype="fp32")
    before = plan_collect(cfg)
    done = collect(cfg)
    assert done.key == before.key and done.cache == before.cache
    # The estimate is an upper bound of the arrays' bytes; metadata and ledger come on top.
    assert done.bytes_on_disk <= before.bytes_on_disk + 64 * 1024
    after = plan_collect(cfg)
    assert (after.status, after.rows_to_compute, after.bytes_needed) == ("complete", 0, 0)


def test_probe_times_one_micro_batch(env: dict[str, Any], tmp_path: Path) -> None:
    p = plan_collect(_cfg(env, tmp_path / "store", probe=True))
    assert p.probe_rows == 4 and p.probe_seconds is not None and p.probe_seconds > 0
    assert p.estimated_seconds == pytest.approx(p.probe_seconds * 5, rel=0.05, abs=0.1)  # 18 rows / 4
    assert not (tmp_path / "store").exists()


def test_collect_refuses_a_store_without_room_before_creating_the_cache(
        env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    need = plan_collect(_cfg(env, store)).bytes_needed
    monkeypatch.setattr(collect_mod, "_free_bytes", lambda _store: need - 1)
    with pytest.raises(IA2Error, match=r"--store .*store: the cache needs up to .* GB for 18 rows at "
                       r"--dtype bf16 \(uncompressed\) but its filesystem has"):
        collect(_cfg(env, store))
    assert not any(store.glob("*/zarr.json"))
    assert plan_collect(_cfg(env, store)).fits is False
    res = CliRunner().invoke(app, ["collect", "--model", env["model"], "--task", env["task"], "--n", "12",
                                   "--k", "3", "--dev", "6", "--max-new-tokens", "2", "--store", str(store),
                                   "--batch-size", "4", "--shard-rows", "8", "--chunk-rows", "4"])
    assert res.exit_code == 2 and "free" in res.output, res.output
    monkeypatch.setattr(collect_mod, "_free_bytes", lambda _store: need)
    assert collect(_cfg(env, store)).status == "complete"


def test_a_remote_store_has_no_free_space_to_check() -> None:
    from ia2cache._fs import location

    assert collect_mod._free_bytes(location("s3://bucket/prefix")) is None


def test_cli_plan_json_and_text(env: dict[str, Any], tmp_path: Path) -> None:
    args = ["collect", "--model", env["model"], "--task", env["task"], "--n", "12", "--k", "3", "--dev", "6",
            "--max-new-tokens", "2", "--store", str(tmp_path / "store"), "--plan"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["plan"]
    assert plan["rows"] == 18 and plan["fits"] is True and plan["estimated_seconds"] is None
    text = CliRunner().invoke(app, [*args, "--probe"])
    assert text.exit_code == 0, text.output
    assert "nothing written" in text.output and "free" in text.output and "time: ~" in text.output
    assert not (tmp_path / "store").exists()


def test_plan_is_not_part_of_the_key(env: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg(env, tmp_path / "store")
    assert plan_collect(cfg).key == plan_collect(replace(cfg, plan=True, probe=False)).key
    res = collect(replace(cfg, plan=True))
    assert res.status == "planned" and res.plan is not None and res.plan["rows"] == 18
    assert not (tmp_path / "store").exists()


def test_every_config_field_is_in_the_key_unless_declared_non_key(env: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    """The key is derived from the config: a field that is not declared in NON_KEY names the
    cache, so a new field that changes the output cannot be left out of the key by accident."""
    from dataclasses import field, fields, make_dataclass

    from ia2cache.collect import NON_KEY, _key_fields

    cfg = _cfg(env, tmp_path / "store")
    keyed = _key_fields(cfg, {})
    for f in fields(CollectConfig):
        assert (f.name in keyed) != (f.name in NON_KEY), f.name
    extended = make_dataclass("Extended", [("new_knob", int, field(default=3))], bases=(CollectConfig,),
                              frozen=True)
    a = extended(**{f.name: getattr(cfg, f.name) for f in fields(CollectConfig)})
    assert _key_fields(a, {})["new_knob"] == 3
    assert _key_fields(replace(a, new_knob=4), {}) != _key_fields(a, {})


def test_non_key_fields_keep_the_key_and_key_fields_change_it(env: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = plan_collect(_cfg(env, store)).key
    for name, value in [("batch_size", 2), ("shard_rows", 16), ("chunk_rows", 8)]:
        assert plan_collect(_cfg(env, store, **{name: value})).key == base, name
    assert plan_collect(_cfg(env, tmp_path / "elsewhere")).key == base
    for name, value in [("seed", 1), ("n", 10), ("dtype", "fp32"), ("layers", "0"), ("max_new_tokens", 1),
                        ("site", "resid"), ("dev", 4), ("unlabelled", 4)]:
        assert plan_collect(_cfg(env, store, **{name: value})).key != base, name
