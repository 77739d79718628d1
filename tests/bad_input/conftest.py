"""The bad-input matrix: every CLI command, fed each kind of bad input, exits 2 with one message
that names the culprit (flag, file and line, key or path), prints nothing on stdout, and leaves
every existing cache, adapter and sweep directory byte for byte as it was.

One module per command holds its ``CASES``; they share the ``world`` fixture (built once for the
package) and :func:`check`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.testing import tiny_llama
from tests.conftest import mark_as_sweep, write_jsonl, write_task

runner = CliRunner()
WORDS = ["hot", "up", "big", "walk", "go", "France", "Spain", "Italy"]


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_tok: Any) -> dict[str, Any]:
    """A world with one of everything: models, task files good and bad, a store holding a complete
    and a partial cache, an adapter, a sweep folder, and places outside the store."""
    d = tmp_path_factory.mktemp("bad_input")
    other = d / "other-model"  # same shapes, other weights: another fingerprint
    tiny_llama(len(tiny_tok), seed=1).save_pretrained(other)
    tiny_tok.save_pretrained(other)
    task = write_task(d / "task.jsonl", ((f"{WORDS[i % 8]} {i}", WORDS[(i * 3) % 8]) for i in range(40)))
    write_jsonl(
        d / "malformed.jsonl",
        [
            json.dumps({"input": "a", "target": "b"}),
            json.dumps({"input": "c", "target": "d"}),
            '{"input": "e", "target": ',
        ],
    )
    write_jsonl(
        d / "empty_target.jsonl",
        [json.dumps({"input": "a", "target": "b"}), json.dumps({"input": "c", "target": ""})],
    )
    write_jsonl(
        d / "no_target.jsonl", [json.dumps({"input": "a", "target": "b"}), json.dumps({"input": "c"})]
    )
    write_jsonl(d / "empty.jsonl", [])
    long_input = " ".join(WORDS * 200)  # ~1600 words: past the tiny model's 1024 positions alone
    write_task(d / "long.jsonl", ((f"{long_input} {i}", WORDS[i % 8]) for i in range(8)))
    store = d / "store"
    base = dict(
        model=str(tiny_model_dir),
        task=str(task),
        n=8,
        k=3,
        store=str(store),
        max_new_tokens=1,
        dtype="fp32",
        shard_rows=8,
    )
    done = collect(CollectConfig(**base))
    partial_cfg = CollectConfig(**{**base, "seed": 1})
    from ia2cache import store as store_mod

    real = store_mod.Cache.finalize
    store_mod.Cache.finalize = lambda self, extra=None: None  # type: ignore[method-assign]
    try:
        partial = collect(partial_cfg)
    finally:
        store_mod.Cache.finalize = real  # type: ignore[method-assign]
    adapter = d / "adapter"
    distill(
        DistillConfig(cache=done.cache, model=str(tiny_model_dir), method="act", epochs=1, out=str(adapter))
    )
    sweep_dir = mark_as_sweep(d / "sweep")
    write_jsonl(
        sweep_dir / "results.jsonl",
        [json.dumps({"task": "t", "n": 4, "method": "tok", "seed": 0, "accuracy": 0.5}), "{not json"],
    )
    elsewhere = d / "elsewhere"  # a cache outside the store, and a plain folder
    elsewhere.mkdir()
    (elsewhere / "plain").mkdir()
    (store / "escape").symlink_to(elsewhere / "plain")
    shutil.copytree(done.cache, elsewhere / "cache_copy")  # a real cache, outside the store
    (store / "escape_cache").symlink_to(elsewhere / "cache_copy")
    (d / "a_file").write_text("x")
    shutil.copytree(adapter, d / "adapter_badrun")  # an adapter whose run.json is torn
    (d / "adapter_badrun" / "run.json").write_text('{"model_spec": ')
    return {
        "d": d,
        "model": str(tiny_model_dir),
        "other": str(other),
        "task": str(task),
        "store": str(store),
        "cache": done.cache,
        "key": done.key,
        "partial": partial.key,
        "adapter": str(adapter),
        "sweep": str(sweep_dir),
        "file": str(d / "a_file"),
    }


def _tree_hash(*roots: str) -> dict[str, str]:
    out = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath, name)
                if not p.is_symlink():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


A = Callable[[dict[str, Any]], list[str]]


def col(*extra: str) -> A:
    """collect with a working model, task and store unless ``extra`` overrides them."""

    def build(w: dict[str, Any]) -> list[str]:
        args = [x.format(**w) for x in extra]
        base = {"--model": w["model"], "--task": w["task"], "--store": w["store"], "--n": "8"}
        for flag in list(base):
            if flag in args:
                del base[flag]
        return ["collect", *[x for kv in base.items() for x in kv], *args]

    return build


def cmd(*args: str) -> A:
    """Any command, its arguments as given."""
    return lambda w: [x.format(**w) for x in args]


Case = tuple[str, A, list[str]]
"""(id, argv, words the message must hold). {d} {model} {other} {task} {store} {cache} {key}
{partial} {adapter} {sweep} {file} in argv and words are filled from the ``world`` fixture."""


def check(world: dict[str, Any], argv: A, needles: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one case: exit 2, every needle in the one-line message, nothing on stdout, nothing
    under the store, the adapter, the sweep or the default --out changed."""
    monkeypatch.setenv("IA2CACHE_HOME", str(Path(world["d"]) / "home"))  # default --out and --store
    roots = (world["store"], world["adapter"], world["sweep"], str(Path(world["d"]) / "elsewhere"))
    before = _tree_hash(*roots)
    r = runner.invoke(app, argv(world))
    msg = " ".join(r.stderr.split())
    assert r.exit_code == 2, (r.exit_code, msg, r.exception)
    assert "Traceback" not in msg
    for needle in needles:
        assert needle.format(**world) in msg, (needle, msg)
    assert r.stdout == ""
    assert _tree_hash(*roots) == before


def params(cases: list[Case]) -> Any:
    """``cases`` as pytest parameters named by their ids."""
    return pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in cases], ids=[c[0] for c in cases])
