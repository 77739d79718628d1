"""Task sources: built-in tasks shipped with the package, and user JSONL files.

Each source is registered in ``TASK_SOURCES`` as (matcher, loader); ``load_task`` asks them in
order. A later source (Hugging Face datasets) registers the same way.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia2cache.errors import IA2Error

BUILTIN_DIR = Path(__file__).parent / "builtin"
DEFAULT_TEMPLATE = "Input: {input}\nOutput:"
DEFAULT_SEPARATOR = "\n\n"
DEFAULT_STOP = "\n"
DEFAULT_TASK = "sentiment_remap"
"""The task `make demo` and the CLI use when none is named."""


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
    """Format string with ``{input}``; a demo is ``template(input) + " " + target``."""
    separator: str
    """Joins demos, and ends the demo block before the query."""
    stop: str = DEFAULT_STOP
    """Stop string for generation."""
    source: str = "builtin"
    card: dict[str, Any] = field(default_factory=dict)

    def render(self, example: Example) -> str:
        return self.template.format(input=example.input)

    def demo_text(self, example: Example) -> str:
        return self.render(example) + " " + example.target

    @property
    def content_hash(self) -> str:
        """sha256 of the examples, template, separator and stop: the task's part of a cache key."""
        body = {
            "pool": [[e.id, e.input, e.target] for e in self.pool],
            "eval": [[e.id, e.input, e.target] for e in self.eval],
            "template": self.template,
            "separator": self.separator,
            "stop": self.stop,
        }
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


def _check_template(template: str, flag: str = "--template") -> str:
    try:
        rendered = template.format(input="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise IA2Error(
            f"{flag} {template!r}: not a valid format string with {{input}} ({exc})"
        ) from exc
    if rendered == template:
        raise IA2Error(f"{flag} {template!r}: must contain {{input}}")
    return template


def list_builtin() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "card.json").is_file())


def _read_jsonl(path: Path, prefix: str) -> list[Example]:
    """Parse and validate a JSONL task file; every error names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IA2Error(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise IA2Error(f"{path}: cannot read ({exc.strerror})") from exc
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IA2Error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise IA2Error(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("input", "target"):
            if key not in obj:
                raise IA2Error(f"{where}: missing required field {key!r}")
            if not isinstance(obj[key], str):
                raise IA2Error(f"{where}: field {key!r} must be a string")
        if not obj["target"].strip():
            raise IA2Error(f"{where}: field 'target' is empty")
        if not obj["input"].strip():
            raise IA2Error(f"{where}: field 'input' is empty")
        ex_id = obj.get("id", f"{prefix}-{lineno}")
        if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool):
            raise IA2Error(f"{where}: field 'id' must be a string or an integer")
        ex_id = str(ex_id)
        if ex_id in seen:
            raise IA2Error(f"{where}: duplicate id {ex_id!r} (first seen on line {seen[ex_id]})")
        seen[ex_id] = lineno
        examples.append(Example(id=ex_id, input=obj["input"], target=obj["target"].strip()))
    if not examples:
        raise IA2Error(f"{path}: empty task file (no examples)")
    return examples


def load_builtin(
    name: str, template: str | None = None, separator: str | None = None, **_: Any
) -> Task:
    folder = BUILTIN_DIR / name
    card = json.loads((folder / "card.json").read_text())
    return Task(
        name=name,
        pool=tuple(_read_jsonl(folder / "pool.jsonl", name)),
        eval=tuple(_read_jsonl(folder / "eval.jsonl", name)),
        template=_check_template(template) if template else card["template"],
        separator=separator if separator is not None else card["separator"],
        stop=card.get("stop", DEFAULT_STOP),
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
    path = Path(spec).expanduser()
    if not path.is_file():
        raise IA2Error(f"--task {spec}: no such file")
    if not 0.0 < eval_fraction < 1.0:
        raise IA2Error(f"--eval-fraction {eval_fraction}: must be between 0 and 1 (exclusive)")
    examples = _read_jsonl(path, path.stem)
    if len(examples) < 2:
        raise IA2Error(f"{path}: needs at least 2 examples to split into pool and eval")
    order = list(range(len(examples)))
    # Fixed seed, independent of --seed: the eval split never moves between runs.
    random.Random(0).shuffle(order)
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    eval_idx, pool_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    return Task(
        name=path.stem,
        pool=tuple(examples[i] for i in pool_idx),
        eval=tuple(examples[i] for i in eval_idx),
        template=_check_template(template or DEFAULT_TEMPLATE),
        separator=separator if separator is not None else DEFAULT_SEPARATOR,
        source=f"jsonl:{path.resolve()}",
        card={"description": f"user task from {path}", "eval_fraction": eval_fraction},
    )


def load_hf_task(spec: str, **kwargs: Any) -> Task:
    """``hf:NAME[@PATH]``: one of the paper's benchmarks (``ia2cache.tasks.hf``)."""
    from ia2cache.tasks.hf import load_hf

    return load_hf(spec, **kwargs)


TaskLoader = Callable[..., Task]
TASK_SOURCES: list[tuple[Callable[[str], bool], TaskLoader]] = [
    (lambda s: s.startswith("hf:"), load_hf_task),
    (lambda s: s.endswith(".jsonl") or Path(s).expanduser().is_file(), load_jsonl),
    (lambda s: s in list_builtin(), load_builtin),
]


def load_task(
    spec: str,
    template: str | None = None,
    separator: str | None = None,
    eval_fraction: float = 0.5,
) -> Task:
    """Load a task by built-in name or JSONL path.

    Args:
        spec: a built-in name (``ia2cache tasks`` lists them), ``hf:NAME[@PATH]`` for one of the
            paper's benchmarks (``ia2cache.tasks.hf``), or a path to a ``.jsonl`` file.
        template: overrides the prompt template; must contain ``{input}``.
        separator: overrides the demo separator.
        eval_fraction: for JSONL files, the share of examples held out for evaluation.
    """
    for matches, loader in TASK_SOURCES:
        if matches(spec):
            return loader(
                spec, template=template, separator=separator, eval_fraction=eval_fraction
            )
    raise IA2Error(
        f"--task {spec}: unknown task; built-in tasks are {', '.join(list_builtin())}, "
        "the paper's benchmarks are hf:NAME (ia2cache tasks lists them), "
        "or pass a path to a .jsonl file"
    )


__all__ = ["Example", "Task", "load_task", "list_builtin", "is_single_token", "TASK_SOURCES"]
