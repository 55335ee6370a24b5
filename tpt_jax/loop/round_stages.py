"""One round's stages on the run directory: each a plain function from its inputs to its
artifact, with a loader for runs that resume after the stage was done.

    synthesize (optional)  params            -> rNN/synthetic.jsonl      -> questions
    think                  params, questions -> rNN/samples/, sources/   (read by prune)
    prune                  samples           -> rNN/train.jsonl, prune_stats.json
    train                  params, examples  -> rNN/train/, rNN/params/  -> params
    eval                   params            -> rNN/eval.json
    export (after the last round)            -> DIR/hf/ (HF checkpoint + tokenizer)

Weights arrive as `Artifact`s (`loop/runner.py`), so a stage that is already done never loads
the weights it would have needed. Only process 0 writes files.
"""
from __future__ import annotations

import logging
from typing import Any

from tpt_jax import io
from tpt_jax.config import TptError
from tpt_jax.data.sources import seed_examples
from tpt_jax.gemma import export, sharding, weights
from tpt_jax.loop.rundir import RunDir
from tpt_jax.loop.runner import Artifact
from tpt_jax.loop.setup import Setup
from tpt_jax.loop.tracking import Tracker
from tpt_jax.prompts import chat_of, format_prompt
from tpt_jax.methods import influence, multimodel
from tpt_jax.methods import synthesize as synth
from tpt_jax.stages import evaluate, prune, think, train

log = logging.getLogger(__name__)


def tag(r: int) -> str:
    return f"r{r:02d}"


def self_name(s: Setup, r: int) -> str:
    """Provenance of round r's own samples: the model after round r-1."""
    return f"{s.cfg.model}@r{r - 1}"


# -------------------------------------------------------------------------- synthesize


def synthesize(s: Setup, rd: RunDir, rc, r: int, params: Artifact) -> list[dict]:
    """New problems written by the model and labelled by majority vote (JiuZhang3.0)."""
    seeds = synth.seed_texts(rc.synthesize, s.train_questions)
    weights = params.get()
    recs, stats = synth.synthesize(weights, s.model, s.tokenizer, seeds, rc.synthesize,
                                   rc.think, s.mesh, template=rc.prompt, shots=s.shots,
                                   round_=r, source=self_name(s, r),
                                   sampler=s.samplers.get(s.model, weights, rc.think))
    if rd.primary:
        io.write_jsonl_atomic(rd.path(tag(r), "synthetic.jsonl"), recs)
        io.write_json_atomic(rd.path(tag(r), "synthesize_stats.json"), stats)
    return list(s.train_questions) + recs


def load_questions(s: Setup, rd: RunDir, r: int) -> list[dict]:
    return list(s.train_questions) + [rec for _, rec in
                                      io.read_jsonl(rd.path(tag(r), "synthetic.jsonl"))]


# -------------------------------------------------------------------------------- think


def think_round(s: Setup, rd: RunDir, rc, r: int, params: Artifact, questions: Artifact) -> None:
    """n traces per question from the model itself, and from every other source model."""
    if rc.sources.self:
        weights = params.get()
        think.think(weights, s.model, s.tokenizer, questions.get(), rc.think,
                    rd.path(tag(r), "samples"), s.mesh, template=rc.prompt, shots=s.shots,
                    source=self_name(s, r), progress=s.progress,
                    sampler=s.samplers.get(s.model, weights, rc.think), prune=rc.prune)
    multimodel.think_sources(rc, s, questions.get(), rd.path(tag(r), "sources"), r)


# -------------------------------------------------------------------------------- prune


def prune_round(s: Setup, rd: RunDir, rc, r: int, params: Artifact, questions: Artifact) -> None:
    """Verify every sample, select the training examples, then the optional influence
    selection; writes rNN/train.jsonl, prune_stats.json and data_quality.json."""
    samples = think.read_samples(rd.path(tag(r), "samples")) if rc.sources.self else []
    chat = chat_of(s.tokenizer)
    trained_prompts = {q["id"]: format_prompt(rc.prompt, q["question"], s.shots, chat)
                       for q in questions.get()}
    samples += multimodel.read_source_samples(rc, rd.path(tag(r), "sources"), trained_prompts)
    kept, stats = multimodel.prune_sources(questions.get(), samples, rc.prune, rc.sources.pool)
    if "influence" in {x.strip() for x in rc.prune.strategy.split("+")} and kept:
        kept, stats, rows = influence.apply_to_round(
            params.get(), s.model, s.tokenizer, kept, stats,
            seed_examples(rc.data, rc.prompt, s.shots, chat_of(s.tokenizer)), rc.prune, s.mesh,
            max_length=rc.train.max_length, loss_chunk=rc.train.loss_chunk)
        if rd.primary:
            io.write_jsonl_atomic(rd.path(tag(r), "influence.jsonl"), rows)
    per_q = multimodel.samples_per_source(rc, s.model.cfg)
    if "self" in per_q:
        per_q[self_name(s, r)] = per_q.pop("self")
    prune.note_early_stop(stats, samples, per_q)
    stats["think_tokens"] = think_tokens(rd, rc, r)
    stats["data_quality"] = multimodel.data_quality(stats, per_q)
    if rd.primary:
        io.write_json_atomic(rd.path(tag(r), "data_quality.json"), stats["data_quality"])
        io.write_jsonl_atomic(rd.path(tag(r), "train.jsonl"), kept)
        io.write_json_atomic(rd.path(tag(r), "prune_stats.json"), stats)
    log.info("round %d prune: %s", r, prune.summary_line(stats))


def think_tokens(rd: RunDir, rc, r: int) -> int:
    """Tokens round r's Think drew, every source's, cancelled samples' included (not those
    of rows the paged cache preempted)."""
    folders = ([rd.path(tag(r), "samples")] if rc.sources.self else []) + [
        rd.path(tag(r), "sources", src.name) for src in rc.sources.models]
    return sum(think.decoded_tokens(f) for f in folders)


def load_prune_stats(rd: RunDir, r: int) -> dict:
    stats = io.read_json(rd.path(tag(r), "prune_stats.json"))
    _require(stats, rd.path(tag(r), "prune_stats.json"), ("counts", "kept"), ("metrics",))
    return stats


def _require(record: dict, where: str, *paths: tuple) -> None:
    """A hand-edited or foreign artifact without the fields the round record needs is one
    line naming the file and field, not a KeyError."""
    for path in paths:
        node = record
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise TptError(f"{where}: no field {'.'.join(path)} (not written by tpt, or "
                               f"edited); delete it and its stage from state.json to redo it")
            node = node[key]


# -------------------------------------------------------------------------------- train


def round_examples(s: Setup, rd: RunDir, rc, r: int) -> list[dict]:
    """Round 0 trains on the seed solutions; round r >= 1 on what its Prune kept."""
    if r == 0:
        return seed_examples(rc.data, rc.prompt, s.shots, chat_of(s.tokenizer))
    return [rec for _, rec in io.read_jsonl(rd.path(tag(r), "train.jsonl"))]


def train_round(s: Setup, rd: RunDir, rc, r: int, start: Artifact, tracker: Tracker) -> Any:
    """Fine-tune `start` on the round's examples (resuming from rNN/train/ checkpoints) and
    save rNN/params; with no examples the model is carried over unchanged."""
    examples = round_examples(s, rd, rc, r)
    if examples:
        params, _ = train.train(start.get(), s.model, s.tokenizer, examples, rc.train,
                                rd.path(tag(r), "train"), s.mesh, label=f"round {r} train",
                                tracker=tracker.train(r), progress=s.progress)
    else:
        log.warning("round %d: prune kept no training examples (see %s); the model is carried "
                    "over unchanged", r, rd.path(tag(r), "prune_stats.json"))
        params = start.get()
    weights.save_params(params, s.model.cfg, rd.path(tag(r), "params"))
    return params


def load_trained(s: Setup, rd: RunDir, rc, r: int, start: Artifact, tracker: Tracker) -> Any:
    """Round r's saved params; when they are marked done but unreadable (damaged or deleted
    files), the train stage is redone: it resumes from its last checkpoint, so the redo is
    quick and gives the same params."""
    where = rd.path(tag(r), "params")
    try:
        return weights.load_params(where, s.model, s.mesh, sharding.TRAIN_RULES)
    except TptError as e:
        log.warning("%s is unreadable (%s); redoing round %d's train stage from its "
                    "checkpoints", where, e, r)
        return train_round(s, rd, rc, r, start, tracker)


# --------------------------------------------------------------------------------- eval


def eval_round(s: Setup, rd: RunDir, rc, r: int, params: Artifact) -> None:
    """Greedy Pass@1 and sampled pass@k / maj@k of round r's model on the eval split."""
    weights = params.get()
    result = evaluate.evaluate(weights, s.model, s.tokenizer, s.eval_questions, rc.eval,
                               s.mesh, template=rc.prompt, shots=s.shots, seed=s.cfg.seed,
                               think_cfg=rc.think, out_dir=rd.path(tag(r), "eval"),
                               progress=s.progress,
                               sampler=s.samplers.get(s.model, weights, rc.think))
    if rd.primary:
        io.write_json_atomic(rd.path(tag(r), "eval.json"), result)


def load_eval(rd: RunDir, r: int) -> dict:
    result = io.read_json(rd.path(tag(r), "eval.json"))
    _require(result, rd.path(tag(r), "eval.json"), ("pass@1",))
    return result


# ------------------------------------------------------------------------------- export


def export_final(s: Setup, rd: RunDir, params: Artifact) -> None:
    """The last round's model as an HF checkpoint with its tokenizer and generation config
    (DIR/hf): `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load it as it is."""
    export.export_hf(params.get(), s.model.cfg, s.tokenizer, rd.path("hf"),
                     dtype=s.cfg.param_dtype)
