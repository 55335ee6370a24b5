"""The built-in CPU task: multi-step arithmetic word problems, generated deterministically.

Why it exists: the whole Think -> Prune -> Train loop must run on a laptop CPU in minutes with
nothing downloaded. GSM8K needs a 2B model; this task is GSM8K in miniature, so the same prompt
templates, `#### N` answer parsing, calculator checks and pruning code apply unchanged.

A problem is a person, an item, a starting count and 1..MAX_STEPS operations on it:

    Question: Mia has 7 apples. She buys 5 more. Then she gives 3 to Sam. How many apples
    does Mia have now?
    Solution: buys 5: <<7+5=12>>12
              gives 3: <<12-3=9>>9
              #### 9

Operations: add (buys/finds/gets N more), subtract (gives N to X / loses N / sells N),
double, triple, halve. Every intermediate value stays in 0..MAX_VALUE, so the arithmetic is a
small table of facts a tiny model can partly learn from a few hundred seed solutions and learn
better from its own correct samples. Difficulty grows with the number of steps, which is what
leaves room to improve over rounds.

Splits: `train` and `test` partition the space of questions by a hash of the question text, so
they never share a question whatever their sizes; `seed` (worked solutions for the round-0
fine-tune) draws from the train side with its own random stream. Everything is a pure function
of (split, n, seed): the same arguments give the same records on every machine.
"""
from __future__ import annotations

import hashlib
import random

MAX_STEPS = 3
MAX_VALUE = 99
MAX_AMOUNT = 9  # added/subtracted amounts are single digits
MAX_DOUBLE, MAX_TRIPLE, MAX_HALVE = 20, 12, 40  # keep products and halves small facts
TEST_FRACTION = 0.2  # share of the question space reserved for the test split

NAMES = [("Mia", "She"), ("Sam", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"),
         ("Max", "He"), ("Lily", "She"), ("Ben", "He"), ("Emma", "She"), ("Jack", "He")]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps", "marbles",
         "cookies"]
FRIENDS = ["Tom", "Ann", "Kim", "Bob", "Eve", "Dan"]
ADD_VERBS = ["buys", "finds", "gets"]
SUB_VERBS = ["gives", "loses", "sells"]


def _step(rng: random.Random, value: int, pronoun: str) -> tuple[str, str, int, str]:
    """One operation applied to `value`: (question sentence, solution label, new value, expr)."""
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
        return f"{pronoun} {verb} {b} more.", f"{verb} {b}", value + b, f"{value}+{b}"
    if op == "sub":
        b = rng.randint(1, min(MAX_AMOUNT, value))
        verb = rng.choice(SUB_VERBS)
        tail = f" to {rng.choice(FRIENDS)}" if verb == "gives" else ""
        return f"{pronoun} {verb} {b}{tail}.", f"{verb} {b}", value - b, f"{value}-{b}"
    if op == "double":
        return f"{pronoun} doubles them.", "doubles", value * 2, f"{value}*2"
    if op == "triple":
        return f"{pronoun} triples them.", "triples", value * 3, f"{value}*3"
    friend = rng.choice(FRIENDS)
    return f"{pronoun} gives half to {friend}.", "gives half", value // 2, f"{value}/2"


def make_problem(rng: random.Random, steps: int) -> dict:
    """One problem with `steps` operations: {"question", "answer" (worked solution), "final"}."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    lines = []
    for i in range(steps):
        sentence, label, new, expr = _step(rng, value, pronoun)
        if i > 0:
            sentence = "Then " + sentence[0].lower() + sentence[1:]
        sentences.append(sentence)
        lines.append(f"{label}: <<{expr}={new}>>{new}")
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
            raise RuntimeError(f"synthetic: could not draw {n} distinct {stream} questions")
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


def tokenizer_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Text the builtin tokenizer is trained on: questions and solutions of every split."""
    texts = []
    for split in ("train", "test"):
        for r in synthetic_split(split, n // 2, seed):
            texts.append(r["question"])
            texts.extend(r["answer"].split("\n"))
    return texts
