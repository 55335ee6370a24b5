"""Compute-matched sampling: how many samples per question each of two models gets for the
same sampling budget (Bansal et al., "Smaller, Weaker, Yet Better").

Sampling one token costs about 2P FLOPs for a P-parameter model, so at equal budget
S_WC = S_SE * P_SE / P_WC: Gemma2-9B gets 3x the samples of Gemma2-27B. A price ratio (cost per
token, strong / weak) replaces the parameter ratio when the models are paid for by the token.
"""
from __future__ import annotations

import math
import re
from typing import Optional

from tpt_jax.config import TptError

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_params(text: str) -> float:
    """Parameter count from '9e9', '9B', '2.6b', '350M', or a model preset name ('gemma2-9b')."""
    t = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)", t, re.IGNORECASE)
    if m:
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    else:
        from tpt_jax.gemma.config import MODEL_PRESETS
        if t not in MODEL_PRESETS:
            raise TptError(f"cannot read parameter count {text!r}: give a number like 9e9 or 9B, "
                           f"or a preset ({', '.join(MODEL_PRESETS)})")
        value = float(MODEL_PRESETS[t].param_count())
    if not value > 0:
        raise TptError(f"parameter count must be positive, got {text!r}")
    return value


def compute_matched_samples(samples_strong: float, params_strong: float, params_weak: float
                            ) -> float:
    """S_WC = S_SE * P_SE / P_WC (fractional; floor it to stay within budget)."""
    if samples_strong < 0 or params_strong <= 0 or params_weak <= 0:
        raise ValueError("samples must be >= 0 and parameter counts > 0")
    return samples_strong * params_strong / params_weak


def samples_for_budget(budget_flops: float, params: float, questions: int,
                       tokens_per_sample: float) -> float:
    """Samples per question a budget buys: budget / (2 * P * tokens * questions)."""
    if budget_flops < 0 or params <= 0 or questions <= 0 or tokens_per_sample <= 0:
        raise ValueError("budget must be >= 0; params, questions, tokens must be > 0")
    return budget_flops / (2.0 * params * tokens_per_sample * questions)


def plan(strong: Optional[float] = None, weak: Optional[float] = None,
         samples_strong: Optional[float] = None, price_ratio: Optional[float] = None,
         budget_flops: Optional[float] = None, questions: Optional[int] = None,
         tokens_per_sample: float = 256.0) -> dict:
    """Samples per question for the strong (SE) and weak (WC) model at matched compute.

    Either `samples_strong` (SE's samples; WC gets the matched number) or `budget_flops` with
    `questions` (both get what the budget buys). `price_ratio` (SE cost / WC cost per token)
    can stand in for the two parameter counts when only samples_strong is given."""
    if price_ratio is not None:
        if price_ratio <= 0:
            raise TptError(f"price ratio must be > 0, got {price_ratio}")
        ratio = float(price_ratio)
    elif strong is not None and weak is not None:
        ratio = strong / weak
    else:
        raise TptError("give both parameter counts (--strong, --weak) or --price-ratio")
    if samples_strong is not None:
        if samples_strong < 0:
            raise TptError(f"samples must be >= 0, got {samples_strong}")
        s_se = float(samples_strong)
    elif budget_flops is not None:
        if strong is None or not questions:
            raise TptError("a FLOPs budget needs --strong, --weak and --questions")
        s_se = samples_for_budget(budget_flops, strong, questions, tokens_per_sample)
    else:
        raise TptError("give --samples-strong or --budget-flops with --questions")
    s_wc = s_se * ratio
    out = {"ratio": ratio, "strong": {"samples_per_question": s_se, "samples": math.floor(s_se)},
           "weak": {"samples_per_question": s_wc, "samples": math.floor(s_wc + 1e-9)}}
    if strong is not None and weak is not None:
        out["strong"]["params"], out["weak"]["params"] = strong, weak
        if questions:
            for side, p, s in (("strong", strong, s_se), ("weak", weak, s_wc)):
                out[side]["flops"] = 2.0 * p * tokens_per_sample * questions * s
    return out
