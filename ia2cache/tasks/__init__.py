"""Task sources: built-in tasks shipped with the package, and user JSONL files.

Each source is registered in ``TASK_SOURCES`` as a ``TaskSource`` (label, matcher, loader, hint);
``load_task`` asks all of them, and a spec that more than one source claims (a file named
``antonyms`` next to the built-in ``antonyms``) is refused as ambiguous. A later source (Hugging
Face datasets) registers the same way.

What a task file and a template mean:

- A template is plain text with exactly one literal ``{input}``; ``render`` replaces it with the
  input, and every other character (other braces included) is copied as is. No ``str.format``.
- A JSONL file is split on ``\\n`` only (``\\r\\n`` works, a UTF-8 BOM is skipped), so U+2028,
  U+0085 and the other characters ``str.splitlines`` breaks on stay inside their strings.
- One input has one target: the same input (compared after Unicode NFC and whitespace
  normalisation) with two different targets is refused naming both lines; a row repeated with
  the same target is dropped with a warning (it would otherwise leak from pool into eval).
- A target that contains the stop string or the separator can never be generated (or would
  split a demo in two) and is refused naming its line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ia2cache.errors import IA2Error

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "builtin"
PLACEHOLDER = "{input}"
"""The one placeholder a template holds; it is replaced literally."""
DEFAULT_TEMPLATE = "Input: {input}\nOutput:"
DEFAULT_SEPARATOR = "\n\n"
DEFAULT_STOP = "\n"
DEFAULT_TASK = "sentiment_remap"
"""The task `make demo` and the CLI use when none is named."""
BUILTIN_PREFIX = "builtin:"
"""``--task builtin:NAME`` always means the built-in task, whatever files lie around."""
HF_PREFIX = "hf:"
JSONL_FIELDS = ("id", "input", "target")
_JSON_BLANK = " \t\r"
"""Whitespace JSON itself allows around a value; a line of only these is blank."""
_SPACES = re.compile(r"[ \t\r\n\f\v]+")
_MAX_LISTED = 5


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    target: str


@dataclass(frozen=True)
class Task:
    """A task: a pool to draw training rows and demos from, and a disjoint eval split."""

    name: str
    pool: tuple[Example, ...]
    eval: tuple[Example, ...]
    template: str
    """Plain text with exactly one ``{input}``; a demo is ``render(input) + " " + target``."""
    separator: str
    """Joins demos, and ends the demo block before the query."""
    stop: str = DEFAULT_STOP
    """Stop string for generation."""
    source: str = "builtin"
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_template(self.template, flag=f"task {self.name!r}: template", warn=False)

    def render(self, example: Example) -> str:
        return render_template(self.template, example.input)

    def demo_text(self, example: Example) -> str:
        return self.render(example) + " " + example.target

    @property
    def content_hash(self) -> str:
        """sha256 of the examples, template, separator and stop: the task's part of a cache key."""
        body: dict[str, Any] = {
            "pool": [[e.id, e.input, e.target] for e in self.pool],
            "eval": [[e.id, e.input, e.target] for e in self.eval],
            "template": self.template,
            "separator": self.separator,
            "stop": self.stop,
        }
        if _stray_braces(self.template):
            # Such a template rendered differently under the old str.format rendering
            # ("{{" became "{"): give it a key of its own so no old cache is reused for it.
            body["render"] = "literal"
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def summary(self, tokenizer: Any | None = None) -> dict[str, Any]:
        single = self.card.get("single_token")
        if tokenizer is not None:
            single = is_single_token(self, tokenizer)
        return {
            "name": self.name,
            "source": self.source,
            "train": len(self.pool),
            "eval": len(self.eval),
            "single_token": single,
            "template": self.template,
            "separator": self.separator,
            "labels": self.card.get("labels"),
            "description": self.card.get("description", ""),
        }


def is_single_token(task: Task, tokenizer: Any) -> bool:
    """True when every target, after its leading space, is exactly one token."""
    for ex in task.pool + task.eval:
        if len(tokenizer(" " + ex.target, add_special_tokens=False).input_ids) != 1:
            return False
    return True


# -- templates and separators --------------------------------------------------------------------


def render_template(template: str, text: str) -> str:
    """``template`` with its one ``{input}`` replaced by ``text``, literally (no ``str.format``)."""
    before, found, after = template.partition(PLACEHOLDER)
    if not found:
        raise ValueError(f"template {template!r} has no {PLACEHOLDER}")
    return before + text + after


def _stray_braces(template: str) -> bool:
    rest = template.replace(PLACEHOLDER, "")
    return "{" in rest or "}" in rest


def _literal_escapes(text: str) -> list[str]:
    return [e for e in ("\\n", "\\t", "\\r") if e in text]


def _check_template(template: Any, flag: str = "--template", warn: bool = True) -> str:
    """A template is plain text with exactly one literal ``{input}``; checked by rendering.

    Refuses (IA2Error naming ``flag``) an empty template, one without ``{input}`` (``{input[0]}``,
    ``{input:>9}`` and ``{{input}}``-less spellings included) and one with it twice. Other braces
    are plain text; with ``warn``, stray braces and literal backslash escapes are warned about.
    """
    if not isinstance(template, str):
        raise IA2Error(f"{flag} {template!r}: must be a string")
    if not template.strip():
        raise IA2Error(f"{flag} {_q(template)}: empty; a template is text with one {PLACEHOLDER}, "
                       f"e.g. {DEFAULT_TEMPLATE!r}")
    count = template.count(PLACEHOLDER)
    if count != 1:
        what = (f"does not contain the literal placeholder {PLACEHOLDER}" if count == 0
                else f"contains the placeholder {PLACEHOLDER} {count} times")
        raise IA2Error(
            f"{flag} {_q(template)}: {what}; a template holds it exactly once, and it is replaced "
            "as plain text (no format specs, indexing or attributes)"
        )
    probe = "\x00ia2cache-probe\x00"
    rendered = render_template(template, probe)
    before, _, after = template.partition(PLACEHOLDER)
    if rendered.count(probe) != 1 or rendered != before + probe + after:  # pragma: no cover
        raise IA2Error(f"{flag} {_q(template)}: rendering does not put the input in the prompt")
    if warn:
        if _stray_braces(template):
            log.warning("%s %r: only %s is substituted; its other braces are kept as plain text",
                        flag, template, PLACEHOLDER)
        escapes = _literal_escapes(template)
        if escapes:
            log.warning("%s %r holds a literal backslash sequence (%s), not a newline or tab; "
                        "in bash pass $'...' for a real one", flag, template, ", ".join(escapes))
    return template


def _check_separator(separator: Any, flag: str = "--separator", warn: bool = True) -> str:
    if not isinstance(separator, str):
        raise IA2Error(f"{flag} {separator!r}: must be a string")
    if not separator:
        raise IA2Error(f"{flag} '': empty; the separator ends each demo and the demo block, "
                       f"e.g. {DEFAULT_SEPARATOR!r}")
    if warn:
        escapes = _literal_escapes(separator)
        if escapes:
            log.warning("%s %r holds a literal backslash sequence (%s), not a newline or tab; "
                        "in bash pass $'...' for a real one", flag, separator, ", ".join(escapes))
    return separator


# -- reading and checking examples ---------------------------------------------------------------


class Located(NamedTuple):
    """An example and where it came from (``file:line``, or a row id for hub data)."""

    where: str
    example: Example


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _unpaired_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IA2Error(f"{path}: cannot read ({exc.strerror})") from exc
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise IA2Error(f"{path}: UTF-16 text; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise IA2Error(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return text


def _read_jsonl(path: Path, prefix: str, labelled: bool = True) -> list[Located]:
    """Parse and validate a JSONL task file; every error names the file and line.

    Lines are split on ``\\n`` only (a trailing ``\\r`` is dropped, a BOM at a line's start is
    skipped): U+2028, U+0085, form feeds and the like are characters of their strings.
    """
    text = _decode(path)
    rows: list[Located] = []
    seen: dict[str, int] = {}
    extra: dict[str, int] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.startswith("\ufeff"):
            line = line[1:]
        if not line.strip(_JSON_BLANK):
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            raise IA2Error(f"{where}: field {exc.args[0]!r} appears twice in one object") from None
        except json.JSONDecodeError as exc:
            raise IA2Error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError:
            raise IA2Error(f"{where}: invalid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise IA2Error(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if not labelled and "target" in obj:
            raise IA2Error(f"{where}: has a 'target' field, but an unlabelled file holds inputs only "
                           "(drop the targets, or use the file as a task with --task)")
        for key in ("input", "target") if labelled else ("input",):
            if key not in obj:
                raise IA2Error(f"{where}: missing required field {key!r}")
            if not isinstance(obj[key], str):
                raise IA2Error(f"{where}: field {key!r} must be a string")
            if _unpaired_surrogate(obj[key]):
                raise IA2Error(f"{where}: field {key!r} holds an unpaired UTF-16 surrogate "
                               "(a \\ud800-\\udfff escape without its pair), which is not text")
        if labelled and not obj["target"].strip():
            raise IA2Error(f"{where}: field 'target' is empty")
        if not obj["input"].strip():
            raise IA2Error(f"{where}: field 'input' is empty")
        for key in obj:
            if key not in JSONL_FIELDS:
                extra.setdefault(key, lineno)
        ex_id = obj.get("id", f"{prefix}-{lineno}")
        if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool):
            raise IA2Error(f"{where}: field 'id' must be a string or an integer")
        ex_id = str(ex_id)
        if ex_id in seen:
            raise IA2Error(f"{where}: duplicate id {ex_id!r} (first seen on line {seen[ex_id]})")
        seen[ex_id] = lineno
        target = obj["target"].strip() if labelled else ""
        rows.append(Located(where, Example(id=ex_id, input=obj["input"], target=target)))
    if not rows:
        raise IA2Error(f"{path}: empty task file (no examples)")
    if extra:
        log.warning("%s: field(s) %s ignored (first on line %d); a row is read from %s only",
                    path, ", ".join(map(repr, extra)), min(extra.values()), ", ".join(JSONL_FIELDS))
    return rows


def _same_text(text: str) -> str:
    """The form two inputs (or targets) are compared in: NFC, runs of spaces as one, stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _q(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut in the middle when long: messages stay one readable line."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit // 2] + "..." + r[-limit // 2 :]


def _listed(wheres: Sequence[str]) -> str:
    """Up to five locations; ``file:3, 5`` rather than the file again for each line."""
    parts: list[str] = []
    last_file = None
    for where in wheres[:_MAX_LISTED]:
        file, _, line = where.rpartition(":")
        if line.isdigit() and file == last_file:
            parts.append(line)
        else:
            parts.append(where)
            last_file = file if line.isdigit() else None
    more = len(wheres) - _MAX_LISTED
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def check_examples(
    rows: Sequence[Located],
    *,
    stop: str,
    separator: str,
    separator_flag: str | None = None,
    lenient: bool = False,
    label: str = "",
) -> list[Example]:
    """Refuse what a task file cannot mean, and return the examples to use (``rows`` in order,
    less repeats).

    Refused (IA2Error naming the line, and the flag when one is at fault):

    - a target that contains the stop string: generation stops there and never produces it;
    - a target that contains the separator: the demo block would split inside a demo;
    - the same input with two different targets: one query, two contradicting answers.

    The same input with the same target again is dropped, with a warning naming both lines.

    Args:
        rows: the examples with where each came from, in file order.
        stop: the stop string of generation.
        separator: the demo separator.
        separator_flag: ``"--separator"`` when the user chose the separator; a clash with it is
            then that flag's fault and always refused.
        lenient: data the user cannot edit (a hub dataset read as the reference code reads it):
            warn about the problems above and keep every row, instead of refusing or dropping.
        label: names the source in lenient warnings.
    """
    return [rows[i].example for i in _checked(rows, stop=stop, separator=separator,
                                               separator_flag=separator_flag, lenient=lenient,
                                               label=label)]


def _checked(rows: Sequence[Located], *, stop: str, separator: str, separator_flag: str | None,
             lenient: bool, label: str) -> list[int]:
    """``check_examples``; returns the indices of the rows to keep."""
    problems: list[tuple[int, str, str]] = []  # (row index, kind, message)
    repeats: list[tuple[str, str]] = []
    first: dict[str, int] = {}
    keep: list[int] = []
    sep_shown = f"{separator!r} ({separator_flag})" if separator_flag else repr(separator)
    for i, (where, ex) in enumerate(rows):
        if stop and stop in " " + ex.target:
            problems.append((i, "stop", f"{where}: target {_q(ex.target)} contains the stop string "
                                        f"{stop!r}; generation stops there, so it can never "
                                        "produce this target"))
        if separator in ex.target:
            kind = "flag" if separator_flag else "separator"
            problems.append((i, kind, f"{where}: target {_q(ex.target)} contains the demo separator "
                                      f"{sep_shown}, so a demo would be cut in two"
                                      + ("; choose another --separator" if separator_flag else "")))
        key = _same_text(ex.input)
        if key in first:
            j = first[key]
            other = rows[j]
            if _same_text(other.example.target) != _same_text(ex.target):
                problems.append((i, "conflict", (
                    f"{where}: input {_q(ex.input)} is also on {other.where} with another target "
                    f"({_q(ex.target)} here, {_q(other.example.target)} there); one input needs one "
                    "target: fix or remove one of the lines")))
            else:
                repeats.append((where, other.where))
                if not lenient:
                    continue
        else:
            first[key] = i
        keep.append(i)

    if lenient:
        for _, kind, msg in problems:
            if kind == "flag":
                raise IA2Error(msg)
        by_kind: dict[str, list[str]] = {}
        for idx, kind, _ in problems:
            by_kind.setdefault(kind, []).append(rows[idx].where)
        what = {"stop": f"have the stop string {stop!r} in their target (they can never be "
                        "answered right)",
                "separator": f"have the separator {separator!r} in their target",
                "conflict": "repeat an earlier input with a different target"}
        for kind, wheres in by_kind.items():
            log.warning("%s: %d rows %s: %s", label, len(wheres), what[kind], _listed(wheres))
        if repeats:
            log.warning("%s: %d rows repeat an earlier row (same input and target): %s",
                        label, len(repeats), _listed([w for w, _ in repeats]))
        return keep

    if problems:
        _, kind, msg = problems[0]
        same = [rows[i].where for i, k, _ in problems[1:] if k == kind]
        if same:
            msg += f" (the same on {_listed(same)})"
        raise IA2Error(msg)
    if repeats:
        log.warning("dropped %d repeated rows (same input and target as an earlier row): %s",
                    len(repeats), _listed([f"{w} repeats {o}" for w, o in repeats]))
    return keep


# -- sources -------------------------------------------------------------------------------------


def load_unlabelled(path: str | Path) -> tuple[tuple[Example, ...], str]:
    """The queries of an unlabelled JSONL file (``{"input": ...}`` lines, no target) and the
    sha256 of their ids and inputs (part of a cache key).

    Raises:
        IA2Error: a missing or unreadable file, a bad line, or a line with a ``target`` field,
            naming the file and line.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise IA2Error(f"--unlabelled-file {path}: no such file")
    rows = _read_jsonl(p, f"unl-{p.stem}", labelled=False)
    # Ids of their own ("unlabelled:<id>"): never mistaken for a pool example's.
    examples = tuple(Example(f"unlabelled:{r.example.id}", r.example.input, "") for r in rows)
    body = json.dumps([[e.id, e.input] for e in examples], separators=(",", ":"), ensure_ascii=True)
    return examples, hashlib.sha256(body.encode()).hexdigest()[:16]


def list_builtin() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "card.json").is_file())


def _reserved_names() -> set[str]:
    """Names a task reports that a user file must not take over (built-in and HF tasks)."""
    from ia2cache.tasks.hf import SPECS

    return set(list_builtin()) | set(SPECS)


def load_builtin(
    name: str, template: str | None = None, separator: str | None = None, **_: Any
) -> Task:
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in list_builtin():
        raise IA2Error(f"--task {BUILTIN_PREFIX}{name}: no such built-in task; built-in tasks are "
                       + ", ".join(list_builtin()))
    # The flags first, then the shipped card and data.
    tmpl = _check_template(template) if template is not None else None
    sep = _check_separator(separator) if separator is not None else None
    folder = BUILTIN_DIR / name
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    tmpl = tmpl or _check_template(card["template"], flag=f"{folder / 'card.json'}: template")
    sep = sep or _check_separator(card["separator"], flag=f"{folder / 'card.json'}: separator")
    stop = card.get("stop", DEFAULT_STOP)
    pool_rows = _read_jsonl(folder / "pool.jsonl", name)
    rows = pool_rows + _read_jsonl(folder / "eval.jsonl", name)
    keep = _checked(rows, stop=stop, separator=sep, lenient=False, label=name,
                    separator_flag="--separator" if separator is not None else None)
    return Task(
        name=name,
        pool=tuple(rows[i].example for i in keep if i < len(pool_rows)),
        eval=tuple(rows[i].example for i in keep if i >= len(pool_rows)),
        template=tmpl,
        separator=sep,
        stop=stop,
        source="builtin",
        card=card,
    )


def load_jsonl(
    spec: str,
    template: str | None = None,
    separator: str | None = None,
    eval_fraction: float = 0.5,
    **_: Any,
) -> Task:
    """A user JSONL task. Pool and eval come from a fixed seeded shuffle (seed 0)."""
    if not _is_file(spec):
        raise IA2Error(f"--task {spec!r}: no such file" if "\x00" in spec else f"--task {spec}: no such file")
    path = Path(spec).expanduser()
    if not 0.0 < eval_fraction < 1.0:
        raise IA2Error(f"--eval-fraction {eval_fraction}: must be between 0 and 1 (exclusive)")
    tmpl = _check_template(template if template is not None else DEFAULT_TEMPLATE)
    sep = _check_separator(separator) if separator is not None else DEFAULT_SEPARATOR
    examples = check_examples(_read_jsonl(path, path.stem), stop=DEFAULT_STOP, separator=sep,
                              separator_flag="--separator" if separator is not None else None)
    if len(examples) < 2:
        raise IA2Error(f"{path}: needs at least 2 distinct examples to split into pool and eval")
    order = list(range(len(examples)))
    # Fixed seed, independent of --seed: the eval split never moves between runs.
    random.Random(0).shuffle(order)
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    eval_idx, pool_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    name = path.stem
    if name in _reserved_names():
        name = f"file-{path.stem}"
        log.warning("--task %s: reported as %r, so that it is not mistaken for the task %r "
                    "that ships with ia2cache", spec, name, path.stem)
    return Task(
        name=name,
        pool=tuple(examples[i] for i in pool_idx),
        eval=tuple(examples[i] for i in eval_idx),
        template=tmpl,
        separator=sep,
        source=f"jsonl:{path.resolve()}",
        card={"description": f"user task from {path}", "eval_fraction": eval_fraction},
    )


def load_hf_task(spec: str, **kwargs: Any) -> Task:
    """``hf:NAME[@PATH]``: one of the paper's benchmarks (``ia2cache.tasks.hf``)."""
    from ia2cache.tasks.hf import load_hf

    return load_hf(spec, **kwargs)


TaskLoader = Callable[..., Task]


class TaskSource(NamedTuple):
    """One way to read ``--task SPEC``: what it is, whether it claims a spec, how to load it,
    and how to name it unambiguously when another source claims the same spec."""

    label: Callable[[str], str]
    matches: Callable[[str], bool]
    load: TaskLoader
    hint: Callable[[str], str]


def _is_file(spec: str) -> bool:
    try:
        return bool(spec) and Path(spec).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, ~nosuchuser
        return False


def _file_label(spec: str) -> str:
    try:
        return f"the file {Path(spec).expanduser().resolve()}"
    except (OSError, ValueError, RuntimeError):
        return f"the file {spec}"


def _path_like(spec: str) -> bool:
    """A spec that can only mean a file: it has a slash, starts with ``.`` or ``~``, or ends
    in ``.jsonl`` (and is not an explicit ``hf:``/``builtin:`` name)."""
    if spec.startswith((HF_PREFIX, BUILTIN_PREFIX)):
        return False
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in spec for s in seps) or spec.startswith((".", "~")) or spec.lower().endswith(".jsonl")


def _file_hint(spec: str) -> str:
    return f"pass --task {spec if _path_like(spec) else './' + spec} for the file"


TASK_SOURCES: list[TaskSource] = [
    TaskSource(lambda s: f"the Hugging Face benchmark {s}", lambda s: s.startswith(HF_PREFIX),
               load_hf_task, lambda s: f"move the file {s} away to use the benchmark"),
    TaskSource(_file_label, lambda s: _is_file(s) or _path_like(s), load_jsonl, _file_hint),
    TaskSource(lambda s: f"the built-in task {s.removeprefix(BUILTIN_PREFIX)!r}",
               lambda s: s.startswith(BUILTIN_PREFIX) or s in list_builtin(), load_builtin,
               lambda s: f"pass --task {BUILTIN_PREFIX}{s.removeprefix(BUILTIN_PREFIX)} for the built-in"),
]


def load_task(
    spec: str,
    template: str | None = None,
    separator: str | None = None,
    eval_fraction: float = 0.5,
) -> Task:
    """Load a task by built-in name or JSONL path.

    Args:
        spec: a built-in name (``ia2cache tasks`` lists them; ``builtin:NAME`` always means the
            built-in), ``hf:NAME[@PATH]`` for one of the paper's benchmarks
            (``ia2cache.tasks.hf``), or a path to a ``.jsonl`` file (``./NAME`` for a file whose
            name is also a built-in task's). A spec two sources claim is refused as ambiguous.
        template: overrides the prompt template: plain text with exactly one ``{input}``.
        separator: overrides the demo separator (not empty).
        eval_fraction: for JSONL files, the share of examples held out for evaluation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise IA2Error(f"--task {spec!r}: empty; name a built-in task, hf:NAME or a .jsonl file")
    claimed = [src for src in TASK_SOURCES if src.matches(spec)]
    if len(claimed) > 1:
        raise IA2Error(
            f"--task {spec}: ambiguous, it names both "
            + " and ".join(src.label(spec) for src in claimed)
            + "; " + ", or ".join(src.hint(spec) for src in claimed)
        )
    if claimed:
        return claimed[0].load(spec, template=template, separator=separator, eval_fraction=eval_fraction)
    raise IA2Error(
        f"--task {spec}: unknown task; built-in tasks are {', '.join(list_builtin())}, "
        "the paper's benchmarks are hf:NAME (ia2cache tasks lists them), "
        "or pass a path to a .jsonl file"
    )


__all__ = [
    "Example", "Task", "load_task", "list_builtin", "is_single_token", "TASK_SOURCES", "TaskSource",
    "render_template", "check_examples", "Located",
]
