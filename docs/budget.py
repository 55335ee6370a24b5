"""Table and figure of docs/budget.md from two CPU-default run directories: uniform n=4
(every sample drawn) and budget mode at the same decoded Think tokens per round.

    python docs/budget.py [--runs runs] [--suffixes "" s1] [--png docs/budget.png]

reads RUNS/uniform and RUNS/budget, then RUNS/uniform-S and RUNS/budget-S for each further
suffix S (s1: the second seed; calc: both arms with prune.calculator_check): metrics.json (greedy Pass@1, pass@k, coverage, Think
tokens and wall time per round) and each round's samples (samples per question, and the
index of each question's first correct sample, verified as Prune does; each kept example's
calculator check), prints the markdown tables and writes the figure (coverage, greedy Pass@1, samples per question).
"""
import argparse
import collections
import json
import os

from tpt_jax.config import PruneConfig
from tpt_jax.plotting import save_png
from tpt_jax.stages import prune, think

ARMS = (("uniform", "uniform n=4", "tab:blue"), ("budget", "budget mode", "tab:orange"))


def load(path):
    with open(os.path.join(path, "metrics.json")) as f:
        return json.load(f)


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def sampled(run, r, answers):
    """Round r's samples per question, and each question's first correct sample index (None
    when it has none), with first-correct's verifier."""
    rule = prune.StopRule(PruneConfig(), 1, [])
    drawn, first = collections.Counter(), {}
    for rec in think.read_samples(os.path.join(run, f"r{r:02d}", "samples")):
        q = rec["id"]
        drawn[q] += 1
        gold = answers.get(q)
        if gold is not None and rule.candidate(rec, gold):
            first[q] = min(first.get(q, rec["sample"]), rec["sample"])
    return drawn, first


def kept_false_positive(run, r):
    """Share of the round's kept training examples whose right answer comes with a wrong
    `<<a op b=c>>` step."""
    from tpt_jax.stages.answers import calculator_ok
    with open(os.path.join(run, f"r{r:02d}", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sum(not calculator_ok(x["completion"]) for x in rows) / max(1, len(rows))


def wrong_steps_by_index(label, runs):
    """Share of kept examples with a wrong step, by the index of the kept sample."""
    from tpt_jax.stages.answers import calculator_ok
    for r in range(1, len(runs["uniform"][1])):
        for arm, name, _ in ARMS:
            with open(os.path.join(runs[arm][0], f"r{r:02d}", "train.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            cells = []
            for lo, hi in ((0, 1), (1, 4), (4, None)):
                sel = [x for x in rows if lo <= x["sample"] and (hi is None or x["sample"] < hi)]
                wrong = sum(not calculator_ok(x["completion"]) for x in sel)
                cells.append(f"{pct(wrong / len(sel))} ({len(sel)})" if sel else "-")
            print(f"| {label} | {r} | {name.split()[0]} | {' | '.join(cells)} |")


def golds(run):
    """Gold answers of the run's training questions (rebuilt from its config)."""
    from tpt_jax.config import from_dict, RunConfig
    from tpt_jax.data.sources import load_split
    from tpt_jax.stages.answers import parse_gold
    with open(os.path.join(run, "config.json")) as f:
        cfg = from_dict(RunConfig, json.load(f), "config")
    return {str(q["id"]): parse_gold(q["answer"]) for q in load_split(cfg.data, "train")}


def table(runs, answers):
    print("| round | arm | Think tokens | samples | per question (min-max) | coverage | "
          "first correct at index >= 4 | train examples | ... with a wrong step | "
          "greedy Pass@1 | pass@1 | pass@4 | Think s |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    spread = {}
    for r in range(1, len(runs["uniform"][1])):
        for arm, label, _ in ARMS:
            path, metrics = runs[arm]
            m = metrics[r]
            drawn, first = sampled(path, r, answers)
            spread[arm, r] = drawn
            counts = drawn.values()
            late = sum(j >= 4 for j in first.values())
            pk = m.get("pass@k") or {}
            print(f"| {r} | {label} | {m['think_tokens']:,} | {sum(counts):,} | "
                  f"{min(counts)}-{max(counts)} | {pct(m['coverage'])} | {late} | "
                  f"{m['train_examples']} | {pct(kept_false_positive(path, r))} | "
                  f"{pct(m['pass@1'])} | {pct(pk.get('1'))} | "
                  f"{pct(pk.get('4'))} | {m['wall_s'].get('think', 0):.0f} |")
    return spread


def plot(seeds, out):
    """seeds: [(label, runs, spread)], as `main` gathers them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for (seed, runs, _), style in zip(seeds, ("-", "--", ":")):
        for arm, label, color in ARMS:
            metrics = runs[arm][1]
            rounds = [m["round"] for m in metrics]
            axes[0].plot(rounds[1:], [100 * m["coverage"] for m in metrics[1:]], style,
                         marker="o", color=color, label=f"{label}, {seed}")
            axes[1].plot(rounds, [100 * m["pass@1"] for m in metrics], style, marker="o",
                         color=color, label=f"{label}, {seed}")
    axes[0].set_title("coverage: training questions with a correct sample (%)", fontsize=9)
    axes[1].set_title("greedy Pass@1, 500 test questions (%)", fontsize=9)
    spread = seeds[0][2]
    for r, style in zip(range(1, 4), ("-", "--", ":")):
        drawn = spread.get(("budget", r))
        if drawn:
            hist = collections.Counter(drawn.values())
            xs = sorted(hist)
            axes[2].plot(xs, [hist[x] for x in xs], style, marker=".", color="tab:orange",
                         label=f"round {r}")
    axes[2].set_yscale("log")
    axes[2].set_title(f"budget mode, {seeds[0][0]}: questions by samples drawn", fontsize=9)
    axes[2].set_xlabel("samples of the question", fontsize=8)
    rounds = len(seeds[0][1]["uniform"][1])
    axes[0].set_xticks(range(1, rounds))
    axes[1].set_xticks(range(rounds))
    for ax in axes[:2]:
        ax.set_xlabel("round", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("CPU default: uniform n=4 vs budget mode (n=1, n_max=16) at the same Think "
                 "tokens per round", fontsize=10)
    print(f"\nwrote {save_png(fig, out)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--suffixes", nargs="+", default=[""])
    ap.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "budget.png"))
    args = ap.parse_args()
    seeds, answers = [], None
    for i, suffix in enumerate(args.suffixes):
        s = f"-{suffix}" if suffix else ""
        runs = {arm: (os.path.join(args.runs, arm + s), load(os.path.join(args.runs, arm + s)))
                for arm, _, _ in ARMS}
        answers = answers or golds(runs["uniform"][0])
        label = f"seed {i}" if suffix in ("", f"s{i}") else suffix
        print(f"\n{label} ({args.runs}/uniform{s}, {args.runs}/budget{s})\n")
        seeds.append((label, runs, table(runs, answers)))
    print("\nkept examples with a wrong step (%), by the index of the kept sample (how many)\n")
    print("| seed | round | arm | index 0 | 1-3 | >= 4 |")
    print("|---:|---:|---|---:|---:|---:|")
    for label, runs, _ in seeds:
        wrong_steps_by_index(label, runs)
    plot(seeds, args.png)


if __name__ == "__main__":
    main()
