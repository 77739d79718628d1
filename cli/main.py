"""ia2cache command line.

Each command builds a config, calls the library function a notebook would call, and renders
the result: a rich table on stdout, or with ``--json`` one JSON object on stdout and nothing
else there. Progress and logs go to stderr. Exit codes: 0 ok, 1 a check failed, 2 bad input.

Launch: ``ia2cache --help`` (or ``python -m cli --help``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from ia2cache._docs import field_docs
from ia2cache.collect import CollectConfig
from ia2cache.distill import DistillConfig
from ia2cache.errors import IA2Error
from ia2cache.evaluate import EvalConfig
from ia2cache.prompts import DEFAULT_DEV
from ia2cache.sweep import SweepConfig

app = typer.Typer(
    name="ia2cache",
    help="ICL Activation Alignment with the teacher traced once into a zarr cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# Piped output is read by people too: do not squeeze tables into 80 columns there.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
_EVAL = field_docs(EvalConfig)
_COL = field_docs(CollectConfig)
_DIS = field_docs(DistillConfig)
_SW = field_docs(SweepConfig)
_SWEEP_DEFAULTS = SweepConfig(task="-", out="-")
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object on stdout (progress stays on stderr).")


def _setup_logging(verbose: bool = False) -> None:
    # On a terminal, rich; into a file or pipe (CI, batch logs), plain unwrapped lines, so paths
    # and keys in messages survive grep and copy-paste.
    tty = err.is_terminal
    handler = RichHandler(console=err, show_path=False) if tty else logging.StreamHandler(sys.stderr)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s" if tty else "%(levelname)s %(message)s",
        handlers=[handler],
        force=True,
    )
    for noisy in ("transformers", "huggingface_hub", "nnsight", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Deprecation chatter from the libraries we call is not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("ia2cache").setLevel(logging.INFO)


INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def guarded(fn: F) -> F:
    """Turn every failure into one line on stderr and an exit code, never a traceback: 2 for bad
    input (library errors, unusable paths, remote failures), 130 for Ctrl-C, 1 for anything
    unexpected (a bug: IA2CACHE_DEBUG=1 shows its traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err.print("interrupted; rerun the same command to resume", highlight=False)
            raise typer.Exit(code=INTERRUPTED) from None
        except MemoryError:
            raise _fail("out of memory; lower the sizes you asked for (--batch-size, --shard-rows, --n)", 2
                        ) from None
        except OSError as exc:
            if not exc.filename:
                if os.environ.get("IA2CACHE_DEBUG"):
                    raise
                raise _fail(f"{exc.strerror or exc}", 2) from None
            # A path the user gave that cannot be read or written: name it, no traceback.
            where = exc.filename if not exc.filename2 else f"{exc.filename} -> {exc.filename2}"
            err.print(f"[bold red]error:[/] {escape(str(where))}: {escape(exc.strerror or str(exc))}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except IA2Error as exc:
            # One unwrapped line: paths and keys in it must survive copy-paste and grep.
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None
        except Exception as exc:
            from ia2cache._fs import is_remote_failure, remote_failure_message

            if not is_remote_failure(exc):
                if os.environ.get("IA2CACHE_DEBUG"):
                    raise
                raise _fail(f"internal error ({type(exc).__name__}: {exc}); please report it, with "
                            "the command; IA2CACHE_DEBUG=1 shows the traceback", 1) from None
            # A remote client's error outside ia2cache's own calls (zarr's reads and writes):
            # name the store or cache the user gave.
            where = kwargs.get("store") or kwargs.get("cache") or "the remote store"
            err.print(f"[bold red]error:[/] {escape(remote_failure_message(where, exc))}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """One JSON object on stdout: non-finite numbers as null, never a bare NaN."""
    from ia2cache.outputs import json_safe

    text = json.dumps(json_safe(json.loads(json.dumps(obj, default=str))), sort_keys=True, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@app.command()
@guarded
def tasks(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """List the built-in tasks with their sizes and templates, and the paper's 12 benchmarks
    (hf:NAME, read through `datasets` from the hub, the HF cache or $IA2CACHE_HF_DATA/NAME/).

    [bold]Examples[/]

      ia2cache tasks
      ia2cache tasks --json | jq '.tasks[].name'
      ia2cache tasks --json | jq '.hf_tasks[] | {name, dataset, ood_eval}'
    """
    from ia2cache.tasks import list_builtin, load_task
    from ia2cache.tasks.hf import registry_rows

    rows = [load_task(f"builtin:{name}").summary() for name in list_builtin()]
    hf_rows = registry_rows()
    if json_out:
        emit_json({"tasks": rows, "hf_tasks": hf_rows})
        return
    table = Table(title="built-in tasks")
    for col in ("name", "train", "eval", "single_token", "template", "labels"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], str(r["train"]), str(r["eval"]), str(r["single_token"]),
            repr(r["template"]), ", ".join(r["labels"] or []) or "-",
        )
    out.print(table)
    hf = Table(title="the paper's benchmarks (--task hf:NAME or hf:NAME@DIR)")
    for col in ("name", "paper", "dataset", "labels / parser", "OOD eval"):
        hf.add_column(col)
    for r in hf_rows:
        hf.add_row(r["name"], r["paper_name"], r["dataset"] + (f" ({r['config']})" if r["config"] else ""),
                   ", ".join(r["labels"] or []) or f"parser {r['parser']}, T={r['max_new_tokens']}",
                   ", ".join(r["ood_eval"]) or "-")
    out.print(hf)


@app.command("eval")
@guarded
def eval_cmd(
    task: str = typer.Option("sentiment_remap", "--task", help="Built-in task, hf:NAME or a .jsonl file."),
    eval_task: str | None = typer.Option(
        None, "--eval-task", help="Out-of-distribution: score this task's eval split; ICL demos "
        "(and the teacher for --agreement) still come from --task's pool."),
    model: str | None = typer.Option(
        None, "--model", help="Base model: 'default', a model directory, a .gguf file or a hub id; default "
        "'default'. With --adapter: default the adapter's own base model; another one is accepted only "
        "when its weights are the same (same fingerprint)."),
    icl: bool = typer.Option(False, "--icl", help="Evaluate the base model with k demos (ICL)."),
    base: bool = typer.Option(False, "--base", help="Evaluate the base model without demos."),
    adapter: str | None = typer.Option(None, "--adapter", help="Evaluate a distilled adapter directory."),
    agreement: bool = typer.Option(False, "--agreement", help=_EVAL["agreement"]),
    k: int | None = typer.Option(None, "--k", help=_EVAL["k"] + " Default: the teacher's, min(N-1, 8); "
                                 "with --adapter, the adapter's cache's k."),
    n: int | None = typer.Option(None, "--n", help=_EVAL["n"] + " With --adapter: its cache's N."),
    icl_demos: str = typer.Option("train", "--icl-demos", help=_EVAL["icl_demos"]),
    n_eval: int = typer.Option(200, "--n-eval", help=_EVAL["n_eval"]),
    seed: int | None = typer.Option(None, "--seed", help=_EVAL["seed"] + " Default 0; with --adapter, "
                                    "its cache's."),
    batch_size: int = typer.Option(8, "--batch-size", help=_EVAL["batch_size"]),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help=_EVAL["max_new_tokens"]),
    template: str | None = typer.Option(None, "--template", help="Prompt template with {input}."),
    separator: str | None = typer.Option(None, "--separator", help="Demo separator."),
    eval_fraction: float = typer.Option(0.5, "--eval-fraction", help="JSONL: share held out for eval."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Accuracy, ECE (equal-mass and equal-width, 15 bins) and NLL on a task's eval split.

    [bold]Examples[/]

      ia2cache eval --task capitals --base
      ia2cache eval --task sentiment_remap --icl --n 8 --seed 0 --n-eval 100 --json   # the teacher of N=8
      ia2cache eval --task sentiment_remap --icl --icl-demos pool --k 8    # demos from the whole pool
      ia2cache eval --task sentiment_remap --adapter runs/KEY/a2t-lora-lr0.001-s0 --agreement
      ia2cache eval --task arith_word --icl --n 8 --k 4 --n-eval 100
      ia2cache eval --task hf:sst2 --eval-task hf:fins --adapter runs/sst2-a2t --json
    """
    from ia2cache.evaluate import evaluate, load_adapter, ood_task
    from ia2cache.models import load_model
    from ia2cache.tasks import load_task

    if sum([icl, base, adapter is not None]) != 1:
        raise IA2Error("choose exactly one of --icl, --base and --adapter DIR")
    mode = "icl" if icl else "base" if base else "adapter"
    record: dict[str, Any] = {}
    if adapter is not None:  # the teacher of --agreement is the adapter's own: its N, k and seed
        from ia2cache.evaluate import read_run_record

        record = read_run_record(adapter, required=True)
        m = record.get("cache_manifest") or {}
        n = m.get("n") if n is None else n
        k = m.get("k") if k is None else k
        seed = m.get("seed", seed) if seed is None else seed
    from ia2cache.prompts import K_MAX

    seed = 0 if seed is None else seed
    if k is None:
        k = min(n - 1, K_MAX) if n else 4
    config = EvalConfig(mode=mode, k=k, n=n, icl_demos=icl_demos, n_eval=n_eval, seed=seed,
                        batch_size=batch_size, agreement=agreement, max_new_tokens=max_new_tokens)
    t = load_task(task, template=template, separator=separator, eval_fraction=eval_fraction)
    if eval_task is not None:
        t = ood_task(t, load_task(eval_task, template=template, separator=separator,
                                  eval_fraction=eval_fraction))
    if adapter is not None:
        net, tok, record = load_adapter(adapter, model=model)
        trained = (record.get("cache_manifest") or {}).get("model") or {}
        from ia2cache.models import is_random

        spec = model or record.get("model_spec", "default")
        info = {"name": trained.get("name") or spec, "spec": spec,
                "fingerprint": trained.get("fingerprint"), "adapter": str(adapter)}
        if is_random(spec):  # said plainly: such figures test a pipeline, not a method
            info.update(random=True, name=f"{info['name']} (random weights)")
    else:
        loaded = load_model(model or "default")
        net, tok, info = loaded.model, loaded.tokenizer, loaded.info.to_dict()
    result = evaluate(net, tok, t, config)
    result["model"] = info
    result["pool"] = len(t.pool)
    if json_out:
        emit_json(result)
        return
    shown = t.name if result["train_task"] == t.name else f"{result['train_task']} -> {t.name} (OOD)"
    table = Table(title=f"{shown} · {result['mode']} · {info['name']}")
    for col in ("n_eval", "k", "accuracy", "ECE (equal-mass)", "ECE (equal-width)", "NLL", "agree w/ ICL"):
        table.add_column(col, justify="right")
    agree = result["agreement_with_icl"]
    table.add_row(
        str(result["n_eval"]), str(result["k"]), f"{result['accuracy']:.3f}",
        f"{result['ece_equal_mass']:.3f}", f"{result['ece_equal_width']:.3f}",
        f"{result['nll']:.3f}", "-" if agree is None else f"{agree:.3f}",
    )
    out.print(table)
    err.print(f"pool {len(t.pool)} examples, eval split {len(t.eval)}; scored {result['n_eval']}")


def _progress_bar(label: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=err, transient=False, disable=not _main_rank(),
    )


def _main_rank() -> bool:
    """False on torchrun ranks other than 0: they print nothing (rank 0 reports for the job)."""
    from ia2cache import distributed

    return distributed.is_main()


def _parse_k(k: str) -> int | None:
    if k == "auto":
        return None
    try:
        return int(k)
    except ValueError:
        raise IA2Error(f"--k {k}: expected 'auto' or an integer") from None


@app.command()
@guarded
def collect(
    model: str = typer.Option("default", "--model", help=_COL["model"]),
    task: str = typer.Option(CollectConfig.task, "--task", help=_COL["task"]),
    n: int = typer.Option(16, "--n", help=_COL["n"]),
    dev: int = typer.Option(DEFAULT_DEV, "--dev", help=_COL["dev"]),
    unlabelled: int = typer.Option(0, "--unlabelled", help=_COL["unlabelled"]),
    unlabelled_file: str | None = typer.Option(None, "--unlabelled-file", help=_COL["unlabelled_file"]),
    k: str = typer.Option("auto", "--k", help=_COL["k"]),
    seed: int = typer.Option(0, "--seed", help=_COL["seed"]),
    response: str = typer.Option("icl", "--response", help=_COL["response"]),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help=_COL["max_new_tokens"]),
    site: str = typer.Option("attn", "--site", help=_COL["site"]),
    layers: str = typer.Option("all", "--layers", help=_COL["layers"]),
    positions: str = typer.Option("response", "--positions", help=_COL["positions"]),
    dtype: str = typer.Option("bf16", "--dtype", help=_COL["dtype"]),
    topk_logits: int = typer.Option(0, "--topk-logits", help=_COL["topk_logits"]),
    batch_size: int = typer.Option(8, "--batch-size", help=_COL["batch_size"]),
    shard_rows: int = typer.Option(32, "--shard-rows", help=_COL["shard_rows"]),
    chunk_rows: int = typer.Option(8, "--chunk-rows", help=_COL["chunk_rows"]),
    template: str | None = typer.Option(None, "--template", help=_COL["template"]),
    separator: str | None = typer.Option(None, "--separator", help=_COL["separator"]),
    eval_fraction: float = typer.Option(0.5, "--eval-fraction", help=_COL["eval_fraction"]),
    split: str = typer.Option("train", "--split", help=_COL["split"]),
    n_eval: int | None = typer.Option(None, "--n-eval", help=_COL["n_eval"]),
    store: str | None = typer.Option(None, "--store", help=_COL["store"]),
    repair: bool = typer.Option(False, "--repair", help=_COL["repair"]),
    plan: bool = typer.Option(False, "--plan", help=_COL["plan"]),
    probe: bool = typer.Option(False, "--probe", help=_COL["probe"]),
    json_out: bool = JSON_OPT,
) -> None:
    """Trace the ICL teacher once and store its activations in a zarr cache.

    A complete cache with the same key is reused without model work; a partial one resumes.
    `--plan` prints what it would cost (rows, bytes, free space; `--probe`: time) and writes
    nothing; a collect whose store has no room for the cache is refused before it starts.

    `--model` takes 'default', a model directory, a hub id or a .gguf file (converted once to
    safetensors under $IA2CACHE_HOME/models/<content hash>/).

    [bold]Sites[/] (`--site`), per architecture:

{sites}

    [bold]Examples[/]

      ia2cache collect --task sentiment_remap --n 16
      ia2cache collect --task capitals --n 64 --k 8 --max-new-tokens 8 --site resid --layers 0-5,7
      ia2cache collect --task my.jsonl --template "Q: {input}\\nA:" --store ./store --json
      ia2cache collect --task antonyms --n 8 --split eval --n-eval 100   # for `analyze similarity`
      ia2cache collect --task capitals --n 64 --store s3://bucket/ia2
      ia2cache collect --model gemma-3-270m-q4_k_m.gguf --task first_letter --n 8
      ia2cache collect --task capitals --n 4096 --max-new-tokens 8 --plan --probe
      torchrun --nproc-per-node=2 -m cli -- collect --task capitals --n 64 --store ./store
    """
    from ia2cache.collect import collect as run_collect

    config = CollectConfig(
        model=model, task=task, template=template, separator=separator,
        eval_fraction=eval_fraction, n=n, dev=dev, unlabelled=unlabelled, unlabelled_file=unlabelled_file,
        k=_parse_k(k), seed=seed, response=response,
        max_new_tokens=max_new_tokens, site=site, layers=layers, positions=positions,
        dtype=dtype, topk_logits=topk_logits, batch_size=batch_size,
        shard_rows=shard_rows, chunk_rows=chunk_rows, store=store, split=split, n_eval=n_eval, repair=repair,
        plan=plan, probe=probe,
    )
    if plan:
        _render_plan(run_collect(config).plan or {}, json_out)
        return
    with _progress_bar("collect") as bar:
        job = bar.add_task("collect", total=None, tps="-")
        t0 = time.perf_counter()

        def progress(done: int, total: int, tokens: int) -> None:
            dt = time.perf_counter() - t0
            bar.update(job, completed=done, total=total, tps=f"{tokens / dt:,.0f}" if dt else "-")

        result = run_collect(config, progress=progress)
    if not _main_rank():
        return
    info = result.to_dict()
    if json_out:
        emit_json(info)
        return
    verb = "reused (no model work)" if result.reused else f"collected {result.rows_computed} rows"
    out.print(f"[bold]{verb}[/]: {result.cache}")
    out.print(
        f"rows {result.rows} · status {result.status} · {result.bytes_on_disk / 1e6:.2f} MB on disk"
        f" · {result.seconds:.1f} s"
        + (f" · {info['rows_per_s']} rows/s · {info['tokens_per_s']} tok/s" if result.rows_computed else "")
    )


def _site_help() -> str:
    from ia2cache.sites import SITE_TABLE

    return "\n\n".join(f"    {family}: " + "; ".join(f"{k} = {v}" for k, v in sites.items()) + "."
                       for family, sites in SITE_TABLE.items())


# The site table comes from ia2cache.sites, so help and code cannot drift apart.
collect.__doc__ = (collect.__doc__ or "").replace("{sites}", _site_help())


def _render_plan(p: dict[str, Any], json_out: bool) -> None:
    if not _main_rank():
        return
    if json_out:
        emit_json({"plan": p})
        return

    def gb(x: int) -> str:
        return f"{x / 1e9:.3f} GB" if x >= 1e7 else f"{x / 1e6:.2f} MB"

    out.print(f"[bold]plan[/] (nothing written): {escape(p['cache'])}  [{p['status']}]", highlight=False)
    out.print(f"rows {p['rows']} ({p['rows_to_compute']} to compute) · {p['position_slots']} positions a row "
              f"· {p['positions']} positions × {p['layers']} layers × hidden {p['hidden']} "
              f"· {p['teacher_tokens']} teacher prompt tokens")
    free = "unknown (remote store)" if p["free_bytes"] is None else gb(p["free_bytes"])
    room = {True: "fits", False: "[red]does not fit[/]", None: "not checked"}[p["fits"]]
    out.print(f"on disk at --dtype {p['dtype']}: up to {gb(p['bytes_on_disk'])} (activations "
              f"{gb(p['bytes_activations'])}, uncompressed) · needed now {gb(p['bytes_needed'])} "
              f"· free {free}: {room}")
    if p["estimated_seconds"] is not None:
        out.print(f"time: ~{p['estimated_seconds']:.0f} s (one micro-batch of {p['probe_rows']} rows took "
                  f"{p['probe_seconds']:.2f} s)")
    elif p["rows_to_compute"]:
        out.print("time: not estimated (add --probe: loads the model and times one micro-batch)")


@app.command("ls")
@guarded
def ls_cmd(
    store: str | None = typer.Option(None, "--store", help=_COL["store"]),
    json_out: bool = JSON_OPT,
) -> None:
    """List the caches in a store (one whose manifest cannot be trusted with status damaged).

    [bold]Examples[/]

      ia2cache ls
      ia2cache ls --store ./store --json
    """
    from ia2cache._fs import is_url
    from ia2cache.collect import default_store
    from ia2cache.store import list_caches

    root = store or str(default_store())
    if store and not is_url(store) and not Path(store).expanduser().is_dir():
        raise IA2Error(f"--store {store}: no such directory")  # a typo, not an empty store
    caches = list_caches(root)
    if json_out:
        emit_json({"store": root, "caches": caches})
        return
    table = Table(title=f"caches in {root}")
    for col in ("key", "status", "task", "model", "n", "k", "site", "layers", "T", "rows", "created"):
        table.add_column(col)
    for m in caches:
        lay = m.get("layers") or []
        table.add_row(
            m.get("key", "?"), m.get("status", "?"), str(m.get("task")),
            str((m.get("model") or {}).get("name")), str(m.get("n")), str(m.get("k")),
            str(m.get("site")), str(len(lay)), str(m.get("max_new_tokens")),
            str(m.get("rows")), str(m.get("created", ""))[:16],
        )
    out.print(table)
    for m in caches:
        if m.get("status") == "damaged":
            out.print(f"[red]damaged[/] {escape(m['path'])}: {escape('; '.join(m.get('problems', [])))} "
                      "(see `ia2cache verify`)", highlight=False)


def _open(cache: str, store: str | None) -> Any:
    from ia2cache.collect import default_store
    from ia2cache.store import Cache, resolve_cache

    return Cache.open(resolve_cache(store or default_store(), cache))


@app.command()
@guarded
def inspect(
    cache: str = typer.Argument(..., help="A cache key (in --store) or a cache directory."),
    store: str | None = typer.Option(None, "--store", help=_COL["store"]),
    json_out: bool = JSON_OPT,
) -> None:
    """Show a cache's manifest, its arrays and how to read it without ia2cache.

    [bold]Examples[/]

      ia2cache inspect 3f2a9c0d1b2e4f56
      ia2cache inspect ~/.cache/ia2cache/store/3f2a9c0d1b2e4f56 --json | jq .layers
    """
    c = _open(cache, store)
    manifest = dict(c.manifest)
    manifest["path"] = str(c.path)
    manifest["bytes_on_disk"] = c.bytes_on_disk()
    manifest["shards_done"] = len(c.done_shards())
    manifest["shards_total"] = c.n_shards
    if json_out:
        emit_json(manifest)
        return
    skip = {"arrays", "how_to_read", "key_fields"}
    table = Table(title=f"cache {c.key}", show_header=False)
    for key_ in sorted(k for k in manifest if k not in skip):
        table.add_row(key_, json.dumps(manifest[key_], default=str))
    out.print(table)
    arrays = Table(title="arrays (rows first)")
    for col in ("path", "shape", "dtype", "logical"):
        arrays.add_column(col)
    for path, spec in sorted(manifest.get("arrays", {}).items()):
        arrays.add_row(path, str([c.n_rows, *spec.get("shape", [])]), spec.get("dtype", ""),
                       str(spec.get("logical_dtype") or ""))
    out.print(arrays)
    out.print("[bold]reading it without ia2cache:[/] " + manifest.get("how_to_read", ""))


@app.command()
@guarded
def verify(
    cache: str = typer.Argument(..., help="A cache key (in --store) or a cache directory."),
    store: str | None = typer.Option(None, "--store", help=_COL["store"]),
    json_out: bool = JSON_OPT,
) -> None:
    """Check every chunk against the ledger's checksums and stats. Exit 0 intact, 1 damaged.

    [bold]Examples[/]

      ia2cache verify 3f2a9c0d1b2e4f56
      ia2cache verify ./store/3f2a9c0d1b2e4f56 --json
    """
    from ia2cache.collect import default_store
    from ia2cache.store import resolve_cache, verify_cache

    c = verify_cache(resolve_cache(store or default_store(), cache))  # a damaged manifest: exit 1
    problems = [p.to_dict() for p in c.problems]
    result = {"ok": not problems, "problems": problems, "cache": str(c.path), "status": c.status}
    if json_out:
        emit_json(result)
    elif problems:
        table = Table(title=f"{len(problems)} problem(s) in {c.path}")
        for col in ("array", "rows", "reason"):
            table.add_column(col)
        for p in problems:
            table.add_row(p["array"], f"{p['rows'][0]}-{p['rows'][1]}", p["reason"])
        out.print(table)
    else:
        out.print(f"[green]intact[/]: {c.path} ({c.shards} shards, status {c.status})")
    if problems:
        raise typer.Exit(code=1)


@app.command()
@guarded
def distill(
    cache: str = typer.Option(..., "--cache", help=_DIS["cache"]),
    method: str = typer.Option("a2t", "--method", help=_DIS["method"]),
    labels: str = typer.Option("gt", "--labels", help=_DIS["labels"]),
    adapter: str = typer.Option("lora", "--adapter", help=_DIS["adapter"]),
    lora_r: int = typer.Option(8, "--lora-r", help=_DIS["lora_r"]),
    lora_alpha: int = typer.Option(8, "--lora-alpha", help=_DIS["lora_alpha"]),
    target_modules: str = typer.Option("q,k,o", "--target-modules", help=_DIS["target_modules"]),
    num_virtual_tokens: int = typer.Option(8, "--num-virtual-tokens", help=_DIS["num_virtual_tokens"]),
    lr: float = typer.Option(1e-4, "--lr", help=_DIS["lr"]),
    lr2: float | None = typer.Option(None, "--lr2", help=_DIS["lr2"]),
    max_steps: int = typer.Option(1000, "--max-steps", help=_DIS["max_steps"]),
    epochs: int | None = typer.Option(None, "--epochs", help=_DIS["epochs"]),
    eval_every: int = typer.Option(10, "--eval-every", help=_DIS["eval_every"]),
    batch_size: int = typer.Option(4, "--batch-size", help=_DIS["batch_size"]),
    grad_accum: int = typer.Option(1, "--grad-accum", help=_DIS["grad_accum"]),
    patience: int = typer.Option(5, "--patience", help=_DIS["patience"]),
    min_delta: float = typer.Option(0.01, "--min-delta", help=_DIS["min_delta"]),
    seed: int = typer.Option(0, "--seed", help=_DIS["seed"]),
    layers: str | None = typer.Option(None, "--layers", help=_DIS["layers"]),
    normalize: bool = typer.Option(False, "--normalize", help=_DIS["normalize"]),
    tna_weight: float = typer.Option(0.5, "--tna-weight", help=_DIS["tna_weight"]),
    model: str | None = typer.Option(None, "--model", help=_DIS["model"]),
    allow_model_mismatch: bool = typer.Option(
        False, "--allow-model-mismatch", help=_DIS["allow_model_mismatch"]
    ),
    skip_damaged: bool = typer.Option(False, "--skip-damaged", help=_DIS["skip_damaged"]),
    first_phase_from: str | None = typer.Option(None, "--first-phase-from", help=_DIS["first_phase_from"]),
    out_dir: str | None = typer.Option(None, "--out", help=_DIS["out"]),
    overwrite: bool = typer.Option(False, "--overwrite", help=_DIS["overwrite"]),
    store: str | None = typer.Option(None, "--store", help=_DIS["store"]),
    device: str | None = typer.Option(None, "--device", help=_DIS["device"]),
    json_out: bool = JSON_OPT,
) -> None:
    """Train a PEFT adapter on the no-demo student from a cache (the teacher is never run).

    Resumes from <out>/checkpoint after an interruption; a finished run with the same
    configuration is reused.

    [bold]Examples[/]

      ia2cache distill --cache 3f2a9c0d1b2e4f56 --method a2t --lr 1e-3 --lr2 3e-4 --max-steps 2000
      ia2cache distill --cache 3f2a9c0d1b2e4f56 --method tok --labels gt --seed 1 --json
      ia2cache distill --cache 3f2a9c0d1b2e4f56 --method act --layers 0-9 --normalize --adapter ia3
      ia2cache distill --cache 3f2a9c0d1b2e4f56 --store s3://bucket/ia2 --method a2t
      torchrun --nproc-per-node=2 -m cli -- distill --cache 3f2a9c0d1b2e4f56 --batch-size 8
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ia2cache.distill import distill as run_distill

    config = DistillConfig(
        cache=cache, store=store, method=method, labels=labels, adapter=adapter, lora_r=lora_r,
        lora_alpha=lora_alpha, target_modules=target_modules, num_virtual_tokens=num_virtual_tokens,
        lr=lr, lr2=lr2, max_steps=max_steps, epochs=epochs, eval_every=eval_every, batch_size=batch_size,
        grad_accum=grad_accum, patience=patience, min_delta=min_delta, seed=seed, layers=layers,
        normalize=normalize, tna_weight=tna_weight, model=model, allow_model_mismatch=allow_model_mismatch,
        skip_damaged=skip_damaged, first_phase_from=first_phase_from, out=out_dir, overwrite=overwrite,
        device=device,
    )
    bar = Progress(TextColumn("[bold]{task.fields[phase]}"), BarColumn(),
                   TextColumn("step {task.completed}/{task.total} (cap) epoch {task.fields[epoch]}"),
                   TextColumn("loss {task.fields[loss]} dev {task.fields[dev]}"), TimeElapsedColumn(),
                   console=err, disable=not _main_rank())
    with bar:
        job = bar.add_task("distill", total=None, phase="-", epoch=0, loss="-", dev="-")

        def progress(ev: dict[str, Any]) -> None:
            if ev.get("evaluation"):
                dev = ev["dev_loss"]
                bar.update(job, dev=f"{dev:.4g}" if dev is not None else "-")
            else:
                bar.update(job, completed=ev["step"], total=ev["steps"], epoch=ev["epoch"],
                           phase=f"{ev['phase'] + 1}:{ev['objective']}", loss=f"{ev['loss']:.4g}")

        result = run_distill(config, progress=progress)
    if not _main_rank():
        return
    info = result.to_dict()
    if json_out:
        emit_json(info)
        return
    out.print(f"[bold]adapter[/]: {result.adapter}" + (" (reused)" if result.reused else ""))
    capped = ["capped" if c else "early stop" for c in result.capped]
    out.print(f"method {result.method} · lr {result.lrs} · best step per phase {result.best_step} of "
              f"{result.steps_run} run ({', '.join(capped)}) · final {result.final} · {result.seconds:.1f} s")


@app.command()
@guarded
def sweep(
    task: str = typer.Option(..., "--task", help=_SW["task"]),
    n: str = typer.Option("4,8,16", "--n", help="Training set sizes N, e.g. 4,8,16."),
    seeds: str = typer.Option("0-4", "--seeds", help="Data seeds, e.g. 0-4 or 0,3."),
    methods: str = typer.Option(",".join(_SWEEP_DEFAULTS.methods), "--methods", help=_SW["methods"]),
    lrs: str = typer.Option(",".join(f"{x:g}" for x in _SWEEP_DEFAULTS.lrs), "--lrs", help=_SW["lrs"]),
    lr_search: str = typer.Option(_SWEEP_DEFAULTS.lr_search, "--lr-search", help=_SW["lr_search"]),
    max_steps: int = typer.Option(_SWEEP_DEFAULTS.max_steps, "--max-steps", help=_SW["max_steps"]),
    eval_every: int = typer.Option(_SWEEP_DEFAULTS.eval_every, "--eval-every", help=_SW["eval_every"]),
    patience: int = typer.Option(_SWEEP_DEFAULTS.patience, "--patience", help=_SW["patience"]),
    min_delta: float = typer.Option(_SWEEP_DEFAULTS.min_delta, "--min-delta", help=_SW["min_delta"]),
    n_eval: int = typer.Option(_SWEEP_DEFAULTS.n_eval, "--n-eval", help=_SW["n_eval"]),
    dev: str = typer.Option(_SWEEP_DEFAULTS.dev, "--dev", help=_SW["dev"]),
    icl_k: int | None = typer.Option(None, "--icl-k", help=_SW["icl_k"]),
    icl_demos: str = typer.Option("train", "--icl-demos", help=_SW["icl_demos"]),
    labels: str = typer.Option("gt", "--labels", help=_SW["labels"]),
    adapter: str = typer.Option("lora", "--adapter", help=_SW["adapter"]),
    model: str = typer.Option("default", "--model", help=_SW["model"]),
    eval_task: str | None = typer.Option(None, "--eval-task", help=_SW["eval_task"]),
    workers: int = typer.Option(1, "--workers", help=_SW["workers"]),
    threads: int | None = typer.Option(None, "--threads", help=_SW["threads"]),
    shard: str | None = typer.Option(None, "--shard", help=_SW["shard"]),
    out_dir: str = typer.Option("sweep_out", "--out", help=_SW["out"]),
    runs: str | None = typer.Option(None, "--runs", help=_SW["runs"]),
    unlabelled: str = typer.Option("0", "--unlabelled", help=_SW["unlabelled"] + " E.g. 0,64,256,1024."),
    unlabelled_file: str | None = typer.Option(None, "--unlabelled-file", help=_SW["unlabelled_file"]),
    store: str | None = typer.Option(None, "--store", help=_COL["store"]),
    json_out: bool = JSON_OPT,
) -> None:
    """Run methods x N x seeds from caches collected once; appends to <out>/results*.jsonl.

    A rerun skips finished cells and retries failed ones; a rerun with other settings into the
    same --out is refused (exit 2, naming the setting). Learning rates and stopping steps are
    chosen on the dev rows only; the rows record steps run, best step, whether the step cap
    bound (capped) and whether the chosen lr sits at an edge of the grid.

    [bold]Examples[/]

      ia2cache sweep --task antonyms --n 4,8,16 --seeds 0-4 --workers 2
      ia2cache sweep --task capitals --n 8 --seeds 0-4 --methods tok,a2t --lrs 1e-3 --out runs/capitals --json
      ia2cache sweep --task antonyms --dev half --out runs/dev-half       # D = N//2 dev rows
      ia2cache sweep --task hf:sst2 --eval-task hf:fins --n 8 --methods tok,a2t --out runs/ood
      # a Slurm array of 4 jobs over one shared --out (report reads every shard's file):
      ia2cache sweep --task antonyms --shard $SLURM_ARRAY_TASK_ID/4 --out /shared/sweep
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ia2cache.sweep import SweepConfig, parse_floats, parse_ints
    from ia2cache.sweep import sweep as run_sweep

    config = SweepConfig(
        task=task, out=out_dir, ns=parse_ints(n, "--n", lo=2, hi=1_000_000),
        seeds=parse_ints(seeds, "--seeds"), methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        lrs=parse_floats(lrs, "--lrs"), lr_search=lr_search, max_steps=max_steps, eval_every=eval_every,
        patience=patience,
        min_delta=min_delta, n_eval=n_eval, dev=dev, icl_k=icl_k, icl_demos=icl_demos, model=model,
        store=store, labels=labels, adapter=adapter, eval_task=eval_task, workers=workers, threads=threads,
        shard=shard, runs=runs, unlabelled=parse_ints(unlabelled, "--unlabelled", hi=1_000_000),
        unlabelled_file=unlabelled_file,
    )
    bar = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   TextColumn("{task.fields[cell]}"), console=err)
    with bar:
        job = bar.add_task("sweep", total=None, cell="")

        start = {"done": 0}

        def progress(ev: dict[str, Any]) -> None:
            if ev["status"] == "start":
                start["done"] = ev["done"]
                bar.reset(job, total=ev["total"], completed=ev["done"], cell="")  # ETA from this run's cells
                return
            mark = "" if ev["status"] == "ok" else " [red]failed[/]"
            bar.update(job, completed=ev["done"], cell=f"{ev['cell']}{mark}")
            if not err.is_terminal:  # a log file: one plain line a cell, with its own ETA
                ran = ev["done"] - start["done"]
                eta = ev["elapsed"] / ran * (ev["total"] - ev["done"]) if ran else 0.0
                err.print(f"cell {ev['done']}/{ev['total']} {ev['cell']} {ev['status']} · "
                          f"{ev['elapsed'] / 60:.1f} min · ETA {eta / 60:.1f} min",
                          highlight=False, markup=False)

        result = run_sweep(config, progress=progress)
    if json_out:
        emit_json(result)
        return
    failed = result["cells_failed"]
    failed = f", {failed} failed (see results; a rerun retries them)" if failed else ""
    out.print(f"{result['cells_done']} cells run, {result['cells_skipped']} skipped (already done){failed}, "
              f"of {result['cells_total']} · results in {result['results']}")


@app.command()
@guarded
def report(
    folder: str = typer.Argument(..., help="A sweep directory (holding results.jsonl)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Write report.md (paper-shaped tables, mean ± std over seeds) and PNG plots.

    [bold]Examples[/]

      ia2cache report sweep_out
      ia2cache report runs/capitals --json | jq .plots
    """
    from ia2cache.report import report as run_report

    result = run_report(folder)
    if json_out:
        emit_json({k: v for k, v in result.items() if k != "markdown"})
        return
    out.print(result["markdown"])
    err.print(f"wrote {result['report']} and {len(result['plots'])} plots")


analyze_app = typer.Typer(
    help="How ICL-like is an adapter: activation similarity to the cached teacher, LoRA subspace overlap.",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("similarity")
@guarded
def analyze_similarity(
    cache: str = typer.Option(..., "--cache", help="An eval cache (collect --split eval): key or directory."),
    adapter: list[str] = typer.Option([], "--adapter", help="Adapter directory; repeat for several."),
    base: bool = typer.Option(True, "--base/--no-base", help="Also measure the base model (the reference)."),
    model: str | None = typer.Option(None, "--model", help="Base model; default the cache's."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per student forward pass."),
    store: str | None = typer.Option(None, "--store", help=_COL["store"]),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda; default cuda when available."),
    out_dir: str = typer.Option("analysis", "--out", help="Directory for <name>.json and <name>.png."),
    name: str | None = typer.Option(None, "--name", help="File stem; default similarity-TASK-nN-sSEED."),
    json_out: bool = JSON_OPT,
) -> None:
    """Compare each model's activations with the cached ICL teacher (cosine, normalised MSE).

    The no-demo student (the base model, and the base model plus each adapter) reads every cached
    row teacher-forced; per layer and per response position it reports the cosine similarity,
    the MSE divided by the teacher's variance (nmse) and by its mean squared norm (rel_mse).
    Writes <out>/<name>.json and a PNG (similarity vs layer, one line per method).

    [bold]Examples[/]

      ia2cache collect --task antonyms --n 8 --split eval --n-eval 100 --json | jq -r .key
      ia2cache analyze similarity --cache KEY --adapter sweep/adapters/antonyms/n8-s0/act-lr0.001 \\
          --adapter sweep/adapters/antonyms/n8-s0/tok-lr0.001 --out sweep/analysis
    """
    from ia2cache._io import check_writable_dir
    from ia2cache.analyze import SimilarityConfig, check_name, default_name, fmt3, similarity, write

    check_writable_dir(out_dir, "--out")  # before minutes of forward passes, not after
    if name is not None:
        check_name(name)
    config = SimilarityConfig(cache=cache, adapters=tuple(adapter), base=base, model=model,
                              batch_size=batch_size, store=store, device=device)
    result = similarity(config, progress=lambda label: err.print(f"[bold]measuring[/] {label}"))
    files = write(result, out_dir, name or default_name(result), "similarity")
    if json_out:
        emit_json({**result, "files": files})
        return
    table = Table(title=f"{result['task']} · {result['site']} · {result['rows']} {result['split']} rows "
                        f"· k={result['k']} (cosine ↑, nMSE ↓ vs the ICL teacher)")
    layers = result["layers"]
    picks = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    for col in ("model", "mean cosine", "mean nMSE", *(f"cos L{i}" for i in picks)):
        table.add_column(col, justify="right")
    for e in result["methods"]:
        table.add_row(e["label"], fmt3(e["mean_cosine"]), fmt3(e["mean_nmse"]),
                      *(fmt3(e["cosine"][layers.index(i)]) for i in picks))
    out.print(table)
    err.print(f"wrote {files['json']} and {files['png']}")


@analyze_app.command("overlap")
@guarded
def analyze_overlap(
    adapter: list[str] = typer.Option(..., "--adapter", help="LoRA adapter directory; repeat for several."),
    out_dir: str = typer.Option("analysis", "--out", help="Directory for <name>.json and <name>.png."),
    name: str = typer.Option("overlap", "--name", help="File stem."),
    json_out: bool = JSON_OPT,
) -> None:
    """Pairwise overlap of LoRA adapters' update subspaces (1 same, 0 orthogonal).

    Per layer and module, ||U1ᵀU2||²_F / r for the top-r left singular vectors U of B·A, then
    averaged; writes <out>/<name>.json and a heatmap PNG. a2t starts from act, so that pair is
    high by construction.

    [bold]Examples[/]

      ia2cache analyze overlap --adapter runs/act-lr0.001 --adapter runs/a2t-lr0.001 --adapter runs/tok
      ia2cache analyze overlap --adapter A --adapter B --out sweep/analysis --json | jq .matrix
    """
    from ia2cache._io import check_writable_dir
    from ia2cache.analyze import check_name, overlap, write

    check_writable_dir(out_dir, "--out")
    check_name(name)
    result = overlap(adapter)
    files = write(result, out_dir, name, "overlap")
    if json_out:
        emit_json({**result, "files": files})
        return
    table = Table(title="LoRA subspace overlap (1 same, 0 orthogonal)")
    table.add_column("")
    for lab in result["labels"]:
        table.add_column(lab, justify="right")
    for lab, row in zip(result["labels"], result["matrix"], strict=True):
        table.add_row(lab, *("-" if x is None else f"{x:.3f}" for x in row))
    out.print(table)
    chance = [p["chance"] for p in result["pairs"]]
    if chance:
        err.print(f"chance level (random subspaces) ≈ {sum(chance) / len(chance):.3f}")
    err.print(f"wrote {files['json']} and {files['png']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
