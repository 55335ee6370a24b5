"""`tpt prune`: verify sample files against a dataset's gold answers and write the selected
training examples and their stats."""
from __future__ import annotations

import logging

from tpt_jax.config import PruneConfig, TptError
from tpt_jax.io import check_writable_file
from tpt_jax.stages.prune import prune_files, summary_line

log = logging.getLogger(__name__)


def _config_from_args(args) -> PruneConfig:
    return PruneConfig(strategy=args.strategy, max_per_question=args.max_per_question,
                       calculator_check=args.calculator_check,
                       max_examples=None if args.max_examples == 0 else args.max_examples,
                       seed=args.seed, min_chars=args.min_chars, max_chars=args.max_chars,
                       max_tokens=args.max_tokens, answer_fallback=args.answer_fallback,
                       metrics_k=args.k)


def _run(args) -> int:
    check_writable_file(args.out, "--out")
    check_writable_file(args.stats, "--stats")
    cfg = _config_from_args(args)
    if "influence" in {x.strip() for x in cfg.strategy.split("+")}:
        raise TptError("prune step 'influence' needs the model's gradients: use it through "
                       "`tpt run` (prune.strategy), or tpt_jax.methods.influence.select_by_influence")
    _, stats = prune_files(args.dataset, args.samples, cfg, args.out, args.stats)
    log.info("prune: %s (%.1fs)", summary_line(stats), stats["seconds"])
    return 0


def add_cli(parser) -> None:
    d = PruneConfig()
    parser.add_argument("--dataset", required=True, help="dataset JSONL (id, question, answer)")
    parser.add_argument("--samples", required=True, nargs="+",
                        help="sample JSONL files; several are pooled before selection (RFT-U)")
    parser.add_argument("--strategy", default=d.strategy,
                        help="steps joined with '+': first-correct | all-correct | max-k | "
                             "dedup-text | dedup-equations | calculator | rft "
                             f"(default {d.strategy})")
    parser.add_argument("--out", required=True, help="training examples JSONL")
    parser.add_argument("--stats", required=True, help="stats JSON")
    parser.add_argument("--max-per-question", type=int, help="K for max-k; caps any strategy")
    parser.add_argument("--calculator-check", action="store_true",
                        help="drop traces with a wrong <<lhs=rhs>> annotation")
    parser.add_argument("--max-examples", type=int, default=d.max_examples,
                        help=f"random subset of at most N examples (default {d.max_examples}; "
                             "0 = no cap)")
    parser.add_argument("--seed", type=int, default=d.seed)
    for name in ("--min-chars", "--max-chars", "--max-tokens"):
        parser.add_argument(name, type=int, help="length limit on the completion")
    parser.add_argument("--answer-fallback", action="store_true",
                        help="accept the last number when no answer marker is found")
    parser.add_argument("--k", type=int, nargs="+", help="k values for pass@k, maj@k, "
                                                         "diversity@k (default 1, 2, 4, ... n)")
    parser.set_defaults(func=_run)
