"""Budget mode: a round's Think budget (decoded tokens) spent where Prune still needs samples.

Think draws in waves. The first gives every question think.n samples (with early stop where it
is on); each later wave gives one more sample to the questions that Prune's rule has not
settled (fewer than k candidates, `prune.stop_cap`) and that have cost the fewest tokens so
far, up to think.n_max, and only as many as the budget left could pay for if every sample ran
to max_new_tokens: the budget is never exceeded. Tokens, not samples, are what a question is
given an equal share of: a question whose samples are short is cheap to sample again and, on
reasoning tasks, more often within reach, so the budget buys more coverage there (on the CPU
task, +5.5 points over uniform n=4 in round 1 where equal samples gave +2.7; docs/budget.md).
Sample j of a question is the sample a uniform run draws at index j (the engine's
`first_sample`), a wave depends only on the samples before it, and each shard
spends a fixed share of the budget, so a shard's samples do not depend on what ran before it:
a killed run samples its unfinished shard again to the same records.
"""
from __future__ import annotations

from typing import Optional, Sequence

from tpt_jax.config import ConfigError, PruneConfig, ThinkConfig, field_name, validate_budget
from tpt_jax.stages import prune as PR


def check(cfg: ThinkConfig, prune: Optional[PruneConfig], questions: int,
          where: str = "think.") -> Optional[int]:
    """Budget mode's k (the candidates that settle a question), or None when it is off: no
    budget, or no Prune settings (Eval and synthesis sample with Think's settings, settling
    nothing); a one-line ConfigError for settings it cannot work with (`tpt run` checks every
    round's before round 0; `where` as in `config.validate_budget`)."""
    if cfg.budget_tokens is None or prune is None:
        return None
    validate_budget(cfg, where)
    n, tokens, longest = (field_name(where, f) for f in ("n", "budget_tokens", "max_new_tokens"))
    cap, why = PR.stop_cap(prune)
    if cap is None:
        raise ConfigError(f"{tokens}: prune.strategy {prune.strategy} cannot settle a question "
                          f"({why}); budget mode needs first-correct or max-k")
    first = questions * cfg.n * cfg.max_new_tokens
    if cfg.budget_tokens < first:
        raise ConfigError(f"{tokens} must cover {n}={cfg.n} samples of each of {questions} "
                          f"questions at {longest}={cfg.max_new_tokens} ({first}), got "
                          f"{cfg.budget_tokens}")
    return cap


def shares(budget: int, sizes: Sequence[int]) -> list[int]:
    """Each shard's fixed part of the budget, in proportion to its questions (differences of
    floored running totals: they add up to the budget, and a shard of m questions gets at
    least floor(budget * m / total))."""
    total, out, done, before = sum(sizes), [], 0, 0
    for m in sizes:
        done += m
        cut = budget * done // total if total else 0
        out.append(cut - before)
        before = cut
    return out


class Waves:
    """One shard's samples in budget mode: `add` records a wave, `next` picks the next one."""

    def __init__(self, rule: PR.StopRule, n_max: int, share: int, max_new_tokens: int):
        self.rule, self.n_max, self.share, self.max_new_tokens = rule, n_max, share, max_new_tokens
        self.drawn: list[list[dict]] = [[] for _ in rule.golds]  # per question, sample order
        self.found = [0] * len(rule.golds)  # candidates among them
        self.cost = [0] * len(rule.golds)  # tokens its samples decoded
        self.tokens = 0  # decoded, cancelled samples' included (`Stats.sampled_tokens`)

    def add(self, questions: Sequence[int], outs: Sequence[list[dict]], tokens: int) -> None:
        """questions[i] got records outs[i], its next samples in order; `tokens` decoded."""
        for q, recs in zip(questions, outs):
            self.drawn[q] += recs
            self.cost[q] += sum(int(r["tokens"]) for r in recs)
            gold = self.rule.golds[q]
            if gold is not None:
                self.found[q] += sum(self.rule.candidate(r, gold) for r in recs)
        self.tokens += tokens

    def open_questions(self) -> list[int]:
        """Unsettled questions under n_max (a question Prune keeps nothing for never is)."""
        return [q for q, gold in enumerate(self.rule.golds) if gold is not None and
                self.found[q] < self.rule.cap and len(self.drawn[q]) < self.n_max]

    def affordable(self) -> int:
        """Samples the budget left pays for at max_new_tokens a sample."""
        return max(0, (self.share - self.tokens) // self.max_new_tokens)

    def next(self) -> list[int]:
        """The next wave's questions, one sample each: the open ones whose samples have cost
        at most one sample's max_new_tokens more than the cheapest open question's, cheapest
        first, then in shard order, as many as the budget left pays for."""
        open_ = self.open_questions()
        if not open_:
            return []
        level = min(self.cost[q] for q in open_) + self.max_new_tokens
        wave = sorted((q for q in open_ if self.cost[q] <= level), key=lambda q: (self.cost[q], q))
        return wave[:self.affordable()]
