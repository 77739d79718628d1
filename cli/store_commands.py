"""Commands on the cache store: ``ls``, ``inspect``, ``verify``, ``migrate``."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import render
from cli.app import JSON_OPT, app, emit_json, guarded
from cli.options import config_docs
from ia2cache.collect import CollectConfig
from ia2cache.errors import IA2Error

STORE_HELP = config_docs(CollectConfig)["store"]
CACHE_ARG = typer.Argument(..., help="A cache key (in --store) or a cache directory.")


@app.command("ls")
@guarded
def ls_cmd(
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_out: bool = JSON_OPT,
) -> None:
    """List the caches in a store (one whose manifest cannot be trusted with status damaged; one of
    store format 1 with status "format 1": `ia2cache migrate KEY` rewrites it). A lossy --dtype
    (int8) is named as such.

    [bold]Examples[/]

      ia2cache ls
      ia2cache ls --store ./store --json
    """
    from ia2cache.store import default_store, is_url, list_caches

    root = store or str(default_store())
    if store and not is_url(store) and not Path(store).expanduser().is_dir():
        raise IA2Error(f"--store {store}: no such directory")  # a typo, not an empty store
    caches = list_caches(root)
    if json_out:
        emit_json({"store": root, "caches": caches})
        return
    render.ls(root, caches)


@app.command()
@guarded
def inspect(
    cache: str = CACHE_ARG,
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_out: bool = JSON_OPT,
) -> None:
    """Show a cache's manifest, its arrays and how to read it without ia2cache.

    [bold]Examples[/]

      ia2cache inspect 3f2a9c0d1b2e4f56
      ia2cache inspect ~/.cache/ia2cache/store/3f2a9c0d1b2e4f56 --json | jq .layers
    """
    from ia2cache.store import ACT_DTYPES, Cache, default_store, resolve_cache

    c = Cache.open(resolve_cache(store or default_store(), cache))
    manifest = dict(c.manifest)
    kind = ACT_DTYPES.get(str(manifest.get("dtype")))
    manifest["lossy"] = bool(kind and kind.lossy)
    manifest["path"] = str(c.path)
    manifest["bytes_on_disk"] = c.bytes_on_disk()
    manifest["shards_done"] = len(c.done_shards())
    manifest["shards_total"] = c.n_shards
    if json_out:
        emit_json(manifest)
        return
    render.inspect(c, manifest, kind)


@app.command()
@guarded
def verify(
    cache: str = CACHE_ARG,
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_out: bool = JSON_OPT,
) -> None:
    """Check every chunk against the ledger's checksums and stats. Exit 0 intact, 1 damaged.

    [bold]Examples[/]

      ia2cache verify 3f2a9c0d1b2e4f56
      ia2cache verify ./store/3f2a9c0d1b2e4f56 --json
    """
    from ia2cache.store import default_store, resolve_cache, verify_cache

    c = verify_cache(resolve_cache(store or default_store(), cache))  # a damaged manifest: exit 1
    problems = [p.to_dict() for p in c.problems]
    if json_out:
        emit_json({"ok": not problems, "problems": problems, "cache": str(c.path), "status": c.status,
                   "lossy": c.lossy})
    else:
        render.verify(c, problems)
    if problems:
        raise typer.Exit(code=1)


@app.command()
@guarded
def migrate(
    cache: str = typer.Argument(..., help="A cache key (in --store) or a cache folder, of store format 1."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_out: bool = JSON_OPT,
) -> None:
    """Rewrite a cache of store format 1 (one array per layer) as format 2 (one per site), in place.

    Same key, the same values bit for bit (checked before anything is replaced), verified; the two
    folders are swapped in one atomic step, so a kill at any point leaves the format-1 cache usable
    (rerun to finish). Damaged format-1 shards are left for `ia2cache collect` to recompute. Local
    stores only: an object store cannot swap two prefixes atomically.

    [bold]Examples[/]

      ia2cache migrate 3f2a9c0d1b2e4f56
      ia2cache migrate 3f2a9c0d1b2e4f56 --store ./store --json
    """
    from ia2cache.store import default_store, resolve_cache
    from ia2cache.store import migrate as run_migrate

    result = run_migrate(resolve_cache(store or default_store(), cache))
    if json_out:
        emit_json(result.to_dict())
        return
    render.migrate(result)
