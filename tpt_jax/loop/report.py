"""End-of-run report: a table of rounds in the terminal and a PNG plot in the run directory."""
from __future__ import annotations

from typing import Optional, Sequence

from tpt_jax.plotting import save_png


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(metrics: Sequence[dict]) -> str:
    """Rounds as rows: greedy Pass@1 (`greedy@1`), sampled pass@k, training examples kept,
    coverage of the training questions, wall time."""
    ks = sorted({k for m in metrics for k in (m.get("pass@k") or {})}, key=int)
    head = ["round", "greedy@1"] + [f"pass@{k}" for k in ks] + ["train ex", "coverage", "wall s"]
    rows = [head]
    for m in metrics:
        rows.append([str(m["round"]), _pct(m.get("pass@1"))]
                    + [_pct((m.get("pass@k") or {}).get(k)) for k in ks]
                    + [str(m.get("train_examples", "-")), _pct(m.get("coverage")),
                       f"{sum((m.get('wall_s') or {}).values()):.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(metrics: Sequence[dict], out_path: str, title: str = "Think, Prune, Train") -> str:
    """Accuracy (greedy Pass@1, sampled pass@k) and kept training data per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [m["round"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(rounds, [100 * (m.get("pass@1") or 0) for m in metrics], "o-", lw=2,
            label="greedy Pass@1")
    ks = sorted({k for m in metrics for k in (m.get("pass@k") or {})}, key=int)
    for k in ks:
        vals = [(m.get("pass@k") or {}).get(k) for m in metrics]
        if any(v is not None for v in vals):
            ax.plot(rounds, [None if v is None else 100 * v for v in vals], "s--",
                    label=f"sampled pass@{k}")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on eval split (%)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.bar(rounds, [m.get("train_examples") or 0 for m in metrics], alpha=0.18, color="gray",
            label="training examples")
    ax2.set_ylabel("training examples kept")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title(title)
    return save_png(fig, out_path)


def describe_start(s) -> str:
    """The first lines of `tpt run`: what runs where (devices, mesh, model, tokenizer, data).
    `s` is `rounds.Setup` (cfg, mesh, model, tokenizer, train_questions, eval_questions)."""
    import jax

    cfg, devices = s.cfg, jax.devices()
    kind = devices[0].device_kind if devices else "?"
    mesh = " ".join(f"{name}={size}" for name, size in s.mesh.shape.items())
    m = s.model.cfg
    source = cfg.checkpoint or f"random init of preset {cfg.model}"
    return "\n".join([
        f"devices: {len(devices)} x {devices[0].platform} ({kind}) on {jax.process_count()} "
        f"process(es); mesh {mesh}",
        f"model: {m.param_count() / 1e6:,.1f}M parameters ({m.num_layers} layers, width "
        f"{m.embed_dim}) from {source}; compute {cfg.dtype}, params {cfg.param_dtype}",
        f"tokenizer: {getattr(s.tokenizer, 'name', cfg.tokenizer or 'builtin')} "
        f"({s.tokenizer.vocab_size} tokens)",
        f"data: {cfg.data.source}: {len(s.train_questions)} training questions, "
        f"{len(s.eval_questions)} {cfg.eval.split} questions; {cfg.rounds} rounds",
    ])


_COMPILES = {"count": 0, "seconds": 0.0, "listening": False}


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["count"] += 1
        _COMPILES["seconds"] += seconds


def compiles() -> tuple[int, float]:
    """XLA compilations in this process since the first call (count, seconds): the end-of-run
    line reports how many programs a run built."""
    if not _COMPILES["listening"]:
        import jax
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _COMPILES["listening"] = True
    return _COMPILES["count"], _COMPILES["seconds"]


def describe_end(compiled: tuple[int, float], layout_copies: int) -> str:
    """The run's last log line on compile and copy work (`compiles()` delta, samplers)."""
    return (f"run: {compiled[0]} XLA compilations ({compiled[1]:.0f} s), {layout_copies} "
            f"weight copies into the sampling layout")
