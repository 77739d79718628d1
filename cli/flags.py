"""How config fields are spelled on the command line where that is not their type: a
:class:`~cli.options.Flag` per field, each default derived from the dataclass's own (so
``tests/test_cli_options.py`` can parse it back to the dataclass default)."""

from __future__ import annotations

from cli.options import Flag
from ia2cache.errors import IA2Error
from ia2cache.evaluate import EvalConfig
from ia2cache.prompts import K_MAX
from ia2cache.sweep import SweepConfig, parse_floats, parse_ints


def _parse_k(k: str) -> int | None:
    if k == "auto":
        return None
    try:
        return int(k)
    except ValueError:
        raise IA2Error(f"--k {k}: expected 'auto' or an integer") from None


def _ints_text(values: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 4) -> '0-4'; (4, 8, 16) -> '4,8,16': a default as parse_ints reads it back."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


COLLECT_FLAGS = {"k": Flag(str, "auto", _parse_k, "auto or an integer.")}
EVAL_FLAGS = {  # None: resolved by cli.main._eval_config (from N, or --adapter's cache)
    "k": Flag(int | None, None, help=f"Default: the teacher's, min(N-1, {K_MAX}); with --adapter, the "
              "adapter's cache's k."),
    "n": Flag(int | None, None, help="With --adapter: its cache's N."),
    "seed": Flag(int | None, None, help=f"Default {EvalConfig.seed}; with --adapter, its cache's."),
}
SWEEP_FLAGS = {
    "out": Flag(str, "sweep_out"),  # the dataclass has no default; README's `report sweep_out` relies on it
    "ns": Flag(str, _ints_text(SweepConfig.ns), lambda v: parse_ints(v, "--n", lo=2, hi=1_000_000),
               "E.g. 4,8,16.", name="--n"),
    "seeds": Flag(str, _ints_text(SweepConfig.seeds), lambda v: parse_ints(v, "--seeds"), "E.g. 0-4 or 0,3."),
    "methods": Flag(str, ",".join(SweepConfig.methods),
                    lambda v: tuple(m.strip() for m in v.split(",") if m.strip()), "Comma-separated."),
    "lrs": Flag(str, ",".join(f"{x:g}" for x in SweepConfig.lrs), lambda v: parse_floats(v, "--lrs"),
                "Comma-separated."),
    "unlabelled": Flag(str, _ints_text(SweepConfig.unlabelled),
                       lambda v: parse_ints(v, "--unlabelled", hi=1_000_000), "E.g. 0,64,256,1024."),
}
