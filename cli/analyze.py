"""``ia2cache analyze``: how ICL-like an adapter is (activation similarity, LoRA subspace overlap)."""

from __future__ import annotations

import typer

from cli import render
from cli.app import JSON_OPT, app, emit_json, err, guarded
from cli.store_commands import STORE_HELP

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
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
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
    from ia2cache.analyze import SimilarityConfig, check_name, default_name, save_result, similarity

    check_writable_dir(out_dir, "--out")  # before minutes of forward passes, not after
    if name is not None:
        check_name(name)
    config = SimilarityConfig(cache=cache, adapters=tuple(adapter), base=base, model=model,
                              batch_size=batch_size, store=store, device=device)
    result = similarity(config, progress=lambda label: err.print(f"[bold]measuring[/] {label}"))
    files = save_result(result, out_dir, name or default_name(result), "similarity")
    if json_out:
        emit_json({**result, "files": files})
        return
    render.similarity(result, files)


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
    from ia2cache.analyze import check_name, overlap, save_result

    check_writable_dir(out_dir, "--out")
    check_name(name)
    result = overlap(adapter)
    files = save_result(result, out_dir, name, "overlap")
    if json_out:
        emit_json({**result, "files": files})
        return
    render.overlap(result, files)
