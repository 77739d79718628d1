"""How each command shows its result without ``--json``: rich tables and lines on stdout (notes
about files written go to stderr). The commands decide what to show; this module only draws it."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from cli.app import err, out


def tasks(rows: list[dict[str, Any]], hf_rows: list[dict[str, Any]]) -> None:
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


def evaluation(result: dict[str, Any], task: Any) -> None:
    """``eval``: one row of metrics for ``task`` (the task scored, possibly OOD)."""
    shown = task.name if result["train_task"] == task.name else f"{result['train_task']} -> {task.name} (OOD)"
    table = Table(title=f"{shown} · {result['mode']} · {result['model']['name']}")
    for col in ("n_eval", "k", "accuracy", "ECE (equal-mass)", "ECE (equal-width)", "NLL", "agree w/ ICL"):
        table.add_column(col, justify="right")
    agree = result["agreement_with_icl"]
    table.add_row(
        str(result["n_eval"]), str(result["k"]), f"{result['accuracy']:.3f}",
        f"{result['ece_equal_mass']:.3f}", f"{result['ece_equal_width']:.3f}",
        f"{result['nll']:.3f}", "-" if agree is None else f"{agree:.3f}",
    )
    out.print(table)
    err.print(f"pool {len(task.pool)} examples, eval split {len(task.eval)}; scored {result['n_eval']}")


def collect(result: Any, info: dict[str, Any]) -> None:
    verb = "reused (no model work)" if result.reused else f"collected {result.rows_computed} rows"
    out.print(f"[bold]{verb}[/]: {result.cache}")
    out.print(
        f"rows {result.rows} · status {result.status} · {result.bytes_on_disk / 1e6:.2f} MB on disk"
        f" · {result.seconds:.1f} s"
        + (f" · {info['rows_per_s']} rows/s · {info['tokens_per_s']} tok/s" if result.rows_computed else "")
    )


def _gb(x: int) -> str:
    return f"{x / 1e9:.3f} GB" if x >= 1e7 else f"{x / 1e6:.2f} MB"


def plan(p: dict[str, Any]) -> None:
    """``collect --plan``: what the cache would cost."""
    out.print(f"[bold]plan[/] (nothing written): {escape(p['cache'])}  [{p['status']}]", highlight=False)
    out.print(f"rows {p['rows']} ({p['rows_to_compute']} to compute) · {p['position_slots']} positions a row "
              f"· {p['positions']} positions × {p['layers']} layers × hidden {p['hidden']} "
              f"· {p['teacher_tokens']} teacher prompt tokens")
    free = "unknown (remote store)" if p["free_bytes"] is None else _gb(p["free_bytes"])
    room = {True: "fits", False: "[red]does not fit[/]", None: "not checked"}[p["fits"]]
    out.print(f"on disk at --dtype {p['dtype']}: up to {_gb(p['bytes_on_disk'])} (activations "
              f"{_gb(p['bytes_activations'])}, uncompressed) · needed now {_gb(p['bytes_needed'])} "
              f"· free {free}: {room}")
    if p["estimated_seconds"] is not None:
        out.print(f"time: ~{p['estimated_seconds']:.0f} s (one micro-batch of {p['probe_rows']} rows took "
                  f"{p['probe_seconds']:.2f} s)")
    elif p["rows_to_compute"]:
        out.print("time: not estimated (add --probe: loads the model and times one micro-batch)")


def ls(root: str, caches: list[dict[str, Any]]) -> None:
    from ia2cache.store import ACT_DTYPES

    table = Table(title=f"caches in {root}")
    for col in ("key", "status", "task", "model", "n", "k", "site", "dtype", "layers", "T", "rows",
                "created"):
        table.add_column(col)

    def dtype(m: dict[str, Any]) -> str:
        d = m.get("dtype")
        return f"{d} (lossy)" if d in ACT_DTYPES and ACT_DTYPES[d].lossy else str(d)

    for m in caches:
        lay = m.get("layers") or []
        status = "format 1" if m.get("format") == 1 else m.get("status", "?")
        table.add_row(
            m.get("key", "?"), status, str(m.get("task")),
            str((m.get("model") or {}).get("name")), str(m.get("n")), str(m.get("k")),
            str(m.get("site")), dtype(m), str(len(lay)), str(m.get("max_new_tokens")),
            str(m.get("rows")), str(m.get("created", ""))[:16],
        )
    out.print(table)
    for m in caches:
        if m.get("status") == "damaged":
            out.print(f"[red]damaged[/] {escape(m['path'])}: {escape('; '.join(m.get('problems', [])))} "
                      "(see `ia2cache verify`)", highlight=False)
        elif m.get("format") == 1:
            out.print(f"[yellow]format 1[/] {escape(m['path'])}: rewrite it with `ia2cache migrate "
                      f"{escape(str(m.get('key')))} --store {escape(root)}`", highlight=False)


def inspect(c: Any, manifest: dict[str, Any], kind: Any) -> None:
    """``inspect``: cache ``c``'s manifest (with what ``inspect`` adds), its arrays, how to read it."""
    from ia2cache.store import INT8_BOUND

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
    if manifest["lossy"]:
        out.print(f"[yellow]lossy[/]: --dtype {manifest['dtype']} ({kind.about if kind else ''}; bound "
                  f"{INT8_BOUND:.6f} of each vector's max |x|); `ia2cache verify` reports the error measured")
    out.print("[bold]reading it without ia2cache:[/] " + manifest.get("how_to_read", ""))


def verify(c: Any, problems: list[dict[str, Any]]) -> None:
    """``verify``: what a lossy --dtype lost, then the problems found (or intact)."""
    from ia2cache.store import INT8_BOUND

    for array, e in c.lossy.items():  # a lossy --dtype: what it lost, measured at collect
        line = (f"lossy {array}: max relative error {e['max_rel_error']:.6f} (bound "
                f"{INT8_BOUND:.6f} of each vector's max |x|), max relative L2 error "
                f"{e['max_rel_l2_error']:.6f}")
        out.print(f"[yellow]{escape(line)}[/]", highlight=False)
    if problems:
        table = Table(title=f"{len(problems)} problem(s) in {c.path}")
        for col in ("array", "rows", "reason"):
            table.add_column(col)
        for p in problems:
            table.add_row(p["array"], f"{p['rows'][0]}-{p['rows'][1]}", p["reason"])
        out.print(table)
    else:
        out.print(f"[green]intact[/]: {c.path} ({c.shards} shards, status {c.status})")


def migrate(result: Any) -> None:
    if not result.migrated:
        out.print(f"already store format {result.to_format}: {escape(result.cache)}", highlight=False)
        return
    left = f"; shards {result.shards_left} left for `ia2cache collect`" if result.shards_left else ""
    out.print(f"[bold]migrated[/] {escape(result.cache)} to store format {result.to_format}: "
              f"{result.shards_migrated} shards, status {result.status}, "
              f"{result.bytes_before / 1e6:.2f} MB -> {result.bytes_after / 1e6:.2f} MB, "
              f"{result.seconds:.1f} s{left}", highlight=False)


def distill(result: Any) -> None:
    out.print(f"[bold]adapter[/]: {result.adapter}" + (" (reused)" if result.reused else ""))
    capped = ["capped" if c else "early stop" for c in result.capped]
    out.print(f"method {result.method} · lr {result.lrs} · best step per phase {result.best_step} of "
              f"{result.steps_run} run ({', '.join(capped)}) · final {result.final} · {result.seconds:.1f} s")


def sweep(result: dict[str, Any]) -> None:
    failed = result["cells_failed"]
    failed = f", {failed} failed (see results; a rerun retries them)" if failed else ""
    out.print(f"{result['cells_done']} cells run, {result['cells_skipped']} skipped (already done){failed}, "
              f"of {result['cells_total']} · results in {result['results']}")


def sweep_status(state: dict[str, Any], most: int = 20) -> None:
    failed = f" ({state['cells_failed']} failed: a run retries them)" if state["cells_failed"] else ""
    out.print(f"{state['label']}: {state['cells_done']} of {state['cells_total']} cells done, "
              f"{state['cells_left']} left{failed} · {state['out']}", highlight=False)
    for c in state["left"][:most]:
        m = f" M={c['unlabelled']}" if c["unlabelled"] else ""
        out.print(f"  left: N={c['n']} seed={c['seed']}{m} {c['method']}{' (failed)' if c['failed'] else ''}",
                  highlight=False)
    if state["cells_left"] > most:
        out.print(f"  … and {state['cells_left'] - most} more (--json lists them all)", highlight=False)


def report(result: dict[str, Any]) -> None:
    out.print(result["markdown"])
    err.print(f"wrote {result['report']} and {len(result['plots'])} plots")


def similarity(result: dict[str, Any], files: dict[str, Any]) -> None:
    from ia2cache.analyze import three_places

    table = Table(title=f"{result['task']} · {result['site']} · {result['rows']} {result['split']} rows "
                        f"· k={result['k']} (cosine ↑, nMSE ↓ vs the ICL teacher)")
    layers = result["layers"]
    picks = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    for col in ("model", "mean cosine", "mean nMSE", *(f"cos L{i}" for i in picks)):
        table.add_column(col, justify="right")
    for e in result["methods"]:
        table.add_row(e["label"], three_places(e["mean_cosine"]), three_places(e["mean_nmse"]),
                      *(three_places(e["cosine"][layers.index(i)]) for i in picks))
    out.print(table)
    err.print(f"wrote {files['json']} and {files['png']}")


def overlap(result: dict[str, Any], files: dict[str, Any]) -> None:
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
