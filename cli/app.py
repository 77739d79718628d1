"""The one Typer app every command registers on, its consoles, and what the commands share: logging
setup, turning failures into exit codes (:func:`guarded`), ``--json`` output and progress bars.

Stdout holds the result (a rich table, or with ``--json`` one JSON object and nothing else);
progress and logs go to stderr. Exit codes: 0 ok, 1 a check failed (or an internal error), 2 bad
input, 3 cells left (``sweep --status``), 130 Ctrl-C.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ia2cache.errors import IA2Error

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
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object on stdout (progress stays on stderr).")

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""
INCOMPLETE = 3
"""Exit code of ``sweep --status`` when cells are left (0: none; 1 means a failed check or an
internal error, 2 bad input: neither may be read as "not finished")."""


def setup_logging(verbose: bool = False) -> None:
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


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def guarded(fn: F) -> F:
    """Turn every failure into one line on stderr and an exit code, never a traceback: 2 for bad
    input (library errors, unusable paths, remote failures), 130 for Ctrl-C, 1 for anything
    unexpected (a bug: IA2CACHE_DEBUG=1 shows its traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err.print("interrupted; rerun the same command to resume", highlight=False)
            raise typer.Exit(code=INTERRUPTED) from None
        except MemoryError:
            raise fail("out of memory; lower the sizes you asked for (--batch-size, --shard-rows, --n)", 2
                       ) from None
        except OSError as exc:
            if not exc.filename:
                if os.environ.get("IA2CACHE_DEBUG"):
                    raise
                raise fail(f"{exc.strerror or exc}", 2) from None
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
            from ia2cache.store import is_remote_failure, remote_failure_message

            if not is_remote_failure(exc):
                if os.environ.get("IA2CACHE_DEBUG"):
                    raise
                raise fail(f"internal error ({type(exc).__name__}: {exc}); please report it, with "
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


def main_rank() -> bool:
    """False on torchrun ranks other than 0: they print nothing (rank 0 reports for the job)."""
    from ia2cache import distributed

    return distributed.is_main()


# ----------------------------------------------------------------------------- progress bars
# Each yields the ``progress`` callback its library function takes; the bar lives on stderr.


@contextmanager
def collect_progress(label: str = "collect") -> Iterator[Callable[[int, int, int], None]]:
    """Rows done of total and teacher tokens per second."""
    bar = Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=err, transient=False, disable=not main_rank(),
    )
    with bar:
        job = bar.add_task(label, total=None, tps="-")
        t0 = time.perf_counter()

        def progress(done: int, total: int, tokens: int) -> None:
            dt = time.perf_counter() - t0
            bar.update(job, completed=done, total=total, tps=f"{tokens / dt:,.0f}" if dt else "-")

        yield progress


@contextmanager
def distill_progress() -> Iterator[Callable[[dict[str, Any]], None]]:
    """Phase, step of the cap, epoch, training and dev loss."""
    bar = Progress(TextColumn("[bold]{task.fields[phase]}"), BarColumn(),
                   TextColumn("step {task.completed}/{task.total} (cap) epoch {task.fields[epoch]}"),
                   TextColumn("loss {task.fields[loss]} dev {task.fields[dev]}"), TimeElapsedColumn(),
                   console=err, disable=not main_rank())
    with bar:
        job = bar.add_task("distill", total=None, phase="-", epoch=0, loss="-", dev="-")

        def progress(ev: dict[str, Any]) -> None:
            if ev.get("evaluation"):
                dev = ev["dev_loss"]
                bar.update(job, dev=f"{dev:.4g}" if dev is not None else "-")
            else:
                bar.update(job, completed=ev["step"], total=ev["steps"], epoch=ev["epoch"],
                           phase=f"{ev['phase'] + 1}:{ev['objective']}", loss=f"{ev['loss']:.4g}")

        yield progress


@contextmanager
def sweep_progress() -> Iterator[Callable[[dict[str, Any]], None]]:
    """Cells done of total with an ETA; into a log file also one plain line a cell."""
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

        yield progress
