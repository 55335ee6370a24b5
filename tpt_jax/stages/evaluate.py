"""Eval: greedy Pass@1 and sampled pass@k / maj@k on a held-out split.

Generation goes through the same sampler as Think; grading uses the same answer checker as
Prune (`answers`), so "correct" means one thing everywhere. pass@k uses the unbiased
estimator over n samples per question (`metrics`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

from tpt_jax.stages import answers, metrics, think
from tpt_jax.config import EvalConfig, ThinkConfig

log = logging.getLogger(__name__)


def grade(questions: Sequence[dict], samples: Sequence[dict]) -> dict[str, list]:
    """Per question id, its samples in order as (answer key, correct, solution key if correct).
    Unfinished samples and samples without an answer marker count as wrong."""
    gold = {q["id"]: answers.parse_gold(q["answer"]) for q in questions}
    per_q: dict[str, list] = {q["id"]: [] for q in questions}
    for s in sorted(samples, key=lambda s: (s["id"], s["sample"])):
        g = gold.get(s["id"])
        pred = answers.extract_answer(s["completion"]) if s.get("finish", "stop") == "stop" else None
        ok = g is not None and answers.is_correct(pred, g)
        per_q[s["id"]].append((answers.answer_key(pred), ok,
                               answers.text_key(s["completion"]) if ok else None))
    return per_q


def summarize(questions: Sequence[dict], greedy: Optional[Sequence[dict]],
              sampled: Optional[Sequence[dict]], ks: Sequence[int]) -> dict:
    """Metrics JSON for one evaluation; `pass@1` is greedy accuracy when greedy ran, else the
    sampled pass@1 estimate."""
    out: dict[str, Any] = {"questions": len(questions)}
    unusable = sum(1 for q in questions if answers.parse_gold(q["answer"]) is None)
    if unusable:
        out["questions_without_gold"] = unusable
    if greedy is not None:
        per_q = grade(questions, greedy)
        out["greedy"] = {qid: bool(v and v[0][1]) for qid, v in per_q.items()}
        out["pass@1"] = sum(out["greedy"].values()) / max(len(questions), 1)
    if sampled:
        per_q = grade(questions, sampled)
        # a question with no samples (long prompt skipped, think.long_prompts) is left out of
        # pass@k (questions@k says how many count); greedy Pass@1 counts it as wrong
        n = min((len(v) for v in per_q.values() if v), default=0)
        usable = [k for k in ks if k <= n]
        s = metrics.summarize(per_q, usable)
        out.update({"n": n, "pass@k": s["pass@k"], "maj@k": s["maj@k"],
                    "sample_accuracy": s["accuracy"], "coverage": s["coverage"]})
        if "pass@1" not in out:
            out["pass@1"] = s["pass@k"].get("1")
    return out


def evaluate(params: Any, model, tokenizer, questions: Sequence[dict], cfg: EvalConfig,
             mesh=None, *, template: str, shots: Optional[Sequence[dict]] = None, seed: int = 0,
             think_cfg: Optional[ThinkConfig] = None, out_dir: Optional[str] = None,
             progress: bool = True, sampler=None) -> dict:
    """Greedy Pass@1 (if cfg.greedy) and pass@k from cfg.n samples at cfg.temperature.
    With `out_dir`, samples are kept in out_dir/greedy and out_dir/sampled (resumable).
    `sampler` (think.batch_size slots) is reused when given, else one is made."""
    base = think_cfg or ThinkConfig()
    common = dict(top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, seed=seed)
    greedy_cfg = dataclasses.replace(base, n=1, temperature=0.0, **common)
    sampled_cfg = dataclasses.replace(base, n=max(cfg.n, 1), temperature=cfg.temperature, **common)
    if sampler is None:
        sampler = think.make_sampler(model, tokenizer, greedy_cfg, mesh)
    where = lambda name: None if out_dir is None else f"{out_dir}/{name}"
    run = lambda c, name: think.think(params, model, tokenizer, questions, c, where(name), mesh,
                                      template=template, shots=shots, source="eval",
                                      sampler=sampler, progress=progress)
    greedy = run(greedy_cfg, "greedy") if cfg.greedy else None
    sampled = run(sampled_cfg, "sampled") if cfg.n > 0 else None
    return summarize(questions, greedy, sampled, cfg.k)
