"""The TPT loop, `tpt run`: round 0 (the starting model, trained on the seed solutions when
there are any), then rounds of Think -> Prune -> Train -> Eval, each round's trained weights
feeding the next round's sampler in memory.

Every stage is recorded in the run directory's state file once its artifacts are written, so
running the same command again resumes where it stopped:

    DIR/config.json, state.json, metrics.json, metrics.png
    DIR/rNN/samples/        Think: JSONL shards of sample records (resumable per shard)
    DIR/rNN/train.jsonl     Prune: the kept training examples, and rNN/prune_stats.json
    DIR/rNN/train/          Train: Orbax checkpoints (resumable per step)
    DIR/rNN/params/         the round's final params (what a resumed run reloads)
    DIR/rNN/eval.json       Eval: metrics and per-question verdicts
    DIR/hf/                 the last round's model as an HF checkpoint, with its tokenizer
    DIR/tb/                 TensorBoard events: per train step, and per round

The weights each stage uses are the previous stage's `Artifact`: in memory when this process
trained them, else loaded from that round's params, never an earlier round's.
"""
from __future__ import annotations

import functools
import logging

from tpt_jax import io
from tpt_jax.config import RunConfig, round_config
from tpt_jax.config_io import to_dict
from tpt_jax.errors import disk_full_as_error
from tpt_jax.loop import report
from tpt_jax.loop import round_stages as st
from tpt_jax.loop.rundir import RunDir, check_output
from tpt_jax.loop.runner import Artifact, run_stage
from tpt_jax.loop.setup import Setup, base_params, setup
from tpt_jax.loop.tracking import Tracker
from tpt_jax.methods import multimodel

log = logging.getLogger(__name__)


def run(cfg: RunConfig, out_dir: str, force: bool = False, progress: bool = True) -> list[dict]:
    """Run (or resume) all rounds; returns the metrics records (also in DIR/metrics.json)."""
    check_output(out_dir, cfg, force)  # a refused start writes nothing:
    count0, seconds0 = report.compiles()
    s = setup(cfg, progress)  # everything is checked before the run directory is touched
    with disk_full_as_error(out_dir), RunDir(out_dir, cfg, force) as rd:
        tracker = Tracker(out_dir, cfg.tracking, config=to_dict(cfg))
        try:
            metrics = run_rounds(s, rd, tracker)
        finally:
            tracker.close()
        finish(rd, metrics)
        count, seconds = report.compiles()
        log.info("%s", report.describe_end((count - count0, seconds - seconds0),
                                           s.samplers.layout_copies))
        return metrics


def run_rounds(s: Setup, rd: RunDir, tracker: Tracker) -> list[dict]:
    base = Artifact(load=functools.partial(base_params, s))
    model, metrics = base, []
    for r in range(s.cfg.rounds + 1):
        record, model = run_round(s, rd, r, model, base, tracker)
        metrics.append(record)
        tracker.round_end(record)
        if rd.primary:
            io.write_json_atomic(rd.path("metrics.json"), metrics)
        log.info("round %d: greedy pass@1 %.1f%%", r, 100 * record["pass@1"])
    run_stage(rd, "export", {}, functools.partial(st.export_final, s, rd, model))
    return metrics


def run_round(s: Setup, rd: RunDir, r: int, prev: Artifact, base: Artifact,
              tracker: Tracker) -> tuple[dict, Artifact]:
    """One round as its list of stages; returns its metrics record and its trained model."""
    rc, tag, wall = round_config(s.cfg, r), st.tag(r), {}
    if r == 0:
        return round_zero(s, rd, rc, base, tracker, wall)
    questions = Artifact(s.train_questions)
    if rc.synthesize.enabled:
        questions = run_stage(rd, f"{tag}/synthesize", wall,
                              functools.partial(st.synthesize, s, rd, rc, r, prev),
                              functools.partial(st.load_questions, s, rd, r))
    run_stage(rd, f"{tag}/think", wall,
              functools.partial(st.think_round, s, rd, rc, r, prev, questions))
    run_stage(rd, f"{tag}/prune", wall,
              functools.partial(st.prune_round, s, rd, rc, r, prev, questions))
    start = base if rc.init_from == "base" else prev
    model = train_stage(s, rd, rc, r, start, tracker, wall)
    run_stage(rd, f"{tag}/eval", wall, functools.partial(st.eval_round, s, rd, rc, r, model))
    stats = st.load_prune_stats(rd, r)
    record = {"round": r, "train_examples": stats["counts"]["kept"],
              "coverage": stats["metrics"].get("coverage"),  # questions with a correct sample
              "think_tokens": stats.get("think_tokens")}  # decoded, cancelled samples' too
    if stats.get("data_quality"):
        record["data_quality"] = stats["data_quality"]
    return eval_record(rd, r, record, wall), model


def round_zero(s: Setup, rd: RunDir, rc, base: Artifact, tracker: Tracker,
               wall: dict) -> tuple[dict, Artifact]:
    """The starting model, fine-tuned on the seed solutions when the data has any."""
    examples = len(st.round_examples(s, rd, rc, 0))
    model = train_stage(s, rd, rc, 0, base, tracker, wall) if examples else base
    run_stage(rd, "r00/eval", wall, functools.partial(st.eval_round, s, rd, rc, 0, model))
    return eval_record(rd, 0, {"round": 0, "train_examples": examples}, wall), model


def train_stage(s: Setup, rd: RunDir, rc, r: int, start: Artifact, tracker: Tracker,
                wall: dict) -> Artifact:
    return run_stage(rd, f"{st.tag(r)}/train", wall,
                     functools.partial(st.train_round, s, rd, rc, r, start, tracker),
                     functools.partial(st.load_trained, s, rd, rc, r, start, tracker))


def eval_record(rd: RunDir, r: int, record: dict, wall: dict) -> dict:
    """The round's metrics record: its data counts, then the eval results and wall times."""
    result = st.load_eval(rd, r)
    record.update({"pass@1": result["pass@1"], "pass@k": result.get("pass@k", {}),
                   "maj@k": result.get("maj@k", {}), "wall_s": wall})
    return record


def finish(rd: RunDir, metrics: list[dict]) -> None:
    """The end-of-run table and plots."""
    if not rd.primary:
        return
    print(report.table(metrics))
    report.plot(metrics, rd.path("metrics.png"))
    if any(m.get("data_quality") for m in metrics):
        multimodel.plot_data_quality(metrics, rd.path("data_quality.png"))
    print(f"metrics: {rd.path('metrics.json')}  plot: {rd.path('metrics.png')}")
