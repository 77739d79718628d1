"""Every config field is an option of its command, generated from the dataclass (cli/options.py):
the same name, a default that parses to the dataclass's, the field's docstring as help; and a
field added to a config becomes an option without touching the CLI."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from dataclasses import dataclass
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from cli.flags import COLLECT_FLAGS, EVAL_FLAGS, SWEEP_FLAGS
from cli.main import app
from cli.options import Flag, config_command, config_docs, flag_name
from ia2cache.collect import CollectConfig
from ia2cache.distill import DistillConfig
from ia2cache.evaluate import EvalConfig
from ia2cache.sweep import SweepConfig

COMMANDS: dict[type, tuple[str, dict[str, Flag]]] = {
    CollectConfig: ("collect", COLLECT_FLAGS),
    DistillConfig: ("distill", {}),
    SweepConfig: ("sweep", SWEEP_FLAGS),
    EvalConfig: ("eval", EVAL_FLAGS),
}
NOT_OPTIONS = {
    (EvalConfig, "mode"): "set by exactly one of --icl, --base and --adapter",
}
OTHER_DEFAULTS = {  # (config, field): (the CLI's default, why it is not the dataclass's)
    (EvalConfig, "k"): (None, "resolved in eval: the teacher's k min(N-1, 8), or --adapter's cache's k"),
    (EvalConfig, "seed"): (None, "resolved in eval: 0, or --adapter's cache's seed"),
    (SweepConfig, "out"): ("sweep_out", "the dataclass has none; README's `ia2cache report sweep_out`"),
}
OWN = {  # each command's parameters that are not config fields
    "collect": {"json_out"},
    "distill": {"json_out"},
    "sweep": {"status", "json_out"},
    "eval": {"task", "eval_task", "model", "icl", "base", "adapter", "template", "separator",
             "eval_fraction", "json_out"},
}
CASES = [(cls, f.name) for cls in COMMANDS for f in dataclasses.fields(cls)]


def _command(name: str) -> Any:
    """The click command Typer builds (Typer vendors click: no isinstance checks against click's)."""
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _options(name: str) -> dict[str, Any]:
    return {flag: p for p in _command(name).params if p.param_type_name == "option" for flag in p.opts}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize(("cls", "field"), CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_every_config_field_is_an_option_with_the_dataclass_default(cls: type, field: str) -> None:
    name, flags = COMMANDS[cls]
    options = _options(name)
    if (cls, field) in NOT_OPTIONS:
        assert flag_name(field) not in options and field not in {p.name for p in _command(name).params}
        return
    flag = flag_name(field, flags.get(field))
    assert flag in options, f"{cls.__name__}.{field}: no {flag} on `{name}`"
    option = options[flag]
    assert option.name == field  # the value reaches the config's field
    f = next(x for x in dataclasses.fields(cls) if x.name == field)
    want = _default(f)
    if (cls, field) in OTHER_DEFAULTS:
        assert option.default == OTHER_DEFAULTS[cls, field][0] and not option.required
        return
    if want is dataclasses.MISSING:
        assert option.required, f"{flag} must be required: {cls.__name__}.{field} has no default"
        return
    assert not option.required
    got = flags[field].parse(option.default) if field in flags else option.default
    assert got == want and type(got) is type(want), (flag, option.default, got, want)
    doc = config_docs(cls).get(field)
    assert doc and doc in (option.help or "").replace("\\[", "["), (flag, option.help)


@pytest.mark.parametrize("name", sorted(OWN))
def test_a_command_has_only_its_config_fields_and_its_own_parameters(name: str) -> None:
    cls = next(c for c, (n, _) in COMMANDS.items() if n == name)
    params = _command(name).params
    fields = {f.name for f in dataclasses.fields(cls)} - {f for c, f in NOT_OPTIONS if c is cls}
    assert {p.name for p in params} - {"help"} == fields | OWN[name]
    flags = [flag for p in params for flag in p.opts]
    assert len(flags) == len(set(flags)), f"`{name}` declares a flag twice: {flags}"


def test_sweep_spells_its_tuples_as_lists_and_ranges() -> None:
    options = _options("sweep")
    assert "--ns" not in options and options["--n"].name == "ns"
    assert (options["--n"].default, options["--seeds"].default) == ("4,8,16", "0-4")
    assert SWEEP_FLAGS["seeds"].parse("0-2,7") == (0, 1, 2, 7)
    assert SWEEP_FLAGS["methods"].parse(" tok, a2t ,") == ("tok", "a2t")


def test_eval_resolves_k_and_seed_left_to_it() -> None:
    from cli.main import _eval_config

    fields = {"k": None, "n": 8, "seed": None, "icl_demos": "train", "n_eval": 200, "batch_size": 8,
              "agreement": False, "max_new_tokens": None}
    config = _eval_config(fields, "icl", None)
    assert (config.mode, config.k, config.n, config.seed) == ("icl", 7, 8, EvalConfig.seed)
    assert _eval_config({**fields, "k": 3, "seed": 5}, "icl", None).k == 3
    assert _eval_config({**fields, "n": None}, "base", None).k == EvalConfig.k


# ----------------------------------------------------------------------------- a new field


@dataclass(frozen=True)
class WithKnob(CollectConfig):
    knob: int = 3
    """A knob added to a config."""


def _echo_app(cls: type, **kw: Any) -> typer.Typer:
    echo = typer.Typer()

    @echo.command()
    @config_command(cls, **kw)
    def show(fields: dict[str, Any], loud: bool = typer.Option(False, "--loud")) -> None:
        cls(**fields)  # the values build the config
        print(json.dumps({"fields": fields, "loud": loud}, default=list))

    return echo


def test_a_field_added_to_a_config_appears_as_an_option_with_its_doc() -> None:
    echo = _echo_app(WithKnob, flags=COLLECT_FLAGS)
    command = typer.main.get_command(echo)
    knob = next(p for p in command.params if p.name == "knob")
    assert knob.opts == ["--knob"] and knob.default == 3
    assert "A knob added to a config." in knob.help
    assert "Training examples (N)" in next(p.help for p in command.params if p.name == "n")  # inherited
    r = CliRunner().invoke(echo, ["--knob", "5", "--k", "2", "--loud"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["loud"] is True and got["fields"]["knob"] == 5 and got["fields"]["k"] == 2
    assert got["fields"]["n"] == CollectConfig.n
    assert CliRunner().invoke(echo, ["--knob", "x"]).exit_code == 2  # typed: an int


def test_a_field_of_a_generated_dataclass_is_in_the_signature() -> None:
    grown = dataclasses.make_dataclass("GrownSweep", [("warmup", float, dataclasses.field(default=0.25))],
                                       bases=(SweepConfig,), frozen=True)

    @config_command(grown, flags=SWEEP_FLAGS)
    def cmd(fields: dict[str, Any], json_out: bool = False) -> dict[str, Any]:
        return fields

    params = inspect.signature(cmd).parameters
    warmup = params["warmup"]
    assert warmup.default == 0.25 and typing.get_args(warmup.annotation)[0] is float
    assert list(params)[-1] == "json_out"  # own parameters after ``fields`` stay last
    grown_app = typer.Typer()
    grown_app.command()(cmd)
    option = next(p for p in typer.main.get_command(grown_app).params if p.name == "warmup")
    assert option.opts == ["--warmup"] and option.default == 0.25
    got = cmd(task="t", out="o", **{n: p.default for n, p in params.items() if n not in ("task", "out")})
    assert got["warmup"] == 0.25 and got["ns"] == SweepConfig.ns and "json_out" not in got


def test_a_flag_for_no_field_or_an_own_parameter_shadowing_one_is_refused() -> None:
    with pytest.raises(TypeError, match="not fields: nss"):
        config_command(SweepConfig, flags={"nss": SWEEP_FLAGS["ns"]})
    with pytest.raises(TypeError, match="seed"):

        @config_command(DistillConfig)
        def cmd(fields: dict[str, Any], seed: int = 0) -> None: ...
