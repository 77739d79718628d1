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

import contextlib
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from ia2cache._docs import field_docs


def as_is(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Flag:
    """How one config field is spelled on the command line when its type is not a plain flag
    type (a tuple written as ``4,8,16``, ``--k auto``)."""

    annotation: Any
    """The CLI's type (what Typer parses)."""
    default: Any
    """The CLI's default, in that type (``...``: required)."""
    parse: Callable[[Any], Any] = as_is
    """CLI value -> config value (may raise IA2Error naming the flag); default: the value as is."""
    help: str = ""
    """Added to the field's docstring (e.g. the syntax of a list)."""
    name: str | None = None
    """The flag when it is not ``--field-name`` (sweep's ``ns`` is written ``--n``)."""


def flag_name(field: str, special: Flag | None = None) -> str:
    """``max_steps`` -> ``--max-steps``, or the :class:`Flag`'s own name."""
    if special is not None and special.name:
        return special.name
    return "--" + field.replace("_", "-")


def config_docs(cls: type) -> dict[str, str]:
    """Field docstrings of ``cls`` and of the dataclasses it extends (a subclass's own win); a class
    without source (``make_dataclass``) adds none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        with contextlib.suppress(OSError, TypeError):  # no source to read the docstrings from
            docs.update(field_docs(klass))
    return docs


def config_parameters(cls: type, exclude: Iterable[str] = (), flags: dict[str, Flag] | None = None,
                      required: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``cls`` (minus ``exclude``), annotated for Typer."""
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    docs = config_docs(cls)
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
        option = typer.Option(flag_name(f.name, special), help=help_text.replace("[", "\\["))
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                     default=... if default is ... else default,
                                     annotation=Annotated[annotation, option]))
    return out


def config_command(cls: type, *, exclude: Iterable[str] = (), flags: dict[str, Flag] | None = None,
                   required: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``fn(fields, **own_params)``: the CLI command gets every field of ``cls`` as an
    option (plus ``fn``'s own keyword parameters), and ``fn`` receives the fields' values as a
    dict (parsed by their :class:`Flag`), to build ``cls(**fields)`` with whatever it adds.

    The generated options take the place of ``fields`` in ``fn``'s signature (and so in
    ``--help``): own parameters before it come first, those after it (``--json``) last; write
    ``fn(own..., *, fields, json_out=...)`` to put some first. Fields in ``exclude`` are left to
    ``fn`` (it builds them in, e.g. ``mode`` from ``--icl``).
    """
    exclude = set(exclude)
    flags = flags or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = (exclude | set(flags) | set(required)) - known
    if unknown:  # a typo would silently leave a field with its plain flag
        raise TypeError(f"config_command({cls.__name__}): not fields: {', '.join(sorted(unknown))}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve postponed annotations
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values()]
        at = [p.name for p in own].index("fields")  # ValueError: fn takes no ``fields``
        generated = config_parameters(cls, exclude, flags, required)
        names = {p.name for p in generated}
        clash = names & {p.name for p in own}
        if clash:
            raise TypeError(f"{fn.__name__}: own parameters that are {cls.__name__} fields: {sorted(clash)}")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {k: v for k, v in kwargs.items() if k in names}
            for name, special in flags.items():
                if name in values:
                    values[name] = special.parse(values[name])
            rest = {k: v for k, v in kwargs.items() if k not in names}
            return fn(fields=values, **rest)

        ordered = [*own[:at], *generated, *own[at + 1:]]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in ordered]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {}  # Typer reads the signature, not wrapped annotations
        return command

    return wrap
