"""Prune: verify sampled traces against gold answers and select the training examples.

One streaming pass over the sample records computes each verdict (unfinished, no answer, wrong,
correct), keeps only what selection can still use, and gathers the data metrics. Selection then
runs per question: filters (calculator, length), dedup (text or RFT equation paths), caps
(first-correct, max-k), and finally the per-round cap on examples. Every record ends up kept,
dropped for a named reason, or reported as bad input with its file and line: nothing silently.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import os
import random
import time
from collections import Counter
from typing import Iterable, Optional

from tpt_jax.stages import answers, metrics
from tpt_jax.config import PruneConfig, TptError, validate_prune
from tpt_jax.io import Skips, read_jsonl, write_json_atomic, write_jsonl_atomic

SAMPLE_FIELDS = ("id", "sample", "prompt", "completion")
DATASET_FIELDS = ("id", "answer")
# Drop reasons, in the order a sample meets them.
DROP_REASONS = ("question has no gold answer", "unfinished", "no answer", "wrong answer",
                "calculator check failed", "too short", "too long", "duplicate text",
                "duplicate equations", "over max per question", "over max examples")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A strategy string resolved into what each selection stage does."""

    calculator: bool
    dedup_text: bool
    dedup_equations: bool
    cap: Optional[int]  # per question


def make_plan(cfg: PruneConfig) -> Plan:
    validate_prune(cfg)
    steps = {s.strip() for s in cfg.strategy.split("+")}
    caps = [c for c in (1 if "first-correct" in steps else None, cfg.max_per_question)
            if c is not None]
    return Plan(calculator=cfg.calculator_check or "calculator" in steps or "rft" in steps,
                dedup_text="dedup-text" in steps,
                dedup_equations="dedup-equations" in steps or "rft" in steps,
                cap=min(caps) if caps else None)


class _Question:
    """What one question needs after the streaming pass."""

    __slots__ = ("gold", "index", "prompt", "votes", "cands", "seen", "over_cap")

    def __init__(self, gold: Optional[str], index: int):
        self.gold, self.index, self.prompt = gold, index, None
        self.votes: list = []  # (sample, src_rank, answer key, correct, solution hash)
        self.cands: list = []  # (sample, src_rank, seq, completion, extracted, tokens, prompt)
        self.seen: set = set()
        self.over_cap = 0


def norm_id(v) -> Optional[str]:
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def prune_stream(dataset: Iterable[tuple[str, dict]], samples: Iterable[tuple[str, dict, str]],
                 cfg: PruneConfig, skips: Optional[Skips] = None) -> tuple[list[dict], dict]:
    """Core of Prune. `dataset`: (where, record); `samples`: (where, record, default source),
    where `where` is 'file:line' for reports. Returns (training examples, stats)."""
    t0 = time.perf_counter()
    plan = make_plan(cfg)
    skips = skips if skips is not None else Skips()
    questions: dict[str, _Question] = {}
    for where, rec in dataset:
        qid = norm_id(rec.get("id"))
        if qid is None:
            skips.add("dataset: bad field 'id'", where)
            continue
        if qid in questions:
            skips.add("dataset: duplicate id", where)
            continue
        gold = answers.parse_gold(rec.get("answer"))
        if gold is None:
            skips.add("dataset: no usable gold answer", where)
        questions[qid] = _Question(gold, len(questions))
    usable = sum(1 for q in questions.values() if q.gold is not None)
    if not usable:
        raise TptError("the dataset has no question with a usable gold answer"
                       + (f" ({skips.summary()})" if skips.total() else ""))

    dropped = Counter()
    src_rank: dict[str, int] = {}
    per_src = {}  # source -> Counter(samples, correct, calc_wrong, with_annotations)
    verdict = functools.lru_cache(maxsize=1 << 18)(answers.is_correct)
    extract, calc_errors, fallback = answers.extract_answer, answers.calculator_errors, \
        cfg.answer_fallback
    n_records = seq = unchecked = 0
    for where, rec, default_source in samples:
        n_records += 1
        q = questions.get(norm_id(rec.get("id")))
        if q is None:
            skips.add("sample: unknown id", where)
            continue
        sample, completion, prompt = rec.get("sample"), rec.get("completion"), rec.get("prompt")
        source = rec.get("source", default_source)
        finish = rec.get("finish", "stop")
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            skips.add("sample: bad field 'sample'", where)
            continue
        if not isinstance(completion, str) or not isinstance(prompt, str):
            skips.add("sample: bad field 'completion' or 'prompt'", where)
            continue
        if not isinstance(source, str) or finish not in ("stop", "length", None):
            skips.add("sample: bad field 'source' or 'finish'", where)
            continue
        if q.gold is None:
            dropped["question has no gold answer"] += 1
            continue
        rank = src_rank.get(source)
        if rank is None:
            rank = src_rank[source] = len(src_rank)
            per_src[source] = Counter()
        key = (sample << 8) | rank if rank < 256 else (sample, rank)
        if key in q.seen:
            skips.add("sample: duplicate (id, source, sample)", where)
            continue
        q.seen.add(key)
        stats = per_src[source]
        stats["samples"] += 1
        if finish == "length":
            dropped["unfinished"] += 1
            q.votes.append((sample, rank, None, False, None))
            continue
        extracted = extract(completion, fallback)
        if extracted is None:
            dropped["no answer"] += 1
            q.votes.append((sample, rank, None, False, None))
            continue
        if not verdict(extracted, q.gold):
            dropped["wrong answer"] += 1
            q.votes.append((sample, rank, answers.answer_key(extracted), False, None))
            continue
        stats["correct"] += 1
        q.votes.append((sample, rank, "=", True, hash(answers.text_key(completion))))
        calc_ok = True
        if "<<" in completion:
            stats["with_annotations"] += 1
            if calc_errors(completion):
                stats["calc_wrong"] += 1
                calc_ok = False
        tokens = rec.get("tokens")
        reason = _filtered(completion, tokens, calc_ok, cfg, plan)
        if reason in (None, "too long") and cfg.max_tokens is not None and \
                not isinstance(tokens, int):
            unchecked += 1  # no token count given: the token limit cannot apply
        if reason is not None:
            dropped[reason] += 1
            continue
        if q.prompt is None:
            q.prompt = prompt
        cand = (sample, rank, seq, completion, extracted, tokens,
                None if prompt == q.prompt else prompt)
        seq += 1
        if plan.cap is not None and not (plan.dedup_text or plan.dedup_equations):
            # No dedup: only the `cap` best-ordered candidates can survive, keep just those.
            bisect.insort(q.cands, cand)
            if len(q.cands) > plan.cap:
                q.cands.pop()
                q.over_cap += 1
        else:
            q.cands.append(cand)

    kept = _select(questions, plan, dropped)
    sources = sorted(src_rank, key=src_rank.get)
    for src in sources:
        per_src[src]["kept"] = 0
    if cfg.max_examples is not None and len(kept) > cfg.max_examples:
        chosen = sorted(random.Random(cfg.seed).sample(range(len(kept)), cfg.max_examples))
        dropped["over max examples"] += len(kept) - len(chosen)
        kept = [kept[i] for i in chosen]
    examples = []
    for qid, q, c in kept:
        per_src[sources[c[1]]]["kept"] += 1
        ex = {"id": qid, "sample": c[0], "source": sources[c[1]],
              "prompt": q.prompt if c[6] is None else c[6],
              "completion": c[3], "extracted": c[4], "correct": True}
        if c[5] is not None:
            ex["tokens"] = c[5]
        examples.append(ex)
    stats = _stats(questions, sources, per_src, dropped, skips, cfg, plan, n_records,
                   len(examples), len({qid for qid, _, _ in kept}))
    stats["counts"]["max_tokens_unchecked"] = unchecked  # correct samples without `tokens`
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return examples, stats


def _filtered(completion: str, tokens, calc_ok: bool, cfg: PruneConfig,
              plan: Plan) -> Optional[str]:
    """Why a correct sample cannot be selected (calculator, length), or None."""
    if plan.calculator and not calc_ok:
        return "calculator check failed"
    if cfg.min_chars is not None and len(completion) < cfg.min_chars:
        return "too short"
    if (cfg.max_chars is not None and len(completion) > cfg.max_chars) or (
            cfg.max_tokens is not None and isinstance(tokens, int) and tokens > cfg.max_tokens):
        return "too long"
    return None


def stop_cap(cfg: PruneConfig) -> tuple[Optional[int], str]:
    """(k, "") when selection keeps a question's k lowest-indexed candidates (a cap, no dedup):
    samples after the k-th can never change what is kept, so Think may skip them; (None, why)
    when the strategy needs every sample."""
    plan = make_plan(cfg)
    if plan.dedup_text or plan.dedup_equations:
        return None, "its dedup compares every correct sample"
    if plan.cap is None:
        return None, "it keeps every correct sample (no per-question cap)"
    return plan.cap, ""


class StopRule:
    """Prune's selection as Think sees it (`stop_cap`'s k): `needed` checks each sample as it
    finishes and, once a question's samples 0..m-1 have all finished with k candidates among
    them, returns m: the later samples cannot change what Prune keeps."""

    def __init__(self, cfg: PruneConfig, cap: int, golds: list):
        self.cfg, self.plan, self.cap, self.golds = cfg, make_plan(cfg), cap, golds
        self.pending: list[dict] = [{} for _ in golds]  # sample -> candidate, not yet scanned
        self.scan = [[0, 0] for _ in golds]  # next sample to scan, candidates before it

    def needed(self, q: int, sample: int, rec: dict) -> Optional[int]:
        """`rec` (completion, finish, tokens) is sample `sample` of the q-th question."""
        if self.golds[q] is None:
            return None
        self.pending[q][sample] = self.candidate(rec, self.golds[q])
        at = self.scan[q]
        while at[0] in self.pending[q]:
            at[1] += self.pending[q].pop(at[0])
            at[0] += 1
            if at[1] == self.cap:
                return at[0]
        return None

    def candidate(self, rec: dict, gold: str) -> bool:
        """What `prune_stream` would make of the sample: correct and not filtered out."""
        completion = rec["completion"]
        if rec.get("finish") == "length":
            return False
        extracted = answers.extract_answer(completion, self.cfg.answer_fallback)
        if extracted is None or not answers.is_correct(extracted, gold):
            return False
        calc_ok = "<<" not in completion or not answers.calculator_errors(completion)
        return _filtered(completion, rec.get("tokens"), calc_ok, self.cfg, self.plan) is None


def _select(questions: dict, plan: Plan, dropped: Counter) -> list:
    """Per-question dedup and caps. Returns [(qid, question, candidate)] in dataset order."""
    kept = []
    for qid, q in questions.items():
        if q.over_cap:
            dropped["over max per question"] += q.over_cap
        if not q.cands:
            continue
        cands = sorted(q.cands)  # (sample, source rank, arrival): first = lowest sample index
        if plan.dedup_text:
            seen, unique = set(), []
            for c in cands:
                k = answers.text_key(c[3])
                if k in seen:
                    dropped["duplicate text"] += 1
                else:
                    seen.add(k)
                    unique.append(c)
            cands = unique
        if plan.dedup_equations:
            before = len(cands)
            cands = dedup_equations(cands, text=lambda c: c[3])
            dropped["duplicate equations"] += before - len(cands)
        if plan.cap is not None and len(cands) > plan.cap:
            dropped["over max per question"] += len(cands) - plan.cap
            cands = cands[:plan.cap]
        kept.extend((qid, q, c) for c in cands)
    return kept


def dedup_equations(items: list, text=lambda x: x) -> list:
    """RFT distinct reasoning paths: one item per equation sequence. Where several items share
    a sequence, the one with the largest summed edit distance (over words: 5x fewer steps than
    characters) to the other sequences' representatives survives, i.e. the most different
    path; with no other sequence, the first. Keys keep their first-appearance order."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(answers.equations_key(text(item)), []).append(item)
    chosen = {key: 0 for key in groups}  # index of each key's representative
    words = {key: [text(m).split() for m in members] for key, members in groups.items()}
    for key, members in groups.items():
        if len(members) < 2 or len(groups) < 2:
            continue
        others = [words[k][i] for k, i in chosen.items() if k != key]
        scores = [sum(row) for row in answers.distance_matrix(words[key], others)]
        chosen[key] = scores.index(max(scores))  # ties: the earliest
    return [groups[key][i] for key, i in chosen.items()]


def _stats(questions, sources, per_src, dropped, skips, cfg, plan, n_records, n_kept,
           n_kept_q) -> dict:
    usable = [q for q in questions.values() if q.gold is not None]
    max_n = max((len(q.votes) for q in usable), default=0)
    ks = list(cfg.metrics_k) if cfg.metrics_k else metrics.default_ks(max_n)

    def layout(q, rank=None):
        votes = sorted(v for v in q.votes if rank is None or v[1] == rank)
        return [(v[2], v[3], v[4]) for v in votes]

    def fp(c: Counter) -> dict:
        return {"correct": c["correct"], "with_annotations": c["with_annotations"],
                "calculator_wrong": c["calc_wrong"],
                "rate": c["calc_wrong"] / c["correct"] if c["correct"] else None}

    total = Counter()
    for c in per_src.values():
        total.update(c)
    pooled = {i: layout(q) for i, q in enumerate(usable) if q.votes}
    pooled_metrics = metrics.summarize(pooled, ks)
    by_source = {}
    for rank, src in enumerate(sources):
        if len(sources) == 1:
            lists, summary = pooled, pooled_metrics
        else:
            lists = {i: layout(q, rank) for i, q in enumerate(usable)}
            lists = {i: v for i, v in lists.items() if v}
            summary = metrics.summarize(lists, ks)
        # correct samples repeating another correct solution (same text) of their question
        dups = sum(len(sols) - len(set(sols)) for sols in
                   ([v[4] for v in q.votes if v[3] and v[1] == rank] for q in usable))
        by_source[src] = {"samples": per_src[src]["samples"], "correct": per_src[src]["correct"],
                          "kept": per_src[src]["kept"], "duplicates": dups,
                          "questions": len(lists),
                          "false_positive": fp(per_src[src]), "metrics": summary}
    n_samples = total["samples"]
    return {
        "strategy": cfg.strategy,
        "config": dataclasses.asdict(cfg),
        "plan": dataclasses.asdict(plan),
        "counts": {
            "dataset_rows": len(questions), "questions": len(usable),
            "questions_with_samples": len(pooled),
            "questions_with_correct": sum(1 for v in pooled.values() if any(x[1] for x in v)),
            "questions_kept": n_kept_q,
            "sample_records": n_records, "samples": n_samples, "correct": total["correct"],
            "kept": n_kept,
            "dropped": {r: dropped[r] for r in DROP_REASONS if dropped[r]},
            "bad_input": skips.total(),
        },
        "bad_input": skips.to_json(),
        "metrics": pooled_metrics,
        "false_positive": fp(total),
        "by_source": by_source,
    }


def note_early_stop(stats: dict, samples: Iterable[dict], asked: dict) -> None:
    """Early stop leaves coverage exact (a question stops only once it has a kept, so correct,
    sample) but biases what is estimated from all n samples, and so does budget mode, which
    draws more for the unsettled questions. Where any question of a source has other than
    `asked[source]` samples, its (and the pooled) pass@k, maj@k, diversity@k and accuracy
    become None; stats["early_stop"] counts the questions stopped and the samples not drawn,
    stats["budget"] (budget mode) the questions given more and the samples added."""
    drawn = Counter((r.get("source"), r.get("id")) for r in samples)
    stopped, extended, undrawn, added = Counter(), Counter(), 0, 0
    for (src, _), m in drawn.items():
        if m < asked.get(src, 0):
            stopped[src] += 1
            undrawn += asked[src] - m
        elif src in asked and m > asked[src]:
            extended[src] += 1
            added += m - asked[src]
    uneven = stopped + extended
    withheld = ([stats["metrics"]] if uneven else []) + [
        stats["by_source"][src]["metrics"] for src in uneven if src in stats["by_source"]]
    for m in withheld:
        for key in ("pass@k", "maj@k", "diversity@k"):
            m[key] = {k: None for k in m[key]}
        m["coverage@k"], m["accuracy"] = m["pass@k"], None
    stats["early_stop"] = {
        "questions_stopped": sum(stopped.values()), "samples_not_drawn": undrawn,
        "estimates": ("withheld: pass@k, maj@k, diversity@k and accuracy need the same n "
                      "samples of every question; coverage is exact") if uneven else "complete"}
    if extended:
        stats["budget"] = {"questions_extended": sum(extended.values()), "samples_added": added}


def prune_records(dataset: Iterable[dict], samples: Iterable[dict], cfg: PruneConfig,
                  source: str = "samples") -> tuple[list[dict], dict]:
    """In-memory Prune for the round loop: dataset records + sample records -> (training
    examples, stats). Bad records are reported as 'dataset[i]' / 'samples[i]'."""
    return prune_stream(((f"dataset[{i}]", r) for i, r in enumerate(dataset)),
                        ((f"samples[{i}]", r, source) for i, r in enumerate(samples)), cfg)


def prune_files(dataset_path: str, sample_paths: list[str], cfg: PruneConfig,
                out_path: Optional[str] = None, stats_path: Optional[str] = None
                ) -> tuple[list[dict], dict]:
    """Prune from JSONL files (several sample files are pooled, RFT-U); writes OUT and STATS
    atomically when given. A sample without `source` takes its file's name."""
    skips = Skips()

    def sample_items():
        for p in sample_paths:
            default = os.path.splitext(os.path.basename(str(p)))[0]
            for lineno, rec in read_jsonl(p, skips, SAMPLE_FIELDS):
                yield f"{p}:{lineno}", rec, default

    dataset = ((f"{dataset_path}:{n}", r) for n, r in read_jsonl(dataset_path, skips,
                                                                  DATASET_FIELDS))
    examples, stats = prune_stream(dataset, sample_items(), cfg, skips)
    stats["inputs"] = {"dataset": str(dataset_path), "samples": [str(p) for p in sample_paths]}
    if out_path is not None:
        write_jsonl_atomic(out_path, examples)
    if stats_path is not None:
        write_json_atomic(stats_path, stats)
    return examples, stats


def summary_line(stats: dict) -> str:
    """One log line: kept, dropped by reason, bad input by reason."""
    c = stats["counts"]
    drops = ", ".join(f"{v} {k}" for k, v in c["dropped"].items()) or "none"
    bad = "; bad input: " + ", ".join(f"{v['count']} {k}" for k, v in stats["bad_input"].items()) \
        if stats["bad_input"] else ""
    return (f"kept {c['kept']} of {c['samples']} samples ({c['questions_kept']} of "
            f"{c['questions']} questions); dropped: {drops}{bad}")
