"""Tables and figure of docs/compute_matched.md from the run directories: the strong model
(`cpu-tiny`) trained on its own samples (self-improvement, SE) and on a weaker model's
compute-matched samples (weak-to-strong, W2S), one or more seeds each.

    python docs/compute_matched.py [--runs runs] [--suffixes "" s1] [--png docs/compute_matched.png]

reads RUNS/self, RUNS/w2s and RUNS/weak (if there), then RUNS/self-S, ... for each suffix S (the
second seed: s1; the all-correct runs: `--suffixes all`), prints the markdown
tables and writes the 2x2 figure (greedy Pass@1, pass@4, training-data coverage and diversity
per round). The last column (false positives among the kept examples) is computed here from
rNN/train.jsonl; everything else is read from metrics.json (which holds rNN/data_quality.json).
"""
import argparse
import json
import os


def load(path):
    with open(os.path.join(path, "metrics.json")) as f:
        return json.load(f)


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def at(d, k):
    return (d or {}).get(str(k))


def source_row(rec):
    """The round's one data source (both arms have exactly one)."""
    (name, e), = rec["data_quality"]["by_source"].items()
    return name, e


def at_n(rec, key):
    """A data-quality metric at k = the source's samples per question."""
    e = source_row(rec)[1]
    return at(e[key], e["samples_per_question"])


def round_table(label, metrics):
    print(f"\n{label}\n")
    print("| round | greedy Pass@1 | pass@1 (T=0.7) | pass@4 (T=0.7) | train examples | wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in metrics:
        pk = r.get("pass@k") or {}
        print(f"| {r['round']} | {pct(r['pass@1'])} | {pct(at(pk, 1))} | {pct(at(pk, 4))} | "
              f"{r['train_examples']} | {sum((r.get('wall_s') or {}).values()):.0f} |")


def kept_false_positive(run, r):
    """Share of the round's kept training examples with a wrong `<<a op b=c>>` annotation."""
    from tpt_jax.stages.answers import calculator_ok
    with open(os.path.join(run, f"r{r:02d}", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sum(not calculator_ok(x["completion"]) for x in rows) / max(1, len(rows))


def quality_table(label, metrics, run):
    print(f"\n{label}\n")
    print("| round | sampled by | n/question | samples | correct | kept | duplicates | "
          "coverage@4 | coverage@n | diversity@4 | diversity@n | false-positive share | "
          "... of kept |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in metrics:
        if not r.get("data_quality"):
            continue
        name, e = source_row(r)
        n = e["samples_per_question"]
        cov, div = e["coverage@k"], e["diversity@k"]
        print(f"| {r['round']} | {name} | {n} | {e['samples']} | {e['correct']} | {e['kept']} | "
              f"{e['duplicates']} | {pct(at(cov, 4))} | {pct(at(cov, n))} | "
              f"{at(div, 4):.2f} | {at(div, n):.2f} | {pct(e['false_positive'])} | "
              f"{pct(kept_false_positive(run, r['round']))} |")


def plot(runs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), dpi=100)
    panels = [
        ("greedy Pass@1, test (%)", lambda r: 100 * r["pass@1"], False),
        ("pass@4 at T=0.7, test (%)", lambda r: 100 * at(r["pass@k"], 4), False),
        ("coverage@n of the round's samples, train (%)", lambda r: 100 * at_n(r, "coverage@k"),
         True),
        ("diversity@n: distinct correct solutions / question", lambda r: at_n(r, "diversity@k"),
         True),
    ]
    for ax, (title, get, needs_dq) in zip(axes.flat, panels):
        for label, metrics, style in runs:
            rows = [r for r in metrics if r.get("data_quality") or not needs_dq]
            ax.plot([r["round"] for r in rows], [get(r) for r in rows], label=label, **style)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(max(len(m) for _, m, _ in runs)))
        ax.set_xlabel("round", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("cpu-tiny on its own 4 samples/question (self) vs on cpu-tiny-weak's 9 (w2s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    print(f"\nwrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--suffixes", nargs="+", default=["", "s1"])
    ap.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "compute_matched.png"))
    args = ap.parse_args()
    curves = []
    for i, s in enumerate(args.suffixes):
        seed, s = (f"seed {i}" if s in ("", f"s{i}") else s), (f"-{s}" if s else "")
        if not os.path.exists(os.path.join(args.runs, f"weak{s}", "metrics.json")):
            print(f"\n(no {args.runs}/weak{s}: runs with another setting)")
        else:
            weak = load(os.path.join(args.runs, f"weak{s}"))[0]
            print(f"\nweak source, {seed} ({args.runs}/weak{s}): cpu-tiny-weak after round 0: "
                  f"greedy Pass@1 {pct(weak['pass@1'])}, pass@4 {pct(at(weak['pass@k'], 4))}")
        for arm, color in (("self", "tab:blue"), ("w2s", "tab:orange")):
            run = os.path.join(args.runs, f"{arm}{s}")
            metrics = load(run)
            round_table(f"{arm}, {seed} ({run})", metrics)
            quality_table(f"{arm}, {seed}: each round's training data", metrics, run)
            curves.append((f"{arm}, {seed}", metrics,
                           dict(color=color, marker="os^v"[i % 4], linestyle=["-", "--"][i % 2])))
    plot(curves, args.png)


if __name__ == "__main__":
    main()
