"""Synthesize (JiuZhang3.0): the model writes new problems from seed texts, and majority vote
over its own solutions labels them; labelled problems then go through Think and Prune like
dataset problems, marked `"synthetic": true` with an id prefix `syn-rNN-`.

    records, stats = synthesize(params, model, tokenizer, seeds, cfg, think_cfg, mesh, ...)

1. Pick `cfg.per_round` seed texts (by seed and round) and prompt the model, per education
   stage (grade school, middle school, high school, competition; `mixed` cycles through them),
   to write one new problem inspired by each.
2. Sample `cfg.n_votes` solutions per new problem with the round's prompt template.
3. `majority_vote`: the most common final answer labels the problem when its share of the
   n votes reaches `cfg.threshold` and no other answer has as many votes; otherwise the problem
   is left unlabelled (tie, below threshold, no answer) and counted, not used.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np

from tpt_jax.stages import answers
from tpt_jax import prompts as P
from tpt_jax.config import SynthesizeConfig, ThinkConfig, TptError

log = logging.getLogger(__name__)

STAGES = {
    "grade-school": "a grade school math word problem (a few steps of whole-number arithmetic)",
    "middle-school": "a middle school math problem (fractions, ratios, percentages, simple "
                     "equations)",
    "high-school": "a high school math problem (algebra, geometry, probability or functions)",
    "competition": "a challenging math competition problem (number theory, combinatorics, "
                   "algebra or geometry) with a single numerical answer",
}
SYNTH_STOPS = ["\n\n"]  # and the chat's end of turn
ID_PREFIX = "syn"


def stage_for(cfg: SynthesizeConfig, i: int) -> str:
    return list(STAGES)[i % len(STAGES)] if cfg.stage == "mixed" else cfg.stage


def synthesis_prompt(stage: str, seed_text: str, template: str,
                     chat: P.Chat = P.GEMMA_CHAT) -> str:
    """Prompt asking for one new problem of the stage, inspired by `seed_text`; the completion
    is the problem text (ended by a blank line or the end of the model's turn)."""
    ask = (f"Write {STAGES[stage]}, inspired by the text below. Write only the problem, "
           f"with all the numbers it needs and a single final answer; no solution.")
    if P.parse_template(template)[0] == "zero-shot":
        return f"{chat.user}{ask}\n\nText: {seed_text.strip()}{chat.model}Problem:"
    return f"{ask}\nText: {seed_text.strip()}\nProblem:"


# ----------------------------------------------------------------------------- voting


def majority_vote(completions: Sequence[Optional[str]], threshold: float,
                  fallback: bool = False) -> dict:
    """Label from n sampled solutions. Each completion's final answer (None = unfinished or no
    answer) is one vote; the share is over all n. Returns {answer (or None), status: labelled |
    tie | below threshold | no answer, agreement, votes, n}."""
    extracted = [answers.extract_answer(c, fallback) if isinstance(c, str) else None
                 for c in completions]
    keys = [answers.answer_key(e) if e is not None else None for e in extracted]
    counts = Counter(k for k in keys if k is not None)
    n = len(completions)
    if not counts:
        return {"answer": None, "status": "no answer", "agreement": 0.0, "votes": 0, "n": n}
    ranked = counts.most_common()
    key, votes = ranked[0]
    agreement = votes / n
    out = {"answer": None, "agreement": agreement, "votes": votes, "n": n}
    if len(ranked) > 1 and ranked[1][1] == votes:
        return {**out, "status": "tie"}
    if agreement < threshold:
        return {**out, "status": "below threshold"}
    first = next(e for e, k in zip(extracted, keys) if k == key)
    return {**out, "answer": first, "status": "labelled"}


def label_by_vote(problems: Sequence[dict], samples: Sequence[dict], threshold: float,
                  fallback: bool = False) -> tuple[list[dict], dict]:
    """Majority-vote labels for unlabelled problems from sample records (Think's format; an
    unfinished sample counts as a vote for nothing). Returns (labelled problems with `answer`,
    `agreement`, `votes`; stats by status)."""
    by_id: dict[str, list] = {}
    for s in samples:
        done = s.get("finish", "stop") != "length"
        by_id.setdefault(str(s["id"]), []).append((s["sample"], s["completion"] if done else None))
    labelled, status = [], Counter()
    for p in problems:
        votes = [c for _, c in sorted(by_id.get(str(p["id"]), []), key=lambda x: x[0])]
        v = majority_vote(votes, threshold, fallback) if votes else {
            "answer": None, "status": "no samples", "agreement": 0.0, "votes": 0, "n": 0}
        status[v["status"]] += 1
        if v["answer"] is not None:
            labelled.append({**p, "answer": v["answer"], "agreement": round(v["agreement"], 4),
                             "votes": v["votes"], "n_votes": v["n"]})
    return labelled, {"problems": len(problems), "labelled": len(labelled),
                      "status": dict(status)}


# ----------------------------------------------------------------------------- the stage


def seed_texts(cfg: SynthesizeConfig, train_questions: Sequence[dict]) -> list[dict]:
    """{id, text} seeds: the training questions (`seeds: train`) or a JSONL file whose rows
    have `text` (or `question`)."""
    if cfg.seeds == "train":
        return [{"id": str(q["id"]), "text": q["question"]} for q in train_questions]
    from tpt_jax import io as tio
    out = []
    for n, rec in tio.read_jsonl(cfg.seeds):
        text = rec.get("text", rec.get("question"))
        if isinstance(text, str) and text.strip():
            out.append({"id": str(rec.get("id", f"line{n}")), "text": text})
    if not out:
        raise TptError(f"synthesize.seeds {cfg.seeds}: no rows with a 'text' or 'question' field")
    return out


def pick_seeds(seeds: Sequence[dict], k: int, seed: int, round_: int) -> list[dict]:
    if not seeds:
        return []
    rng = np.random.default_rng([seed, round_, 17])
    idx = rng.choice(len(seeds), size=k, replace=k > len(seeds))
    return [seeds[int(i)] for i in idx]


def synthesize(params: Any, model, tokenizer, seeds: Sequence[dict], cfg: SynthesizeConfig,
               think_cfg: ThinkConfig, mesh=None, *, template: str = "zero-shot",
               shots: Optional[Sequence[dict]] = None, round_: int = 0,
               source: str = "model", sampler=None) -> tuple[list[dict], dict]:
    """New labelled problems {id, question, answer, synthetic, stage, seed_id, agreement,
    votes, n_votes} and stats (written problems, empty ones, votes by status). `sampler`
    (think.batch_size slots) is reused when given, else one is made."""
    from tpt_jax.stages import completions, think

    chosen = pick_seeds(seeds, cfg.per_round, cfg.seed, round_)
    stages = [stage_for(cfg, i) for i in range(len(chosen))]
    chat = P.chat_of(tokenizer)
    texts = [synthesis_prompt(st, s["text"], template, chat) for st, s in zip(stages, chosen)]
    ids = [f"{ID_PREFIX}-r{round_:02d}-{i:05d}" for i in range(len(chosen))]
    write_cfg = dataclasses.replace(think_cfg, n=1, temperature=cfg.temperature,
                                    max_new_tokens=cfg.max_new_tokens, stop=[])
    if sampler is None:
        sampler = think.make_sampler(model, tokenizer, write_cfg, mesh)
    sampler.update_params(params)
    outs = completions.complete(sampler, tokenizer, texts, ids,
                                think.sampling_config(write_cfg), 1, cfg.seed + 1000 * round_,
                                SYNTH_STOPS + [chat.end]) if texts else []
    problems, empty = [], 0
    for pid, st, s, out in zip(ids, stages, chosen, outs):
        text = out[0]["completion"].strip()
        if not text:
            empty += 1
            continue
        problems.append({"id": pid, "question": text, "synthetic": True, "stage": st,
                         "seed_id": s["id"]})
    vote_cfg = dataclasses.replace(think_cfg, n=cfg.n_votes, seed=cfg.seed + 1000 * round_ + 1)
    samples = think.think(params, model, tokenizer, problems, vote_cfg, None, mesh,
                          template=template, shots=shots, source=source, progress=False,
                          sampler=sampler) if problems else []
    labelled, vote_stats = label_by_vote(problems, samples, cfg.threshold)
    stats = {"seeds": len(chosen), "written": len(problems), "empty": empty,
             "stages": dict(Counter(stages)), "n_votes": cfg.n_votes,
             "threshold": cfg.threshold, **vote_stats}
    log.info("synthesize: %d seeds -> %d problems -> %d labelled by majority vote (%s)",
             len(chosen), len(problems), len(labelled), vote_stats["status"])
    return labelled, stats
