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
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from ia2cache._docs import field_docs
from ia2cache.errors import IA2Error
from ia2cache.evaluate import EvalConfig

app = typer.Typer(
    name="ia2cache",
    help="ICL Activation Alignment with the teacher traced once into a zarr cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console(soft_wrap=True)
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
_EVAL = field_docs(EvalConfig)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )
    for noisy in ("transformers", "huggingface_hub", "nnsight", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("ia2cache").setLevel(logging.INFO)


def guarded(fn: F) -> F:
    """Turn library errors into a one-line message on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except IA2Error as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(code=exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


@app.command()
@guarded
def tasks(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """List the built-in tasks with their sizes and templates.

    [bold]Examples[/]

      ia2cache tasks
      ia2cache tasks --json | jq '.tasks[].name'
    """
    from ia2cache.tasks import list_builtin, load_task

    rows = [load_task(name).summary() for name in list_builtin()]
    if json_out:
        emit_json({"tasks": rows})
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


@app.command("eval")
@guarded
def eval_cmd(
    task: str = typer.Option("sentiment_remap", "--task", help="Built-in task name or a .jsonl file."),
    model: str = typer.Option("default", "--model", help="'default', a model directory or a hub id."),
    icl: bool = typer.Option(False, "--icl", help="Evaluate the base model with k demos (ICL)."),
    base: bool = typer.Option(False, "--base", help="Evaluate the base model without demos."),
    k: int = typer.Option(4, "--k", help=_EVAL["k"]),
    n_eval: int = typer.Option(200, "--n-eval", help=_EVAL["n_eval"]),
    seed: int = typer.Option(0, "--seed", help=_EVAL["seed"]),
    batch_size: int = typer.Option(8, "--batch-size", help=_EVAL["batch_size"]),
    template: str | None = typer.Option(None, "--template", help="Prompt template with {input}."),
    separator: str | None = typer.Option(None, "--separator", help="Demo separator."),
    eval_fraction: float = typer.Option(0.5, "--eval-fraction", help="JSONL: share held out for eval."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Accuracy, ECE (equal-mass and equal-width, 15 bins) and NLL on a task's eval split.

    [bold]Examples[/]

      ia2cache eval --task capitals --base
      ia2cache eval --task sentiment_remap --icl --k 8 --n-eval 100 --json
    """
    from ia2cache.evaluate import evaluate
    from ia2cache.models import load_model
    from ia2cache.tasks import load_task

    if icl and base:
        raise IA2Error("--icl and --base: choose one")
    if not (icl or base):
        raise IA2Error("choose --icl or --base (--adapter arrives with distill)")
    config = EvalConfig(mode="icl" if icl else "base", k=k, n_eval=n_eval, seed=seed,
                        batch_size=batch_size)
    t = load_task(task, template=template, separator=separator, eval_fraction=eval_fraction)
    loaded = load_model(model)
    result = evaluate(loaded.model, loaded.tokenizer, t, config)
    result["model"] = loaded.info.to_dict()
    result["pool"] = len(t.pool)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{t.name} · {result['mode']} · {loaded.info.name}")
    for col in ("n_eval", "k", "accuracy", "ECE (equal-mass)", "ECE (equal-width)", "NLL"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result["n_eval"]), str(result["k"]), f"{result['accuracy']:.3f}",
        f"{result['ece_equal_mass']:.3f}", f"{result['ece_equal_width']:.3f}",
        f"{result['nll']:.3f}",
    )
    out.print(table)
    err.print(f"pool {len(t.pool)} examples, eval split {len(t.eval)}; scored {result['n_eval']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
