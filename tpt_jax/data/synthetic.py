"""The built-in CPU task: multi-step arithmetic word problems, generated deterministically.

Why it exists: the whole Think -> Prune -> Train loop must run on a laptop CPU in minutes with
nothing downloaded. GSM8K needs a 2B model; this task is GSM8K in miniature, so the same prompt
templates, `#### N` answer parsing, calculator checks and pruning code apply unchanged.

A problem is a person, an item, a starting count and 1..MAX_STEPS operations on it:

    Question: Mia has 7 apples. She buys 3 more. Then she doubles them. Later she gives 2 to
    Tom. How many apples does Mia have now?
    Solution: She buys 3: <<7+3=10>>10
              Then she doubles: <<10*2=20>>20
              Later she gives 2: <<20-2=18>>18
              #### 18

Operations: add 1..3 (buys/finds/gets N more), subtract 1..3 (gives N to X / loses N / sells N),
double, triple, halve; values stay in 0..MAX_VALUE. Prompts are <= 48 tokens and solutions
<= 64 with the builtin tokenizer.

Why this shape (measured with a 0.3M-parameter Gemma2, 2 layers, on 200 seed solutions):
- Each step's sentence starts with its own connector (-, Then, Later) and the solution line
  repeats it, so finding the next sentence is a copy, not a count: this alone took round 0
  from 12% to 22% greedy.
- Small amounts keep addition and subtraction close to lookups. With amounts up to 9 the
  round-0 model got 14% of +/- steps right and stayed there over rounds (its own samples only
  repeated facts it knew); with amounts up to 3 it starts at ~33% and climbs with every round.
- One to three steps: the round-0 model solves ~60% of one-step, ~20% of two-step and ~7% of
  three-step problems, so greedy Pass@1 starts near 30% and has room to grow (prototype:
  30 -> 38 -> 44 -> 48% over three TPT rounds).

Splits: `train` and `test` partition the space of questions by a hash of the question text, so
they never share a question whatever their sizes; `seed` (worked solutions for the round-0
fine-tune) draws from the train side with its own random stream. Everything is a pure function
of (split, n, seed): the same arguments give the same records on every machine.
"""
from __future__ import annotations

import hashlib
import random

from tpt_jax.config import TptError

MAX_STEPS = 3
MAX_VALUE = 40
MAX_START = 20
MAX_AMOUNT = 3  # added/subtracted amounts: larger ones stall a tiny model (see above)
MAX_DOUBLE, MAX_TRIPLE, MAX_HALVE = 20, 12, 40  # keep products and halves small facts
TEST_FRACTION = 0.2  # share of the question space reserved for the test split

NAMES = [("Mia", "She"), ("Sam", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"),
         ("Max", "He"), ("Lily", "She"), ("Ben", "He"), ("Emma", "She"), ("Jack", "He")]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps", "marbles",
         "cookies"]
# Each step's sentence starts with its own connector, and the solution line repeats it, so
# finding "the next sentence" is a copy, not a count.
CONNECTORS = ["", "Then", "Later"]
FRIENDS = ["Tom", "Ann", "Kim", "Bob", "Eve", "Dan"]
ADD_VERBS = ["buys", "finds", "gets"]
SUB_VERBS = ["gives", "loses", "sells"]


def _step(rng: random.Random, value: int) -> tuple[str, str, int, str]:
    """One operation on `value`: (sentence predicate, solution label, new value, expression)."""
    ops = []
    if value + MAX_AMOUNT <= MAX_VALUE:
        ops.append("add")
    if value >= 1:
        ops.append("sub")
    if 2 <= value <= MAX_DOUBLE:
        ops.append("double")
    if 2 <= value <= MAX_TRIPLE:
        ops.append("triple")
    if 4 <= value <= MAX_HALVE and value % 2 == 0:
        ops.append("half")
    op = rng.choice(ops)
    if op == "add":
        b = rng.randint(1, MAX_AMOUNT)
        verb = rng.choice(ADD_VERBS)
        return f"{verb} {b} more.", f"{verb} {b}", value + b, f"{value}+{b}"
    if op == "sub":
        b = rng.randint(1, min(MAX_AMOUNT, value))
        verb = rng.choice(SUB_VERBS)
        tail = f" to {rng.choice(FRIENDS)}" if verb == "gives" else ""
        return f"{verb} {b}{tail}.", f"{verb} {b}", value - b, f"{value}-{b}"
    if op == "double":
        return "doubles them.", "doubles", value * 2, f"{value}*2"
    if op == "triple":
        return "triples them.", "triples", value * 3, f"{value}*3"
    friend = rng.choice(FRIENDS)
    return f"gives half to {friend}.", "gives half", value // 2, f"{value}/2"


def make_problem(rng: random.Random, steps: int) -> dict:
    """One problem with `steps` operations: {"question", "answer" (worked solution), "final"}."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(2, MAX_START)
    sentences = [f"{name} has {value} {item}."]
    lines = []
    for i in range(steps):
        sentence, label, new, expr = _step(rng, value)
        lead = CONNECTORS[min(i, len(CONNECTORS) - 1)]
        subject = f"{lead} {pronoun.lower()}" if lead else pronoun
        sentences.append(f"{subject} {sentence}")
        lines.append(f"{subject} {label}: <<{expr}={new}>>{new}")
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"#### {value}")
    return {"question": " ".join(sentences), "answer": "\n".join(lines), "final": str(value),
            "steps": steps}


def _is_test(question: str) -> bool:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big")
    return h < TEST_FRACTION * 2**32


def _generate(stream: str, side: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"tpt-synthetic/{seed}/{stream}")
    out, seen = [], set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise TptError(f"synthetic: could not draw {n} distinct {stream} questions")
        p = make_problem(rng, rng.randint(1, MAX_STEPS))
        q = p["question"]
        if q in seen or _is_test(q) != (side == "test"):
            continue
        seen.add(q)
        out.append(p)
    return out


def synthetic_split(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` problems of split train | test | seed as dataset records with stable ids.

    Records: {"id": "synthetic-<split>-00042", "question", "answer" (worked solution ending in
    `#### N`), "steps"}."""
    if split not in ("train", "test", "seed"):
        raise ValueError(f"synthetic split must be train, test or seed, got {split!r}")
    side = "test" if split == "test" else "train"
    probs = _generate(split, side, n, seed)
    return [{"id": f"synthetic-{split}-{i:05d}", "question": p["question"], "answer": p["answer"],
             "steps": p["steps"]} for i, p in enumerate(probs)]


def seed_solutions(n: int = 200, seed: int = 0) -> list[dict]:
    """Worked solutions for the round-0 fine-tune (the weak starting model)."""
    return synthetic_split("seed", n, seed)

