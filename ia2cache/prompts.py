"""Teacher/student prompt pairs with exactly aligned positions.

The teacher reads ``demo block + query``; the student reads ``query`` alone. The demo block and
the query are tokenized **separately** and their ids concatenated, so the query's tokens are
identical in both sequences and position alignment is exact. A joined string is never
re-tokenized (a merge across the boundary would shift every position after it).

Randomness comes from numpy's PCG64 seeded with ``SeedSequence([seed, stream, row])``: the
same task, N, k and seed give the same ids on any machine and in any process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ia2cache.errors import IA2Error
from ia2cache.tasks import Example, Task

K_MAX = 8
"""``--k auto`` means ``min(N - 1, K_MAX)``."""
DEFAULT_DEV = 16
"""Dev rows D by default: enough that one or two rows do not choose the lr and the stopping step
(at N=4 the old N//2 gave two); see README "Results" for how the conclusion moves with D."""
SEED_LIMIT = 2**32
"""Seeds are in [0, 2**32): numpy's SeedSequence and torch.manual_seed both take them."""
ICL_DEMOS = ("train", "pool")
"""Where ICL evaluation draws demos: the N training rows (the teacher, the default) or the pool."""

Split = Literal["train", "dev", "eval", "unlabelled"]
PositionsMode = Literal["response", "query+response"]
POSITION_MODES: tuple[str, ...] = ("response", "query+response")
DEFAULT_POSITIONS = POSITION_MODES[0]
"""The paper's aligned positions: those predicting the response."""

# Independent random streams, so that adding dev rows never changes train rows' demos.
_STREAM_SELECT, _STREAM_TRAIN, _STREAM_DEV, _STREAM_EVAL, _STREAM_UNLABELLED = 0, 1, 2, 3, 4
UNLABELLED_MAX = 1_000_000


@dataclass(frozen=True)
class PromptConfig:
    """Which rows to build: the few-shot regime of one run."""

    n: int = 16
    """Number of training examples drawn from the task's pool."""
    k: int | None = None
    """Demonstrations per teacher prompt; None means auto: min(N - 1, 8)."""
    seed: int = 0
    """Data seed: picks the N examples and every row's demos."""
    dev: int = DEFAULT_DEV
    """Dev rows D: further pool examples (disjoint from train and eval) that choose the learning
    rate and the stopping step; extra labelled data, reported as "N train + D dev"."""
    unlabelled: int = 0
    """M unlabelled teacher rows: queries whose targets are never read, each with k demos drawn
    from the N labelled rows; only the activation (IA2) phases train on them."""

    def __post_init__(self) -> None:
        if self.n < 2:
            raise IA2Error(
                f"--n {self.n}: must be at least 2 (each training row's demos come from the other "
                "training rows; with N=1 the teacher would have no demos and equal the student)"
            )
        if self.k is not None and self.k < 1:
            raise IA2Error(f"--k {self.k}: must be at least 1 (with 0 demos the teacher is the student)")
        check_seed(self.seed)
        if not 1 <= self.dev <= 100_000:
            raise IA2Error(f"--dev {self.dev}: must be between 1 and 100000 rows")
        if isinstance(self.unlabelled, bool) or not 0 <= self.unlabelled <= UNLABELLED_MAX:
            raise IA2Error(f"--unlabelled {self.unlabelled}: must be between 0 and {UNLABELLED_MAX} rows")
        if self.k is not None and self.k > max(self.n - 1, 0):
            raise IA2Error(
                f"--k {self.k}: at most N-1 = {self.n - 1} demos exist for each of the "
                f"N={self.n} training examples (demos come from the other training examples)"
            )

    @property
    def k_effective(self) -> int:
        return min(self.n - 1, K_MAX) if self.k is None else self.k


def check_positions(mode: str) -> str:
    """``mode`` if it is one of :data:`POSITION_MODES`; IA2Error naming ``--positions`` otherwise."""
    if mode not in POSITION_MODES:
        raise IA2Error(f"--positions {mode}: choose {' or '.join(POSITION_MODES)}")
    return mode


def check_seed(seed: int, flag: str = "--seed") -> int:
    """``seed`` if it is an int in [0, 2**32); IA2Error naming ``flag`` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise IA2Error(f"{flag} {seed}: must be an integer in [0, 2**32)")
    return seed


@dataclass(frozen=True)
class PromptPair:
    """One row: a teacher prompt, its student prompt, and the gold response ids."""

    row: int
    split: Split
    example_id: str
    demo_ids: tuple[str, ...]
    teacher_ids: tuple[int, ...]
    """prefix + demo block + query."""
    student_ids: tuple[int, ...]
    """prefix + query."""
    target_ids: tuple[int, ...]
    """``" " + target`` tokenized on its own."""
    query_start: int
    """Index in ``teacher_ids`` where the query starts."""
    prefix_len: int = 0
    """Tokens (a BOS) that start both sequences."""
    target: str = ""
    """The gold target text (no leading space)."""
    stop_ids: tuple[int, ...] = ()
    """The task's stop string tokenized on its own (EOS when it has none): what ends a response."""

    def label_ids(self, t: int) -> tuple[int, ...]:
        """Gold SFT labels for responses of up to ``t`` tokens: the target, then, when ``t > 1``,
        the stop ids, as the teacher's own responses end; so SFT learns to stop."""
        if not self.target_ids:  # an unlabelled row: no labels at all
            return ()
        return self.target_ids + self.stop_ids if t > 1 else self.target_ids

    @property
    def query_len(self) -> int:
        return len(self.student_ids) - self.prefix_len

    def positions(self, t: int, mode: str = "response") -> tuple[list[int], list[int]]:
        """Aligned (teacher, student) positions for a response of ``t`` tokens.

        ``response``: the positions that predict response tokens: the last prompt token,
        then response tokens 1..t-1. ``query+response`` also aligns every query token first.
        """
        tp = [len(self.teacher_ids) - 1 + i for i in range(t)]
        sp = [len(self.student_ids) - 1 + i for i in range(t)]
        if check_positions(mode) == "response":
            return tp, sp
        # The last query token is already response position 0; do not count it twice.
        tq = [self.query_start + j for j in range(self.query_len - 1)]
        sq = [self.prefix_len + j for j in range(self.query_len - 1)]
        return tq + tp, sq + sp


@dataclass(frozen=True)
class PairSet:
    task: str
    n: int
    k: int
    seed: int
    train: tuple[PromptPair, ...]
    dev: tuple[PromptPair, ...]
    unlabelled: tuple[PromptPair, ...] = ()
    distinct_unlabelled: int = 0
    """How many different queries the unlabelled rows hold (they cycle when M exceeds them)."""

    @property
    def rows(self) -> tuple[PromptPair, ...]:
        """Train rows, then unlabelled rows, then dev rows: train and unlabelled rows are one
        contiguous range (what the activation phases read), dev rows follow."""
        return self.train + self.unlabelled + self.dev

    def digest(self) -> str:
        """sha256 over every row's ids: equal digests mean identical rows."""
        return _digest(self.rows)


def _digest(pairs: tuple[PromptPair, ...] | list[PromptPair]) -> str:
    body = [
        [p.row, p.split, p.example_id, list(p.demo_ids), list(p.teacher_ids),
         list(p.student_ids), list(p.target_ids), p.query_start]
        for p in pairs
    ]
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


class _Encoder:
    """Tokenizes pieces without special tokens; adds the tokenizer's BOS as a shared prefix."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        bos = tokenizer.bos_token_id
        probe = tokenizer("a").input_ids
        self.prefix: tuple[int, ...] = (bos,) if bos is not None and probe[:1] == [bos] else ()
        eos = tokenizer.eos_token_id
        self.eos: tuple[int, ...] = (eos,) if eos is not None else ()
        self._kept_chunks: dict[str, tuple[int, ...]] = {}

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self._kept_chunks.get(text)
        if ids is None:
            ids = tuple(self.tok(text, add_special_tokens=False).input_ids)
            self._kept_chunks[text] = ids
        return ids


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS as ``generate`` sees it: the generation config's id(s), and the tokenizer's."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return sorted({int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None})


def response_length(tokenizer: Any, ids: list[int], stop: str, eos: Collection[int] | None = None) -> int:
    """How many generated tokens make the response: up to and including EOS (``eos``, by
    default the tokenizer's) or the token that completes ``stop``; all of them if neither occurs."""
    eos_set = {tokenizer.eos_token_id} if eos is None else set(eos)
    for n in range(1, len(ids) + 1):
        if ids[n - 1] in eos_set or (stop and stop in tokenizer.decode(ids[:n], skip_special_tokens=True)):
            return n
    return len(ids)


def _rng(seed: int, stream: int, row: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, row])))


def make_pair(
    task: Task,
    enc: _Encoder,
    row: int,
    split: Split,
    query: Example,
    demos: list[Example],
) -> PromptPair:
    query_ids = enc(task.render(query))
    if demos:
        block = task.separator.join(task.demo_text(d) for d in demos) + task.separator
        demo_ids = enc(block)
    else:
        demo_ids = ()
    return PromptPair(
        row=row,
        split=split,
        example_id=query.id,
        demo_ids=tuple(d.id for d in demos),
        teacher_ids=enc.prefix + demo_ids + query_ids,
        student_ids=enc.prefix + query_ids,
        # An unlabelled row has no target: nothing of one is stored, so nothing can read it.
        target_ids=enc(" " + query.target) if split != "unlabelled" else (),
        stop_ids=enc(task.stop) if task.stop else enc.eos,
        query_start=len(enc.prefix) + len(demo_ids),
        prefix_len=len(enc.prefix),
        target=query.target,
    )


def build_pairs(task: Task, tokenizer: Any, config: PromptConfig,
                unlabelled_queries: list[Example] | None = None) -> PairSet:
    """Train, unlabelled and dev rows for one few-shot run.

    The seed picks N train examples from the pool, then the next D (``config.dev``, at most what
    the pool has left) as dev. Each train row's k demos come from the *other* train examples;
    each dev row's and each unlabelled row's from the train examples. The M unlabelled rows'
    queries are ``unlabelled_queries`` (a user's file), else the pool examples after train and
    dev in the seed's order (their targets are never used); when M exceeds the queries there
    are, they repeat in that order, each row with its own demos.

    Args:
        task: the task (``ia2cache.tasks.load_task``).
        tokenizer: the model's tokenizer.
        config: N, k, D, M and the data seed.
        unlabelled_queries: the inputs of an unlabelled file (targets empty).
    """
    n, k, seed = config.n, config.k_effective, config.seed
    pool = task.pool
    train_idx = train_indices(task, n, seed)
    n_dev = min(config.dev, len(pool) - n)
    if n_dev < 1:
        raise IA2Error(f"--n {n}: task {task.name!r} has {len(pool)} pool examples, none left for dev rows")
    enc = _Encoder(tokenizer)
    order = _rng(seed, _STREAM_SELECT, 0).permutation(len(pool))
    dev_idx = order[n : n + n_dev]
    train: list[PromptPair] = []
    for i, ex_i in enumerate(train_idx):
        others = np.delete(train_idx, i)
        pick = _rng(seed, _STREAM_TRAIN, i).choice(len(others), size=k, replace=False)
        train.append(make_pair(task, enc, i, "train", pool[ex_i], [pool[others[j]] for j in pick]))
    m = config.unlabelled
    if unlabelled_queries is not None:
        queries = list(unlabelled_queries)
    else:  # pool examples after train and dev; their targets are dropped here, never stored
        queries = [Example(pool[x].id, pool[x].input, "") for x in order[n + n_dev:]]
    if m and not queries:
        raise IA2Error(f"--unlabelled {m}: task {task.name!r} has no pool example left after N={n} train and "
                       f"{n_dev} dev rows; give --unlabelled-file")
    unlabelled: list[PromptPair] = []
    for j in range(m):  # rows N..N+M-1: the act phases read rows 0..N+M-1 as one range
        pick = _rng(seed, _STREAM_UNLABELLED, j).choice(n, size=k, replace=False)
        query = queries[j % len(queries)]
        unlabelled.append(make_pair(task, enc, n + j, "unlabelled", query,
                                    [pool[train_idx[x]] for x in pick]))
    dev: list[PromptPair] = []
    for j, ex_j in enumerate(dev_idx):
        pick = _rng(seed, _STREAM_DEV, j).choice(n, size=k, replace=False)
        demos = [pool[train_idx[x]] for x in pick]
        dev.append(make_pair(task, enc, n + m + j, "dev", pool[ex_j], demos))
    return PairSet(task=task.name, n=n, k=k, seed=seed, train=tuple(train), dev=tuple(dev),
                   unlabelled=tuple(unlabelled), distinct_unlabelled=min(m, len(queries)))


def train_indices(task: Task, n: int, seed: int) -> np.ndarray:
    """Pool indices of the N training examples that data seed ``seed`` picks (train rows 0..N-1)."""
    if n > len(task.pool):
        raise IA2Error(f"--n {n}: task {task.name!r} has only {len(task.pool)} pool examples to train from")
    return _rng(seed, _STREAM_SELECT, 0).permutation(len(task.pool))[:n]


def build_eval_pairs(
    task: Task, tokenizer: Any, k: int, seed: int = 0, n_eval: int | None = None,
    n: int | None = None, demos: str = "train",
) -> list[PromptPair]:
    """Rows for the eval split, each query with k demos drawn with the data seed.

    Args:
        demos: ``train``: from the N training examples that ``seed`` picks, as the teacher's
            dev rows see them (the ICL baseline is then the teacher that IA2 distils);
            ``pool``: from the whole pool (more labelled data than N; never the default).
        n: N, needed with ``demos="train"``.
    """
    if demos not in ICL_DEMOS:
        raise IA2Error(f"--icl-demos {demos}: choose train or pool")
    if n_eval is not None and n_eval < 1:
        raise IA2Error(f"--n-eval {n_eval}: must be at least 1")
    if k == 0:  # no demos (base model, adapters): nothing to draw
        source: list[Example] = []
    elif demos == "train":
        if n is None:
            raise IA2Error("--n: ICL demos come from the N training rows; give N (or --icl-demos pool)")
        source = [task.pool[i] for i in train_indices(task, n, seed)]
        if k > n:
            raise IA2Error(f"--k {k}: ICL demos come from the N={n} training rows; at most {n}")
    else:
        source = list(task.pool)
        if k > len(source):
            raise IA2Error(f"--k {k}: task {task.name!r} has only {len(source)} pool examples")
    queries = task.eval[:n_eval] if n_eval is not None else task.eval
    enc = _Encoder(tokenizer)
    out = []
    for i, q in enumerate(queries):
        pick = _rng(seed, _STREAM_EVAL, i).choice(len(source), size=k, replace=False) if k else []
        out.append(make_pair(task, enc, i, "eval", q, [source[m] for m in pick]))
    return out


__all__ = [
    "PromptConfig", "PromptPair", "PairSet", "build_pairs", "build_eval_pairs", "train_indices",
    "check_positions", "check_seed", "K_MAX", "DEFAULT_DEV", "DEFAULT_POSITIONS", "ICL_DEMOS",
    "POSITION_MODES",
]
