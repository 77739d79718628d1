"""ia2cache command line.

Each command builds a config, calls the library function a notebook would call, and renders
the result: a rich table on stdout, or with ``--json`` one JSON object on stdout and nothing
else there. Progress and logs go to stderr. Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 cells left
(``sweep --status``).

Every field of ``CollectConfig``, ``DistillConfig``, ``SweepConfig`` and ``EvalConfig`` is an
option of its command, generated from the dataclass (:mod:`cli.options`): its name, default and
help are written once, in the library. A :class:`~cli.options.Flag` (:mod:`cli.flags`) says
how a field is spelled where that is not its type (``--k auto``, ``--n 4,8,16``).

The app, its consoles and error handling live in :mod:`cli.app`, tables in :mod:`cli.render`,
the store commands in :mod:`cli.store_commands` and ``analyze`` in :mod:`cli.analyze`.

Launch: ``ia2cache --help`` (or ``python -m cli --help``).
"""

from __future__ import annotations

from typing import Any

import typer

from cli import render
from cli.app import (
    INCOMPLETE,
    JSON_OPT,
    app,
    collect_progress,
    distill_progress,
    emit_json,
    guarded,
    main_rank,
    sweep_progress,
)
from cli.flags import COLLECT_FLAGS, EVAL_FLAGS, SWEEP_FLAGS
from cli.options import config_command
from ia2cache.collect import CollectConfig
from ia2cache.distill import DistillConfig
from ia2cache.errors import IA2Error
from ia2cache.evaluate import EvalConfig
from ia2cache.prompts import K_MAX
from ia2cache.sweep import SweepConfig

__all__ = ["app", "emit_json", "main"]


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
    render.tasks(rows, hf_rows)


def _eval_config(fields: dict[str, Any], mode: str, adapter: str | None) -> EvalConfig:
    """--k, --n and --seed not given: the adapter's cache's, else the teacher's k and seed 0."""
    n, k, seed = fields["n"], fields["k"], fields["seed"]
    if adapter is not None:  # the teacher of --agreement is the adapter's own: its N, k and seed
        from ia2cache.evaluate import read_run_record

        m = read_run_record(adapter, required=True).get("cache_manifest") or {}
        n = m.get("n") if n is None else n
        k = m.get("k") if k is None else k
        seed = m.get("seed") if seed is None else seed
    seed = EvalConfig.seed if seed is None else seed
    if k is None:
        k = min(n - 1, K_MAX) if n else EvalConfig.k
    return EvalConfig(**{**fields, "mode": mode, "n": n, "k": k, "seed": seed})


def _eval_model(model: str | None, adapter: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, the model's description) for eval: the base model, or it plus --adapter."""
    if adapter is None:
        from ia2cache.models import load_model

        loaded = load_model(model or "default")
        return loaded.model, loaded.tokenizer, loaded.info.to_dict()
    from ia2cache.evaluate import load_adapter
    from ia2cache.models import is_random

    net, tok, record = load_adapter(adapter, model=model)
    trained = (record.get("cache_manifest") or {}).get("model") or {}
    spec = model or record.get("model_spec", "default")
    info = {"name": trained.get("name") or spec, "spec": spec,
            "fingerprint": trained.get("fingerprint"), "adapter": str(adapter)}
    if is_random(spec):  # said plainly: such figures test a pipeline, not a method
        info.update(random=True, name=f"{info['name']} (random weights)")
    return net, tok, info


@app.command("eval")
@guarded
@config_command(EvalConfig, exclude=("mode",), flags=EVAL_FLAGS)
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
    *,
    fields: dict[str, Any],  # the EvalConfig options come here in --help
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
    from ia2cache.evaluate import evaluate, ood_task
    from ia2cache.tasks import load_task

    if sum([icl, base, adapter is not None]) != 1:
        raise IA2Error("choose exactly one of --icl, --base and --adapter DIR")
    config = _eval_config(fields, "icl" if icl else "base" if base else "adapter", adapter)
    t = load_task(task, template=template, separator=separator, eval_fraction=eval_fraction)
    if eval_task is not None:
        t = ood_task(t, load_task(eval_task, template=template, separator=separator,
                                  eval_fraction=eval_fraction))
    net, tok, info = _eval_model(model, adapter)
    result = evaluate(net, tok, t, config)
    result["model"] = info
    result["pool"] = len(t.pool)
    if json_out:
        emit_json(result)
        return
    render.evaluation(result, t)


@app.command()
@guarded
@config_command(CollectConfig, flags=COLLECT_FLAGS)
def collect(fields: dict[str, Any], json_out: bool = JSON_OPT) -> None:
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

    config = CollectConfig(**fields)
    if config.plan:
        plan = run_collect(config).plan or {}
        if main_rank() and json_out:
            emit_json({"plan": plan})
        elif main_rank():
            render.plan(plan)
        return
    with collect_progress() as progress:
        result = run_collect(config, progress=progress)
    if not main_rank():
        return
    info = result.to_dict()
    if json_out:
        emit_json(info)
        return
    render.collect(result, info)


def _site_help() -> str:
    from ia2cache.sites import SITE_TABLE

    return "\n\n".join(f"    {family}: " + "; ".join(f"{k} = {v}" for k, v in sites.items()) + "."
                       for family, sites in SITE_TABLE.items())


# The site table comes from ia2cache.sites, so help and code cannot drift apart.
collect.__doc__ = (collect.__doc__ or "").replace("{sites}", _site_help())


@app.command()
@guarded
@config_command(DistillConfig)
def distill(fields: dict[str, Any], json_out: bool = JSON_OPT) -> None:
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
    from ia2cache.distill import distill as run_distill

    config = DistillConfig(**fields)
    with distill_progress() as progress:
        result = run_distill(config, progress=progress)
    if not main_rank():
        return
    if json_out:
        emit_json(result.to_dict())
        return
    render.distill(result)


@app.command()
@guarded
@config_command(SweepConfig, flags=SWEEP_FLAGS)
def sweep(
    fields: dict[str, Any],
    status: bool = typer.Option(
        False, "--status", help="Run nothing and write nothing: print which cells are done and which "
        "are left (a failed one is left: a run retries it); exit 0 when none is left, 3 when some are."),
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
      # finished? (the same flags as the run; exit 0 when every cell is done)
      ia2cache sweep --task antonyms --n 4,8,16 --seeds 0-4 --status
    """
    from ia2cache.sweep import sweep as run_sweep
    from ia2cache.sweep import sweep_status

    config = SweepConfig(**fields)
    if status:
        state = sweep_status(config)
        if json_out:
            emit_json(state)
        else:
            render.sweep_status(state)
        raise typer.Exit(code=0 if state["complete"] else INCOMPLETE)
    with sweep_progress() as progress:
        result = run_sweep(config, progress=progress)
    if json_out:
        emit_json(result)
        return
    render.sweep(result)


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
    render.report(result)


# The store and analysis commands register themselves on ``app`` (after these, in --help too).
from cli import analyze, store_commands  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
