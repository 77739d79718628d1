"""Evaluate a model on a task's eval split: no demos (base), with k demos (ICL), or an adapter.

Single-token tasks score the next-token distribution after the prompt: accuracy is argmax
against the target's first token, confidence is the top-1 probability. Multi-token tasks
generate greedily up to the stop string and compare exact text, or, when the task card names an
answer parser (``ia2cache.answers``: ``hash`` for ``#### n``, ``boxed`` for ``\\boxed{...}``),
the parsed answers of response and gold target; confidence is the greedy answer's probability,
ending where it ends (:func:`answer_confidence`: the answer's tokens, then any token that ends it
the same way). ``ood_task`` builds an out-of-distribution evaluation: queries from one task,
demos (and so the ICL teacher) from the training task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import weakref
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ia2cache.answers import get_parser
from ia2cache.errors import IA2Error
from ia2cache.metrics import ece_equal_mass, ece_equal_width
from ia2cache.padding import pad
from ia2cache.prompts import ICL_DEMOS, PromptPair, build_eval_pairs, check_seed, eos_ids, response_length
from ia2cache.tasks import Task, is_single_token

log = logging.getLogger(__name__)

Mode = Literal["base", "icl", "adapter"]


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate."""

    mode: Mode = "icl"
    """base: the query alone; icl: k demos plus the query (the teacher); adapter: query alone."""
    k: int = 4
    """Demos per prompt in icl mode (and for the teacher of ``agreement``)."""
    n: int | None = None
    """N: with icl_demos=train, ICL demos are drawn from the N training rows the data seed picks,
    exactly the rows the teacher's demos come from (needed for icl mode and for agreement)."""
    icl_demos: str = "train"
    """Where ICL demos come from: train (the N training rows: ICL is the teacher IA2 distils) or
    pool (the whole pool: more labelled data than N; an explicitly named alternative)."""
    n_eval: int | None = 200
    """Evaluate the first n_eval eval examples (all if None or more than exist)."""
    seed: int = 0
    """Data seed: picks the N training rows and draws the ICL demos."""
    batch_size: int = 8
    """Rows per forward pass."""
    agreement: bool = False
    """Also score the ICL teacher (base model, k demos) and report how often the answers agree:
    the share of eval rows where both give the same answer. With an answer parser, a row where the
    model's answer is unparsable (None) never agrees, even when the teacher's is unparsable too."""
    max_new_tokens: int | None = None
    """Multi-token tasks: tokens to generate; default the task card's max_new_tokens, else the
    longest gold target + 4."""

    def __post_init__(self) -> None:
        if self.mode not in ("base", "icl", "adapter"):
            raise IA2Error(f"mode {self.mode!r}: choose base, icl or adapter")
        if self.batch_size < 1:
            raise IA2Error(f"--batch-size {self.batch_size}: must be at least 1")
        if self.mode == "icl" and self.k < 1:
            raise IA2Error(f"--k {self.k}: ICL needs at least one demo")
        if self.icl_demos not in ICL_DEMOS:
            raise IA2Error(f"--icl-demos {self.icl_demos}: choose train or pool")
        check_seed(self.seed)
        uses_icl = self.mode == "icl" or self.agreement
        if uses_icl and self.icl_demos == "train":
            if self.n is None:
                raise IA2Error("--n: ICL demos come from the N training rows the seed picks; give --n "
                               "(or --icl-demos pool to draw them from the whole pool)")
            if not 1 <= self.k <= self.n:
                raise IA2Error(f"--k {self.k}: ICL demos come from the N={self.n} training rows; "
                               f"choose 1..{self.n}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise IA2Error(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")


def _prompt(pair: PromptPair, mode: str) -> list[int]:
    return list(pair.teacher_ids if mode == "icl" else pair.student_ids)


@torch.no_grad()
def _score_single(model: Any, pairs: list[PromptPair], mode: str, pad_id: int, bs: int,
                  device: torch.device) -> dict[str, np.ndarray]:
    conf, correct, nll, pred = [], [], [], []
    for start in range(0, len(pairs), bs):
        batch = pairs[start : start + bs]
        seqs = [_prompt(p, mode) for p in batch]
        # Right padding: causal attention never lets a real token see the pads after it.
        ids, mask = pad(seqs, pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        shift = logits.shape[1] - ids.shape[1]  # prompt tuning prepends virtual tokens
        last = torch.tensor([shift + len(s) - 1 for s in seqs], device=device)
        logp = torch.log_softmax(logits[torch.arange(len(seqs)), last].float(), dim=-1)
        tgt = torch.tensor([p.target_ids[0] for p in batch], device=device)
        top_lp, top = logp.max(dim=-1)
        conf += top_lp.exp().tolist()
        pred += top.tolist()
        correct += (top == tgt).tolist()
        nll += (-logp[torch.arange(len(seqs)), tgt]).tolist()
    return {"confidence": np.array(conf), "correct": np.array(correct, dtype=bool),
            "nll": np.array(nll), "pred": np.array(pred)}


def _generates(task: Task, single: bool) -> bool:
    """Whether scoring generates text (multi-token targets, or any task with an answer parser)."""
    return not single or bool(task.card.get("parser"))


def effective_max_new(task: Task, pairs: list[PromptPair], max_new: int | None = None) -> int:
    """Tokens generated per row: ``max_new`` if given, else the task card's ``max_new_tokens``,
    else the longest gold target + 4. The context check and generation both use this number."""
    return int(max_new or task.card.get("max_new_tokens") or max(len(p.target_ids) for p in pairs) + 4)


_ENDS: weakref.WeakKeyDictionary[Any, dict[tuple[str, int, tuple[int, ...]], torch.Tensor]] = (
    weakref.WeakKeyDictionary())
"""answer_ends per tokenizer (while it lives), stop, vocabulary size and EOS ids: decoding a whole
vocabulary costs about 1 s for SmolLM2's 49k tokens and 4 s for Gemma 3's 262k."""


def answer_ends(tok: Any, stop: str, vocab: int, eos: Collection[int] | None = None) -> torch.Tensor:
    """Which of ``vocab`` token ids end an answer without changing it: EOS (``eos``: by default
    the tokenizer's; :func:`~ia2cache.prompts.eos_ids` gives every id generation stops on), and
    every token whose text holds ``stop`` with only whitespace before it (``"\\n"``, ``"\\n\\n"``,
    ``" \\n"`` for a ``"\\n"`` stop; not ``".\\n"``, which adds a character).
    Scoring cuts the answer at the stop and strips it, so after a given answer each of these
    tokens yields the same answer. Cached per tokenizer, stop, vocab and EOS ids (read-only: do
    not modify the returned mask)."""
    eos_set = tuple(sorted({tok.eos_token_id} - {None} if eos is None else set(eos)))
    key = (stop, vocab, eos_set)
    try:
        known = _ENDS.setdefault(tok, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: not cached
        known = {}
    if key not in known:
        ends = torch.zeros(vocab, dtype=torch.bool)
        if stop:
            n = min(vocab, len(tok))
            texts = tok.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
            hit = [i for i, t in enumerate(texts) if stop in t and not t.split(stop, 1)[0].strip()]
            ends[hit] = True
        ends[[e for e in eos_set if 0 <= e < vocab]] = True
        known[key] = ends
    return known[key]


def generation_scores(step_lp: torch.Tensor, new: torch.Tensor, ends: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """From (batch, steps, vocab) log-probabilities of a generation and its (batch, steps) tokens
    ``new``: each step's log-probability of the token taken, and each step's probability of
    ending the answer (the mass on ``ends``), both (batch, steps) on the CPU. Computed where
    ``step_lp`` lives, so that only these two small tensors leave a GPU."""
    chosen = step_lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    end_mass = torch.logsumexp(step_lp[..., ends.to(step_lp.device)], dim=-1).exp()
    return chosen.cpu(), end_mass.cpu()


def answer_confidence(chosen_lp: torch.Tensor, end_mass: torch.Tensor, ids: list[int], n_resp: int,
                      ends: torch.Tensor) -> float:
    """The probability of the greedy answer, ending where it ends: P(its tokens) x P(any token of
    ``ends`` next). ``chosen_lp``, ``end_mass``: one row of :func:`generation_scores`; ``ids``:
    the generated tokens; ``n_resp``: the response's length (``response_length``: up to and
    including the token that ends it).

    Where the answer ends with a token of ``ends`` (EOS, or a stop token alone), that token's
    own probability is replaced by the mass of every token that ends the answer the same way: a
    model that splits it between ``"\\n"`` and ``"\\n\\n"`` (or EOS) is as sure of its answer as one
    that puts it all on one. Where the stop is fused with answer text in one token (``".\\n"``),
    where it spans two tokens (a ``"\\n\\n"`` stop written ``"\\n"``, ``"\\n"``: no token of
    ``ends`` is taken), or where nothing ended the answer (cut at the token limit): the generated
    tokens' probability."""
    if n_resp and ends[ids[n_resp - 1]]:
        return float(chosen_lp[: n_resp - 1].sum().exp() * end_mass[n_resp - 1])
    return float(chosen_lp[: max(n_resp, 1)].sum().exp())


@torch.no_grad()
def _score_generate(model: Any, tok: Any, task: Task, pairs: list[PromptPair], mode: str,
                    bs: int, device: torch.device, max_new: int | None = None) -> dict[str, np.ndarray]:
    max_new = effective_max_new(task, pairs, max_new)
    parse = get_parser(task.card["parser"]) if task.card.get("parser") else None
    conf, correct, nll, answers = [], [], [], []
    pad_id = tok.pad_token_id
    eos = eos_ids(model, tok)  # every id generation stops on
    ends: torch.Tensor | None = None
    for start in range(0, len(pairs), bs):
        batch = pairs[start : start + bs]
        seqs = [_prompt(p, mode) for p in batch]
        ids, mask = pad(seqs, pad_id, left=True)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
            do_sample=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=pad_id,
        )
        new = out.sequences[:, ids.shape[1] :]
        step_lp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
        if ends is None:
            ends = answer_ends(tok, task.stop, step_lp.shape[-1], eos)
        chosen, end_mass = generation_scores(step_lp, new, ends)
        for i, p in enumerate(batch):
            ids = new[i].tolist()
            n_resp = response_length(tok, ids, task.stop, eos)
            at_eos = bool(n_resp) and ids[n_resp - 1] in eos
            n_tok = n_resp - 1 if at_eos else n_resp  # EOS ends the answer but is not part of its text
            text = tok.decode(ids[:n_tok], skip_special_tokens=True)
            if task.stop:
                text = text.split(task.stop)[0]
            if parse is None:
                answers.append(text.strip())
                correct.append(text.strip() == p.target)
            else:  # exact match of the parsed answers; no parsable answer is wrong
                answer = parse(text)
                answers.append(answer)
                correct.append(answer is not None and answer == parse(p.target))
            conf.append(answer_confidence(chosen[i], end_mass[i], ids, n_resp, ends))
        # NLL of the gold target, teacher-forced.
        full = [s + list(p.target_ids) for s, p in zip(seqs, batch, strict=True)]
        fids, fmask = pad(full, pad_id)
        logits = model(input_ids=fids.to(device), attention_mask=fmask.to(device)).logits
        shift = logits.shape[1] - fids.shape[1]
        logp = torch.log_softmax(logits.float(), -1)
        for i, (s, p) in enumerate(zip(seqs, batch, strict=True)):
            pos = torch.arange(shift + len(s) - 1, shift + len(s) - 1 + len(p.target_ids), device=device)
            tgt = torch.tensor(p.target_ids, device=device)
            nll.append(float(-logp[i, pos, tgt].sum()))
    return {"confidence": np.array(conf), "correct": np.array(correct, dtype=bool),
            "nll": np.array(nll), "answers": np.array(answers, dtype=object)}


def _score(model: Any, tok: Any, task: Task, pairs: list[PromptPair], mode: str, bs: int,
           device: torch.device, single: bool, max_new: int | None = None) -> dict[str, np.ndarray]:
    if single and not task.card.get("parser"):
        return _score_single(model, pairs, mode, tok.pad_token_id, bs, device)
    return _score_generate(model, tok, task, pairs, mode, bs, device, max_new)


def ood_task(train: Task, target: Task) -> Task:
    """Evaluate out of distribution: ``target``'s eval queries, with ICL demos from ``train``'s
    pool (the teacher the adapters were distilled from), in ``target``'s prompt shape."""
    if train.name == target.name and train.content_hash == target.content_hash:
        return train
    card = {**target.card, "train_task": train.name}
    return Task(name=target.name, pool=train.pool, eval=target.eval, template=target.template,
                separator=target.separator, stop=target.stop, source=target.source, card=card)


def _score_teacher(model: Any, tokenizer: Any, task: Task, pairs: list[PromptPair], config: EvalConfig,
                   device: torch.device, single: bool, max_new: int) -> dict[str, Any]:
    """The ICL teacher's scores: the base model (a peft adapter switched off) with k demos."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:
        return _score(model, tokenizer, task, pairs, "icl", config.batch_size, device, single, max_new)


def evaluate(model: Any, tokenizer: Any, task: Task, config: EvalConfig,
             device: torch.device | None = None, details: bool = False,
             teacher_answers: list[Any] | None = None) -> dict[str, Any]:
    """Accuracy, ECE (equal-mass and equal-width, 15 bins) and NLL on the task's eval split.

    Args:
        model: a causal LM (a peft model for mode "adapter").
        tokenizer: its tokenizer.
        task: the task; only its eval split is scored, demos come from its pool.
        config: mode, k, n_eval, seed, batch size.
        device: where the model is; default where its parameters are.
        details: also return per-row confidence, correctness and answers (for reliability
            diagrams, and as ``teacher_answers`` of later calls).
        teacher_answers: with ``agreement``, the ICL teacher's per-row answers from an earlier
            ``evaluate(..., mode="icl", details=True)`` with the same k, N, seed and n_eval
            (``result["rows"]["answer"]``): the teacher is then not scored again.
    """
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    k = config.k if config.mode == "icl" else 0
    icl = dict(n=config.n, demos=config.icl_demos)
    pairs = build_eval_pairs(task, tokenizer, k=k, seed=config.seed, n_eval=config.n_eval, **icl)
    single = is_single_token(task, tokenizer)
    # One number of new tokens for the context check and for generation.
    max_new = effective_max_new(task, pairs, config.max_new_tokens) if _generates(task, single) else 1
    _check_context(model, pairs, config.mode, max_new)
    icl_pairs: list[PromptPair] = []
    if config.agreement and config.mode != "icl" and teacher_answers is None:
        icl_pairs = build_eval_pairs(task, tokenizer, k=config.k, seed=config.seed, n_eval=config.n_eval,
                                     **icl)
        _check_context(model, icl_pairs, "icl", max_new)
    was_training = model.training
    model.eval()
    res = _score(model, tokenizer, task, pairs, config.mode, config.batch_size, device, single, max_new)
    bad = int((~np.isfinite(res["confidence"])).sum() + (~np.isfinite(res["nll"])).sum())
    if bad:
        raise IA2Error(f"{config.mode} model: non-finite scores on {bad} eval rows (its weights hold NaN or "
                       "Inf, e.g. a diverged adapter); nothing was scored")
    agreement = None
    if config.agreement and teacher_answers is not None:
        if len(teacher_answers) != len(pairs):
            raise IA2Error(f"teacher_answers: {len(teacher_answers)} rows for {len(pairs)} eval rows")
        key = "pred" if "pred" in res else "answers"
        agreement = agreement_rate(res, {key: np.array(teacher_answers, dtype=object)})
    if icl_pairs:
        agreement = agreement_rate(res, _score_teacher(model, tokenizer, task, icl_pairs, config, device,
                                                       single, max_new))
    model.train(was_training)
    conf, corr = res["confidence"], res["correct"]
    out = {
        "task": task.name,
        "train_task": task.card.get("train_task", task.name),
        "parser": task.card.get("parser"),
        "mode": config.mode,
        "k": k,
        "n": config.n,
        "icl_demos": config.icl_demos if (config.mode == "icl" or config.agreement) else None,
        "n_eval": len(pairs),
        "single_token": single,
        "accuracy": float(corr.mean()),
        "confidence": float(conf.mean()),
        "ece_equal_mass": ece_equal_mass(conf, corr),
        "ece_equal_width": ece_equal_width(conf, corr),
        "nll": float(np.mean(res["nll"])),
        "agreement_with_icl": agreement,
        "seed": config.seed,
        "config": asdict(config),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if details:
        answers = res["pred"] if "pred" in res else res["answers"]
        out["rows"] = {"confidence": conf.tolist(), "correct": corr.astype(int).tolist(),
                       "example_id": [p.example_id for p in pairs],
                       "answer": [a.item() if hasattr(a, "item") else a for a in answers.tolist()]}
    return out


def agreement_rate(res: dict[str, np.ndarray], teacher: dict[str, np.ndarray]) -> float:
    """Share of rows where the model's answer equals the teacher's: predicted token ids for
    single-token scoring, else the answers (parsed, or the generated text). An answer that is None
    (unparsable) never agrees, so two unparsable responses do not count as agreement."""
    key = "pred" if "pred" in res else "answers"
    same = [a is not None and a == b for a, b in zip(res[key].tolist(), teacher[key].tolist(), strict=True)]
    return float(np.mean(same)) if same else float("nan")


def _check_context(model: Any, pairs: list[PromptPair], mode: str, new_tokens: int) -> None:
    """Refuse prompts the model cannot read whole (past its position limit scores are garbage)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or not pairs:
        return
    longest = max(pairs, key=lambda p: len(_prompt(p, mode)))
    n = len(_prompt(longest, mode))
    if n + new_tokens > limit:
        raise IA2Error(
            f"eval row {longest.row} (example {longest.example_id}): a prompt of {n} tokens + "
            f"{new_tokens} new token(s) exceeds the model's context of {limit}; lower --k or shorten "
            "the task's inputs"
        )


def read_run_record(folder: str | Path, required: bool = False) -> dict[str, Any]:
    """An adapter directory's ``run.json`` (written by distill) as a dict.

    Args:
        folder: the adapter (distill output) directory.
        required: refuse a missing run.json; otherwise a missing one reads as ``{}``.

    Raises:
        IA2Error: naming the file, when it is unreadable, not valid JSON or not a JSON object
            (or missing and ``required``).
    """
    run = Path(folder).expanduser() / "run.json"
    if not run.is_file():
        if required:
            raise IA2Error(f"--adapter {run.parent}: no run.json (not a distill output directory)")
        return {}
    try:
        record = json.loads(run.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IA2Error(f"--adapter {run}: not a readable JSON file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(record, dict):
        raise IA2Error(f"--adapter {run}: expected a JSON object, got {type(record).__name__}")
    return record


def load_adapter(adapter_dir: str | Path, device: str | None = None,
                 model: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Load a distilled adapter onto its base model; returns (model, tokenizer, run.json).

    Args:
        adapter_dir: the distill output directory.
        device: where to load it.
        model: the base model to load it onto; default the one it was trained on. Refused
            (IA2Error) when its weights are not the ones the adapter's cache was collected from.
    """
    from peft import PeftModel

    from ia2cache.models import load_model, load_tokenizer

    folder = Path(adapter_dir).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise IA2Error(f"--adapter {folder}: no adapter_config.json (not an adapter directory)")
    record = read_run_record(folder)
    trained_on = (record.get("cache_manifest") or {}).get("model") or {}
    if model is not None and trained_on.get("fingerprint"):
        info = load_tokenizer(model)[1]
        if info.fingerprint != trained_on["fingerprint"]:
            raise IA2Error(
                f"--adapter {folder} was trained on model {trained_on.get('name')!r} (fingerprint "
                f"{trained_on['fingerprint']}), but --model {model} has fingerprint {info.fingerprint}: "
                "leave --model out to use the adapter's own base model"
            )
    loaded = load_model(model or record.get("model_spec", "default"), device=device)
    model = PeftModel.from_pretrained(loaded.model, folder)
    model.eval()
    return model, loaded.tokenizer, record
