"""`tpt budget`: compute-matched samples per question for a stronger and a weaker model
(`methods.planner`), printed as one JSON line."""
from __future__ import annotations

import json

from tpt_jax.methods.planner import parse_params, plan


def _budget(args) -> int:
    strong = parse_params(args.strong) if args.strong else None
    weak = parse_params(args.weak) if args.weak else None
    print(json.dumps(plan(strong, weak, args.samples_strong, args.price_ratio,
                          args.budget_flops, args.questions, args.tokens_per_sample)))
    return 0


def add_cli(parser) -> None:
    parser.add_argument("--strong", help="stronger, more expensive model (SE): params (27B, 2.7e10) "
                        "or preset name")
    parser.add_argument("--weak", help="weaker, cheaper model (WC): params or preset name")
    parser.add_argument("--price-ratio", type=float, help="cost per token SE / WC, instead of params")
    parser.add_argument("--samples-strong", type=float, help="samples per question for SE")
    parser.add_argument("--budget-flops", type=float, help="total sampling budget in FLOPs")
    parser.add_argument("--questions", type=int, help="number of questions (with --budget-flops)")
    parser.add_argument("--tokens-per-sample", type=float, default=256.0,
                        help="average sampled tokens per sample (default 256)")
    parser.set_defaults(func=_budget)
