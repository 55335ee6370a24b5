"""Replay budget mode's choice of samples on a Think folder where every question has all its
samples drawn, to compare orders of the waves without sampling again (docs/budget.md).

    tpt think --dataset train.jsonl --checkpoint RUN/r00/params --n 16 ... --out n16
    python docs/budget_replay.py n16 --dataset train.jsonl [--n 4] [--n-max 16]

A question's sample j is the same whichever order draws it (it depends only on seed, question
and sample), so the folder answers what any order would have found. The budget is what
uniform n=4 decodes; both orders run through `budget.Waves`, over all questions at once (one
share), starting from one sample a question: "equal samples" (fewest samples first, the order
before this study) and "equal tokens" (fewest tokens first, the order `Waves.next` uses).
Prints coverage (questions with a candidate) for each, as a JSON line.
"""
import argparse
import json

from tpt_jax import io as tio
from tpt_jax.config import PruneConfig
from tpt_jax.stages import budget, prune, think
from tpt_jax.stages.answers import parse_gold


class EqualSamples(budget.Waves):
    """The order before: every unsettled question's next sample, fewest samples first."""

    def next(self):
        return sorted(self.open_questions(),
                      key=lambda q: (len(self.drawn[q]), q))[:self.affordable()]


def replay(kind, rule, samples, n_max, budget_tokens, max_new):
    waves = kind(rule, n_max, budget_tokens, max_new)
    wave = list(range(len(samples)))
    while wave:
        recs = [[samples[q][len(waves.drawn[q])]] for q in wave]
        waves.add(wave, recs, sum(int(r[0]["tokens"]) for r in recs))
        wave = [q for q in waves.next() if len(waves.drawn[q]) < len(samples[q])]
    covered = sum(f >= 1 for f in waves.found) / len(samples)
    return {"coverage": round(100 * covered, 2), "tokens": waves.tokens,
            "samples": sum(map(len, waves.drawn))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("samples", help="a `tpt think` folder with n >= n-max samples a question")
    ap.add_argument("--dataset", required=True, help="the questions' JSONL (id, answer)")
    ap.add_argument("--n", type=int, default=4, help="uniform's samples a question")
    ap.add_argument("--n-max", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=72)
    args = ap.parse_args()
    golds = {str(r["id"]): r["answer"] for _, r in tio.read_jsonl(args.dataset)}
    by_q = {}
    for rec in think.read_samples(args.samples):
        by_q.setdefault(str(rec["id"]), {})[rec["sample"]] = rec
    ids = sorted(by_q)
    samples = [[by_q[q][j] for j in sorted(by_q[q])] for q in ids]
    gold = [parse_gold(golds[q]) for q in ids]
    rule = prune.StopRule(PruneConfig(max_examples=None), 1, gold)
    uniform = sum(int(r["tokens"]) for s in samples for r in s[:args.n])
    covered = sum(any(rule.candidate(r, g) for r in s[:args.n]) for s, g in zip(samples, gold))
    out = {"questions": len(ids), "budget_tokens": uniform,
           f"uniform n={args.n}": round(100 * covered / len(ids), 2)}
    for name, kind in (("equal samples", EqualSamples), ("equal tokens", budget.Waves)):
        out[name] = replay(kind, rule, samples, args.n_max, uniform, args.max_new_tokens)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
