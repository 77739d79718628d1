"""Typer options generated from the library's config dataclasses: one source of truth per flag.

A config field ``max_steps: int = 1000`` with the docstring under it becomes ``--max-steps``
with that type, default and help; a ``Literal[...]`` field becomes a choice. A command is a
function whose own parameters are the few that are not config fields (``--json``, a positional
cache key, ...); :func:`config_command` adds every config field to its signature, builds the
config from them and hands it over. A new config field therefore appears in the CLI, with its
doc and default, without touching this package (``tests/test_cli_options.py`` checks every field
of every config against the commands).

Why not tyro or simple-parsing: both build their own parser, and we want Typer's (rich help with
examples, exit code 2 on bad usage, the same ``--json`` convention in every command); Typer reads
a function's ``__signature__``, so generating that signature is all it takes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from ia2cache._docs import field_docs


@dataclass(frozen=True)
class Flag:
    """How one config field is spelled on the command line when its type is not a plain flag
    type (a tuple written as ``4,8,16``, ``--k auto``)."""

    annotation: Any
    """The CLI's type (what Typer parses)."""
    default: Any
    """The CLI's default, in that type."""
    parse: Callable[[Any], Any]
    """CLI value -> config value (may raise IA2Error naming the flag)."""
    help: str = ""
    """Added to the field's docstring (e.g. the syntax of a list)."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def config_parameters(cls: type, exclude: Iterable[str] = (), flags: dict[str, Flag] | None = None,
                      required: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``cls`` (minus ``exclude``), annotated for Typer."""
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        special = flags.get(f.name)
        annotation = special.annotation if special else hints[f.name]
        if special:
            default = special.default
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = ...  # required
        if f.name in required:
            default = ...
        help_text = (docs.get(f.name, "") + (" " + special.help if special and special.help else "")).strip()
        option = typer.Option(flag_name(f.name), help=help_text.replace("[", "\\["))
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                     default=... if default is ... else default,
                                     annotation=Annotated[annotation, option]))
    return out


def config_command(cls: type, *, exclude: Iterable[str] = (), flags: dict[str, Flag] | None = None,
                   required: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``fn(fields, **own_params)``: the CLI command gets every field of ``cls`` as an
    option (plus ``fn``'s own keyword parameters), and ``fn`` receives the fields' values as a
    dict (parsed by their :class:`Flag`), to build ``cls(**fields)`` with whatever it adds.

    Fields in ``exclude`` are left to ``fn`` (it builds them in, e.g. ``mode`` from ``--icl``).
    """
    exclude = set(exclude)
    flags = flags or {}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve postponed annotations
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in list(inspect.signature(fn).parameters.values())[1:]]  # after ``fields``
        generated = config_parameters(cls, exclude, flags, required)
        names = {p.name for p in generated}

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {k: v for k, v in kwargs.items() if k in names}
            for name, special in flags.items():
                if name in values:
                    values[name] = special.parse(values[name])
            rest = {k: v for k, v in kwargs.items() if k not in names}
            return fn(values, **rest)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*own, *generated]]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {}  # Typer reads the signature, not wrapped annotations
        return command

    return wrap
