"""The paper's 12 benchmarks as task sources, read through the Hugging Face ``datasets`` library.

Name a task ``hf:NAME`` (``ia2cache tasks`` lists them). The rows come from, in order:

1. a local path given in the name, ``hf:sst2@/data/sst2`` (a folder of split files, or one
   file that is then the only split);
2. ``$IA2CACHE_HF_DATA/NAME/`` when that folder exists;
3. the hub or the local HF cache, ``datasets.load_dataset(ID, CONFIG, split=...)``
   (set ``HF_HUB_OFFLINE=1`` to use the cache alone without waiting on the network).

A folder holds one file per split, ``<split>.jsonl`` (or ``.json``, ``.parquet``, ``.csv``),
with the hub dataset's own columns: a copy of the hub data is used exactly as the hub data is.

Splits follow the reference code (github.com/aamixsh/ia2, ``prepare_data.py``): the pool is
the first 2,000 usable rows of the training split shuffled with seed 42 and the eval split
the first 500 of the held-out split shuffled the same way; a dataset with one split is
shuffled once and its last 500 usable rows are the eval split (half the rows when there are
fewer than 1,000). Prompt shapes are ``Text: {x}\\nLabel:`` and ``Question: {x}\\nAnswer:``,
with multiple-choice options listed as ``Choices:\\n[word] option`` lines inside ``{x}``.

Labels: the reference code answers with class indices ("0", "1"); on SmolLM2 a digit after a
space is two tokens (" " then "0"), so every label would share its first token. Labels here
are single-token words instead (negative/positive, World/Sports/Business/Technology,
false/true), and the remapped options of SciQr/QASCr use the reference's remap vocabulary in
the order its seeded draw (numpy seed 42) picks them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ia2cache.errors import IA2Error
from ia2cache.tasks import Example, Located, Task, _check_separator, _check_template, check_examples

POOL_MAX = 2000
EVAL_MAX = 500
SEED = 42
"""The reference code's shuffle seed for every dataset."""
DATA_ENV = "IA2CACHE_HF_DATA"
"""A folder with one subfolder of split files per task: ``$IA2CACHE_HF_DATA/sst2/train.jsonl``."""
SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

TEXT_TEMPLATE = "Text: {input}\nLabel:"
QUESTION_TEMPLATE = "Question: {input}\nAnswer:"

SENTIMENT = ("negative", "positive")
NEWS = ("World", "Sports", "Business", "Technology")
"""AG News classes 0..3 (World, Sports, Business, Sci/Tech); BBC News is mapped onto them."""
TRUTH = ("false", "true")
REMAP_WORDS = ("apple", "Friday", "banana", "Saturday", "Thursday", "Sunday", "Wednesday", "Monday")
"""Option words for SciQr (first 4) and QASCr (all 8): the reference's remap vocabulary in
the order ``np.random.seed(42)`` draws it, so SciQr's words are QASCr's first four."""
BBC_TO_AGN = {0: 3, 1: 2, 2: 1, 3: 0, 4: 0}
"""SetFit/bbc-news (0 tech, 1 business, 2 sport, 3 entertainment, 4 politics) onto AG News
classes, as the reference code maps them (entertainment and politics -> World)."""
BBC_CHARS = 256
"""BBC articles are cut to 256 characters, then to the last whole word (reference code)."""

Row = dict[str, Any]
Formatter = Callable[[Row, np.random.RandomState], "tuple[str, str] | None"]


@dataclass(frozen=True)
class HFSpec:
    """One benchmark: where its rows live and how a row becomes (input, target)."""

    name: str
    paper_name: str
    dataset: str
    config: str | None
    pool_split: str
    eval_split: str | None
    """None: the dataset has one usable split; eval is carved from it."""
    columns: tuple[str, ...]
    """Columns the formatter reads; a local file without them is refused."""
    format: Formatter
    template: str
    description: str
    labels: tuple[str, ...] | None = None
    parser: str | None = None
    """Answer parser for multi-token tasks (``ia2cache.answers``)."""
    max_new_tokens: int | None = None
    """Response length T for multi-token tasks."""
    stop: str = "\n"
    separator: str = "\n\n"
    ood: tuple[str, ...] = ()
    """Tasks the paper evaluates this task's adapters on, out of distribution."""
    filter_before_shuffle: bool = False
    """PoemS filters its labels before shuffling, FinS after (as the reference code does)."""
    notes: str = ""

    def card(self, data_from: str) -> dict[str, Any]:
        return {
            "name": f"hf:{self.name}", "paper_name": self.paper_name,
            "description": self.description,
            "source": f"{self.dataset}" + (f" ({self.config})" if self.config else ""),
            "data_from": data_from,
            "labels": list(self.labels) if self.labels else None,
            "template": self.template, "separator": self.separator, "stop": self.stop,
            "single_token": None if self.parser is None else False,
            "parser": self.parser, "max_new_tokens": self.max_new_tokens,
            "ood_eval": [f"hf:{n}" for n in self.ood],
            "splits": {"pool": self.pool_split, "eval": self.eval_split or self.pool_split},
            "notes": self.notes,
        }


# -- formatters: a hub row -> (input, target), or None to drop the row -------------------------


def _label(words: tuple[str, ...], keep: Iterable[int] | None = None,
           remap: dict[int, int] | None = None, text: str = "text") -> Formatter:
    allowed = set(keep) if keep is not None else None

    def fmt(row: Row, rng: np.random.RandomState) -> tuple[str, str] | None:
        lab = row["label"]
        if isinstance(lab, bool):
            lab = int(lab)
        if not isinstance(lab, int) or lab < 0 or (allowed is not None and lab not in allowed):
            return None
        if remap is not None:
            lab = remap[lab]
        idx = sorted(allowed).index(lab) if allowed is not None and remap is None else lab
        return " ".join(str(row[text]).split()), words[idx]

    return fmt


def _bbc(row: Row, rng: np.random.RandomState) -> tuple[str, str] | None:
    lab = row["label"]
    if lab not in BBC_TO_AGN:
        return None
    text = " ".join(str(row["text"]).split())[:BBC_CHARS]
    text = " ".join(text.split(" ")[:-1]) if len(text) == BBC_CHARS else text
    return text, NEWS[BBC_TO_AGN[lab]]


def _choices(question: str, options: list[str], words: tuple[str, ...]) -> str:
    lines = "\n".join(f"[{w}] {' '.join(str(o).split())}" for w, o in zip(words, options, strict=True))
    return f"{' '.join(question.split())}\nChoices:\n{lines}"


def _sciqr(row: Row, rng: np.random.RandomState) -> tuple[str, str] | None:
    options: list[str | None] = [row["distractor1"], row["distractor2"], row["distractor3"], None]
    rng.shuffle(options)  # seeded, in row order: the answer's position is fixed per task
    answer = options.index(None)
    options[answer] = row["correct_answer"]
    return _choices(row["question"], [str(o) for o in options], REMAP_WORDS[:4]), REMAP_WORDS[answer]


def _qascr(row: Row, rng: np.random.RandomState) -> tuple[str, str] | None:
    texts, keys = list(row["choices"]["text"]), list(row["choices"]["label"])
    key = row.get("answerKey")
    if not key or key not in keys or len(texts) != 8:
        return None  # the test split has no answers
    return _choices(row["question"], texts, REMAP_WORDS), REMAP_WORDS[keys.index(key)]


def _strategy(row: Row, rng: np.random.RandomState) -> tuple[str, str] | None:
    ans = row["answer"]
    if isinstance(ans, str):
        ans = {"true": True, "false": False}.get(ans.strip().lower())
    if not isinstance(ans, bool):
        return None
    return " ".join(str(row["question"]).split()), TRUTH[int(ans)]


def _qa(question: str, answer: str) -> Formatter:
    def fmt(row: Row, rng: np.random.RandomState) -> tuple[str, str] | None:
        q, a = str(row[question]).strip(), str(row[answer]).strip()
        return (q, a) if q and a else None

    return fmt


def _sciq_passage(row: Row, rng: np.random.RandomState) -> tuple[str, str] | None:
    support = " ".join(str(row.get("support") or "").split())
    answer = str(row["correct_answer"]).strip()
    target = f"{support}\n#### {answer}" if support else f"#### {answer}"
    return " ".join(str(row["question"]).split()), target


SPECS: dict[str, HFSpec] = {s.name: s for s in [
    HFSpec("sst2", "SST2", "stanfordnlp/sst2", None, "train", "validation", ("sentence", "label"),
           _label(SENTIMENT, text="sentence"), TEXT_TEMPLATE,
           "Movie-review sentence polarity (SST-2).", SENTIMENT, ood=("fins", "poems")),
    HFSpec("fins", "FinS", "takala/financial_phrasebank", "sentences_50agree", "train", None,
           ("sentence", "label"), _label(SENTIMENT, keep=(0, 2), text="sentence"), TEXT_TEMPLATE,
           "Financial news sentence polarity (Financial PhraseBank, neutral dropped); OOD for SST2.",
           SENTIMENT, notes="Labels 0 (negative) and 2 (positive) kept; 2 becomes 'positive'."),
    HFSpec("poems", "PoemS", "google-research-datasets/poem_sentiment", None, "train", "validation",
           ("verse_text", "label"), _label(SENTIMENT, keep=(0, 1), text="verse_text"), TEXT_TEMPLATE,
           "Poem verse polarity (no_impact and mixed dropped); OOD for SST2.", SENTIMENT,
           filter_before_shuffle=True),
    HFSpec("agn", "AGN", "fancyzhx/ag_news", None, "train", "test", ("text", "label"),
           _label(NEWS), TEXT_TEMPLATE, "News topic, 4 classes (AG News).", NEWS, ood=("bbcn",)),
    HFSpec("bbcn", "BBCN", "SetFit/bbc-news", None, "train", "test", ("text", "label"), _bbc,
           TEXT_TEMPLATE, "BBC News topic mapped onto AG News classes; OOD for AGN.", NEWS,
           notes="tech->Technology, business->Business, sport->Sports, entertainment and "
                 "politics->World; articles cut to 256 characters at a word boundary."),
    HFSpec("sciqr", "SciQr", "allenai/sciq", None, "train", "validation",
           ("question", "distractor1", "distractor2", "distractor3", "correct_answer"), _sciqr,
           QUESTION_TEMPLATE, "Science multiple choice (SciQ), 4 options named by remapped words.",
           REMAP_WORDS[:4], ood=("qascr",),
           notes="Options shuffled with a seeded RNG in row order; option words apple, Friday, "
                 "banana, Saturday."),
    HFSpec("qascr", "QASCr", "allenai/qasc", None, "train", "validation",
           ("question", "choices", "answerKey"), _qascr, QUESTION_TEMPLATE,
           "Science multiple choice (QASC), 8 options named by remapped words; OOD for SciQr.",
           REMAP_WORDS, notes="Its first four option words are SciQr's."),
    HFSpec("stf", "STF", "wics/strategy-qa", None, "test", None, ("question", "answer"), _strategy,
           QUESTION_TEMPLATE, "StrategyQA as true/false questions.", TRUTH),
    HFSpec("gsm8k", "GSM8K", "openai/gsm8k", "main", "train", "test", ("question", "answer"),
           _qa("question", "answer"), QUESTION_TEMPLATE,
           "Grade-school math word problems with worked solutions ending '#### n'.",
           parser="hash", max_new_tokens=256, stop="\n\n", ood=("gsm8ks",)),
    HFSpec("gsm8ks", "GSM8Ks", "apple/GSM-Symbolic", "main", "test", None, ("question", "answer"),
           _qa("question", "answer"), QUESTION_TEMPLATE,
           "GSM-Symbolic: GSM8K templates with new names and numbers; OOD for GSM8K.",
           parser="hash", max_new_tokens=256, stop="\n\n"),
    HFSpec("hmatha", "HMathA", "EleutherAI/hendrycks_math", "algebra", "train", "test",
           ("problem", "solution"), _qa("problem", "solution"), QUESTION_TEMPLATE,
           "MATH (Hendrycks) algebra problems; the answer is the last \\boxed{...}.",
           parser="boxed", max_new_tokens=512, stop="\n\nQuestion:"),
    HFSpec("sciq", "SciQ", "allenai/sciq", None, "train", "validation",
           ("question", "correct_answer", "support"), _sciq_passage, QUESTION_TEMPLATE,
           "SciQ free-form: the response is the supporting passage, then '#### answer'.",
           parser="hash", max_new_tokens=256, stop="\n\n"),
]}
"""The paper's 12 benchmarks, by the name used after ``hf:``."""

OOD_PAIRS: dict[str, tuple[str, ...]] = {f"hf:{s.name}": tuple(f"hf:{o}" for o in s.ood)
                                         for s in SPECS.values() if s.ood}
"""Training task -> the tasks the paper evaluates its adapters on out of distribution."""


# -- reading ------------------------------------------------------------------------------------


def _parse_spec(spec: str) -> tuple[HFSpec, Path | None]:
    body = spec[3:] if spec.startswith("hf:") else spec
    name, _, path = body.partition("@")
    name = name.strip().lower()
    if name not in SPECS:
        raise IA2Error(f"--task {spec}: unknown HF task {name!r}; choose one of "
                       + ", ".join(f"hf:{n}" for n in SPECS))
    if path:
        local = Path(path).expanduser()
        if not local.exists():
            raise IA2Error(f"--task {spec}: {local} does not exist")
        return SPECS[name], local
    env = os.environ.get(DATA_ENV)
    if env and (Path(env).expanduser() / name).is_dir():
        return SPECS[name], Path(env).expanduser() / name
    return SPECS[name], None


def _how_to_provide(hs: HFSpec) -> str:
    splits = " and ".join(dict.fromkeys(s for s in (hs.pool_split, hs.eval_split) if s))
    return (f"download it where the hub is reachable (it then stays in the HF cache), or put "
            f"{splits} split files (.jsonl/.parquet with columns {', '.join(hs.columns)}) in "
            f"${DATA_ENV}/{hs.name}/ or pass --task hf:{hs.name}@DIR")


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in SPLIT_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def _datasets(hs: HFSpec) -> Any:
    """The ``datasets`` module, or IA2Error saying how to install it (an optional extra)."""
    try:
        import datasets
    except ImportError as exc:
        raise IA2Error(f"--task hf:{hs.name}: hf:NAME tasks need the Hugging Face `datasets` library, "
                       f"which is not installed ({exc}); install it with `pip install -e \".[hf]\"` "
                       "(or `pip install datasets`)") from None
    return datasets


def _read_local(hs: HFSpec, path: Path, split: str) -> Any:
    datasets = _datasets(hs)

    file = path if path.is_file() else _split_file(path, split)
    if file is None:
        raise IA2Error(f"hf:{hs.name}: no {split} split in {path} (expected {split}.jsonl, "
                       f"{split}.parquet, ...); {_how_to_provide(hs)}")
    builder = {".jsonl": "json"}.get(file.suffix, file.suffix[1:])
    if builder not in ("json", "parquet", "csv"):
        raise IA2Error(f"hf:{hs.name}: {file}: use a .jsonl, .json, .parquet or .csv file")
    try:
        return datasets.load_dataset(builder, data_files=[str(file)], split="train")
    except Exception as exc:  # datasets raises many types for a bad file
        raise IA2Error(f"hf:{hs.name}: cannot read {file} ({type(exc).__name__}: {exc})") from exc


def _read_hub(hs: HFSpec, split: str) -> Any:
    datasets = _datasets(hs)

    try:
        return datasets.load_dataset(hs.dataset, hs.config, split=split)
    except Exception as exc:  # offline, missing from the cache, renamed upstream, ...
        where = f"{hs.dataset}" + (f" ({hs.config})" if hs.config else "")
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise IA2Error(f"hf:{hs.name}: dataset {where} split {split!r} is not available from the hub "
                       f"or the local HF cache ({type(exc).__name__}: {msg}); "
                       f"{_how_to_provide(hs)}") from exc


def _check_columns(hs: HFSpec, ds: Any, where: str) -> None:
    missing = [c for c in hs.columns if c not in ds.column_names]
    if missing:
        raise IA2Error(f"hf:{hs.name}: {where} lacks column(s) {', '.join(missing)} "
                       f"(has {', '.join(ds.column_names)}); expected the columns of {hs.dataset}")


def _label_filter(hs: HFSpec) -> Callable[[Row], bool]:
    probe = np.random.RandomState(0)
    return lambda row: hs.format(row, probe) is not None


def _label_hint(hs: HFSpec, ds: Any) -> str:
    """Why label rows were dropped: the label type the task expects, and what row 0 holds."""
    if "label" not in hs.columns:
        return ""
    probe = np.random.RandomState(0)
    ok = []
    for cand in range(16):  # the class ids the formatter accepts, and the word each becomes
        try:
            pair = hs.format({**{c: "x" for c in hs.columns}, "label": cand}, probe)
        except (IndexError, KeyError, ValueError):  # an id past the label words
            pair = None
        if pair is not None:
            ok.append(f"{cand} -> {pair[1]}")
    first = next(iter(ds), None)
    seen = first.get("label") if isinstance(first, dict) else None
    return (f"; its label column must hold integer class ids ({', '.join(ok)}), as the hub dataset "
            f"{hs.dataset} does, not label words: row 0 has {seen!r} ({type(seen).__name__})")


def _take(hs: HFSpec, ds: Any, limit: int, rng: np.random.RandomState, prefix: str) -> list[Example]:
    out: list[Example] = []
    for i, row in enumerate(ds):
        if len(out) == limit:
            break
        pair = hs.format(row, rng)
        if pair is None:
            continue
        inp, tgt = pair
        if not inp.strip() or not tgt.strip():
            continue
        out.append(Example(id=f"{hs.name}-{prefix}{i}", input=inp, target=tgt))
    return out


def _shuffled(hs: HFSpec, ds: Any) -> Any:
    if hs.filter_before_shuffle:
        ds = ds.filter(_label_filter(hs))
    return ds.shuffle(seed=SEED)


def load_hf(spec: str, template: str | None = None, separator: str | None = None,
            pool_max: int = POOL_MAX, eval_max: int = EVAL_MAX, **_: Any) -> Task:
    """One of the paper's benchmarks as a Task (``hf:sst2``, ``hf:gsm8k@/data/gsm8k``, ...).

    Args:
        spec: ``hf:NAME`` or ``hf:NAME@PATH`` (a folder of split files or a single file).
        template: overrides the prompt template: plain text with exactly one ``{input}``.
        separator: overrides the demo separator (not empty, not inside any target).
        pool_max: at most this many pool rows (the paper: 2,000).
        eval_max: at most this many eval rows (the paper: 500).
    """
    hs, local = _parse_spec(spec)
    # The flags first, before any data is read.
    tmpl = _check_template(template) if template is not None else hs.template
    sep = _check_separator(separator) if separator is not None else hs.separator
    single_file = local is not None and local.is_file()

    def read(split: str) -> Any:
        ds = _read_local(hs, local, split) if local is not None else _read_hub(hs, split)
        _check_columns(hs, ds, str(local) if local is not None else f"{hs.dataset} {split}")
        return ds

    rng = np.random.RandomState(SEED)  # option shuffles: pool rows first, then eval rows
    if hs.eval_split is not None and not single_file:
        pool = _take(hs, _shuffled(hs, read(hs.pool_split)), pool_max, rng, "p")
        evl = _take(hs, _shuffled(hs, read(hs.eval_split)), eval_max, rng, "e")
    else:
        rows = _take(hs, _shuffled(hs, read(hs.pool_split)), 10**9, rng, "r")
        n_eval = min(eval_max, len(rows) // 2)
        pool, evl = rows[: len(rows) - n_eval][:pool_max], rows[len(rows) - n_eval :]
    if not pool or not evl:
        raise IA2Error(f"hf:{hs.name}: too few usable rows (pool {len(pool)}, eval {len(evl)}) "
                       f"in {local or hs.dataset}" + _label_hint(hs, read(hs.pool_split)))
    data_from = str(local) if local is not None else f"hub/cache {hs.dataset}"
    # Hub rows are kept as the reference code keeps them (a warning names rows whose target holds
    # the stop string or the separator, or that repeat an input); a --separator that clashes
    # with the targets is the flag's fault and refused.
    check_examples([Located(f"hf:{hs.name} row {e.id}", e) for e in pool + evl], stop=hs.stop,
                   separator=sep, separator_flag="--separator" if separator is not None else None,
                   lenient=True, label=f"hf:{hs.name} ({data_from})")
    return Task(
        name=hs.name,
        pool=tuple(pool),
        eval=tuple(evl),
        template=tmpl,
        separator=sep,
        stop=hs.stop,
        source=f"hf:{hs.name}",
        card=hs.card(data_from),
    )


def registry_rows() -> list[dict[str, Any]]:
    """What ``ia2cache tasks`` shows for the HF benchmarks, without reading any data."""
    return [{"name": f"hf:{s.name}", "paper_name": s.paper_name, "dataset": s.dataset,
             "config": s.config, "template": s.template, "labels": list(s.labels) if s.labels else None,
             "parser": s.parser, "max_new_tokens": s.max_new_tokens,
             "ood_eval": [f"hf:{o}" for o in s.ood]} for s in SPECS.values()]


__all__ = ["SPECS", "OOD_PAIRS", "HFSpec", "load_hf", "registry_rows", "DATA_ENV"]
