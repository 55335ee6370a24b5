"""`tpt bench prune`: records/s of `tpt prune` end to end (read, verify, select, write) on
synthetic GSM8K-shaped samples; one JSON line."""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time

from tpt_jax.config import PruneConfig
from tpt_jax.stages.prune import prune_files


_FILLER = ["Let me read the question carefully and work it out step by step.",
           "First I need to find out how many apples Tom gets in each round.",
           "The question asks for the total number of apples at the end.",
           "I will add the two amounts first and then multiply by the rounds.",
           "It helps to write every intermediate result down before going on.",
           "Each round is the same, so multiplication is the right operation.",
           "Now I can combine these numbers to reach the final result.",
           "Checking the arithmetic once more before giving the answer."]


def write_synthetic(directory: str, records: int, per_question: int = 16, seed: int = 0
                    ) -> tuple[str, str]:
    """GSM8K-shaped dataset + samples (~400 characters): calculator annotations, three
    reasoning paths, a mix of `####`, 'The answer is' and \\boxed answers, 50% wrong answers,
    3% right answers over a wrong step, 5% without an answer, 2% unfinished."""
    rng = random.Random(seed)
    nq = max(1, math.ceil(records / per_question))
    ds_path, s_path = os.path.join(directory, "dataset.jsonl"), os.path.join(directory, "s.jsonl")
    golds = []
    with open(ds_path, "w") as f:
        for i in range(nq):
            a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
            golds.append((a, b, c, (a + b) * c))
            f.write(json.dumps({"id": f"q{i}", "question": f"Tom has {a} apples and buys {b} "
                                f"more, {c} times over. How many?",
                                "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n"
                                          f"{a + b}*{c}=<<{a + b}*{c}={(a + b) * c}>>"
                                          f"{(a + b) * c}\n#### {(a + b) * c:,}"}) + "\n")
    with open(s_path, "w") as f:
        for r in range(records):
            i, s = divmod(r, per_question)
            a, b, c, ans = golds[i]
            u = rng.random()
            shown = ans if u < 0.5 else ans + rng.randint(1, 9)
            slip = a + b + (1 if u < 0.03 else 0)  # a wrong step under a right answer: 3%
            path = s % 3  # three reasoning paths, so RFT dedup has collisions to resolve
            if path == 0:
                body = (f"Tom starts with {a} apples and buys {b}, so {a}+{b}=<<{a}+{b}={slip}>>"
                        f"{a + b}. Repeated {c} times: {a + b}*{c}=<<{a + b}*{c}={shown}>>{shown}.")
            elif path == 1:
                body = (f"Each round gives {a}*{c}=<<{a}*{c}={a * c}>>{a * c} and {b}*{c}="
                        f"<<{b}*{c}={b * c}>>{b * c}, total <<{a * c}+{b * c}={shown}>>{shown}.")
            else:
                body = (f"Sample {s}: first {b}+{a}=<<{b}+{a}={slip}>>{a + b} apples per round, "
                        f"then {c}*{a + b}=<<{c}*{a + b}={shown}>>{shown} after {c} rounds.")
            body = " ".join(rng.sample(_FILLER, 3)) + "\n" + body  # ~400 characters in all
            ending = ("#### {:,}", "The answer is ${}.", "So \\boxed{{{}}}.")[r % 3].format(shown)
            f.write(json.dumps({"id": f"q{i}", "sample": s, "source": "synthetic",
                                "prompt": f"Question {i}: solve step by step.",
                                "completion": body + "\n" + (ending if u < 0.95 else "Done."),
                                "finish": "length" if u > 0.98 else "stop",
                                "tokens": 60 + s}) + "\n")
    return ds_path, s_path


def bench_prune(args) -> int:
    """`tpt bench prune`: time `tpt prune` end to end (read, verify, select, write) on
    synthetic records; prints one JSON line."""
    cfg = PruneConfig(strategy=args.strategy, max_examples=None,
                      max_per_question=args.max_per_question)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t = time.perf_counter()
        ds, sp = write_synthetic(tmp, args.records, args.per_question)
        gen_s = time.perf_counter() - t
        t, cpu = time.perf_counter(), time.process_time()
        examples, stats = prune_files(ds, [sp], cfg, os.path.join(tmp, "out.jsonl"),
                                      os.path.join(tmp, "stats.json"))
        secs, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(json.dumps({"bench": "prune", "records": args.records, "seconds": round(secs, 2),
                      "records_per_s": round(args.records / secs),
                      "cpu_seconds": round(cpu, 2), "kept": len(examples),
                      "correct": stats["counts"]["correct"], "strategy": args.strategy,
                      "per_question": args.per_question, "generate_seconds": round(gen_s, 2)}))
    return 0


def add_bench_cli(parser) -> None:
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--per-question", type=int, default=16)
    parser.add_argument("--strategy", default="first-correct")
    parser.add_argument("--max-per-question", type=int)
    parser.add_argument("--workdir", help="where the synthetic files go (default: system tmp)")
    parser.set_defaults(func=bench_prune)
