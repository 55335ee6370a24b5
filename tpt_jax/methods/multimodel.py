"""Multi-model rounds (compute-optimal sampling, RFT-U): sources, their samples, pooled Prune.

Samples may come from several models: the trained model itself (`sources.self`, think.n per
question) and any number of others (`sources.models`), e.g. a weak-cheap (WC) and a
strong-expensive (SE) model. A source without `n` gets the compute-matched count from the
planner, S = floor(think.n * P_trained / P_source): at the sampling cost of think.n samples
from the trained model, a model with 1/3 of its parameters gets 3x the samples. Samples of all
sources are pruned together (`pool: pooled`, RFT-U: dedup across models, every kept example
keeps its `source`) or each source on its own (`pool: separate`, then concatenated). Any model
can be trained on any mix: self-improvement (self only), knowledge distillation / weak-to-strong
(`self: false` and one other source). A source of another family (say Llama samples for a
Qwen model) names its own `tokenizer`: it samples with its own chat template, and its records
get the trained model's prompt text, so Train tokenizes prompt and completion with the trained
model's tokenizer like any other sample.

Per round, `data_quality.json` (and `data_quality.png` at the end) report per source:
samples, correct, kept, duplicates (correct samples repeating another correct solution of the
same question), coverage@k, diversity@k, and the false-positive share (correct final answer
but a wrong calculator annotation).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Optional, Sequence

from tpt_jax import io as tio
from tpt_jax.config import PruneConfig, SourceConfig, TptError
from tpt_jax.gemma.config import ModelConfig, model_preset
from tpt_jax.plotting import save_png

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sources


def source_model_config(src: SourceConfig) -> ModelConfig:
    """The source's architecture: its checkpoint's (HF config.json or Orbax model.json), else
    its preset."""
    if not src.checkpoint:
        return model_preset(src.model)
    from tpt_jax.gemma import hub, weights
    root = tio.path(hub.resolve(src.checkpoint, "checkpoint"))  # a Hub id: its snapshot
    if (root / "model.json").exists():
        return weights.read_model_json(src.checkpoint)
    if (root / "config.json").exists():
        return weights.read_hf_config(src.checkpoint)
    where = "" if tio.is_remote(src.checkpoint) or os.path.isabs(src.checkpoint) \
        else f" (relative to {os.getcwd()})"
    raise TptError(f"checkpoint {src.checkpoint}{where} has neither model.json (Orbax params) "
                   f"nor config.json (HF)")


def check_source_checkpoints(cfg) -> None:
    """Fail before round 0, not when the first round reaches Think: every source of every
    round must have a readable architecture (`source_model_config`)."""
    from tpt_jax.config import round_config
    for r in range(1, cfg.rounds + 1):
        for i, src in enumerate(round_config(cfg, r).sources.models):
            try:
                source_model_config(src)
            except TptError as e:
                raise TptError(f"sources.models[{i}] ({src.name}): {e}") from None


def matched_samples(think_n: int, trained: ModelConfig, source: ModelConfig) -> int:
    """Compute-matched samples per question for `source` (at least 1)."""
    from tpt_jax.methods.planner import compute_matched_samples
    s = compute_matched_samples(think_n, trained.param_count(), source.param_count())
    return max(1, math.floor(s + 1e-9))


def samples_per_source(cfg, trained: ModelConfig) -> dict[str, int]:
    """{source name: samples per question} for a round config (self first when sampled)."""
    out = {}
    if cfg.sources.self:
        out["self"] = cfg.think.n
    for src in cfg.sources.models:
        out[src.name] = src.n if src.n else matched_samples(cfg.think.n, trained,
                                                            source_model_config(src))
    return out


def load_source(src: SourceConfig, cfg, mesh, seed: int):
    """(model, params) of one source: Orbax params dir, HF checkpoint, or random (tests)."""
    from tpt_jax.gemma import model as M
    from tpt_jax.gemma import sharding, weights
    mcfg = source_model_config(src)
    model = M.make_model(mcfg, cfg.dtype, cfg.param_dtype)
    if src.checkpoint and (tio.path(src.checkpoint) / "model.json").exists():
        return model, weights.load_params(src.checkpoint, model, mesh, sharding.TRAIN_RULES)
    if src.checkpoint:
        return model, weights.load_hf(src.checkpoint, model, mesh, sharding.TRAIN_RULES)
    return model, M.init_params(model, __import__("jax").random.key(seed), mesh,
                                sharding.TRAIN_RULES)


def source_think_config(rc, n: int, r: int):
    """Round r's Think settings for another model: n samples per question, and a seed that
    changes with the round. A source's weights are fixed for the whole run, and a sample's
    randomness is (seed, question id, sample index), so with think.seed every round it would
    draw the very same samples again; round 1 uses think.seed, round r think.seed + 1000 (r-1).
    Budget mode is the trained model's own: a source draws its n."""
    return dataclasses.replace(rc.think, n=n, seed=rc.think.seed + 1000 * (r - 1), n_max=None,
                               budget_tokens=None)


def think_sources(rc, s, questions: Sequence[dict], samples_root: str, r: int) -> dict:
    """Think with every extra source into `samples_root/<name>/` (resumable like Think)."""
    from tpt_jax.gemma.tokenizer import check_vocab, read_tokenizer
    from tpt_jax.stages import think
    counts = samples_per_source(rc, s.model.cfg)
    for src in rc.sources.models:
        model, params = load_source(src, rc, s.mesh, rc.seed + 1 + r)
        tcfg = source_think_config(rc, counts[src.name], r)
        if src.tokenizer:  # another family: its own tokenizer, so a sampler of its own ids
            tok = read_tokenizer(src.tokenizer)
            check_vocab(tok, model.cfg.vocab_size, f"sources {src.name}: model.vocab_size")
            sampler = think.make_sampler(model, tok, tcfg, s.mesh, params)
        else:
            tok, sampler = s.tokenizer, s.samplers.get(model, params, tcfg)
        think.think(params, model, tok, questions, tcfg,
                    os.path.join(samples_root, src.name), s.mesh, template=rc.prompt,
                    shots=s.shots, source=src.name, sampler=sampler, prune=rc.prune)
        if model.cfg != s.model.cfg:  # another shape: its weights and caches go now
            s.samplers.release(model)
        del params
    return counts


def read_source_samples(rc, samples_root: str, trained_prompts: dict) -> list[dict]:
    """Every source's samples; those of a source with its own tokenizer get the trained
    model's prompt of their question (`trained_prompts`: id -> text), in place of the one
    written with the source's chat markers."""
    from tpt_jax.stages import think
    out = []
    for src in rc.sources.models:
        for rec in think.read_samples(os.path.join(samples_root, src.name)):
            if src.tokenizer and rec["id"] in trained_prompts:
                rec = {**rec, "prompt": trained_prompts[rec["id"]]}
            out.append(rec)
    return out


def prune_sources(questions: Sequence[dict], samples: Sequence[dict], cfg: PruneConfig,
                  pool: str) -> tuple[list[dict], dict]:
    """Pooled: one Prune over every source. Separate: selection per source, concatenated;
    the stats (metrics per source) come from the pooled pass, with the kept counts of the
    separate selections."""
    from tpt_jax.stages import prune
    kept, stats = prune.prune_records(questions, samples, cfg)
    if pool == "pooled":
        return kept, stats
    names = sorted({rec.get("source", "samples") for rec in samples})
    kept = []
    for name in names:
        part, _ = prune.prune_records(questions, [x for x in samples
                                                  if x.get("source", "samples") == name], cfg)
        kept += part
        stats["by_source"][name]["kept"] = len(part)
    stats["counts"]["kept"] = len(kept)
    stats["counts"]["questions_kept"] = len({x["id"] for x in kept})
    stats["pool"] = "separate"
    return kept, stats


# ----------------------------------------------------------------------------- data quality


def data_quality(stats: dict, samples_per_q: Optional[dict] = None) -> dict:
    """Per source (and pooled): samples, correct, kept, duplicates, coverage@k, diversity@k,
    false-positive share, from Prune's stats."""
    def row(entry: dict, metrics: dict) -> dict:
        fp = entry.get("false_positive") or {}
        return {"samples": entry.get("samples"), "correct": entry.get("correct"),
                "kept": entry.get("kept"), "duplicates": entry.get("duplicates"),
                "coverage@k": metrics.get("coverage@k") or metrics.get("pass@k"),
                "diversity@k": metrics.get("diversity@k"),
                "false_positive": fp.get("rate"), "with_annotations": fp.get("with_annotations")}
    out = {"by_source": {}}
    for name, entry in (stats.get("by_source") or {}).items():
        out["by_source"][name] = row(entry, entry.get("metrics") or {})
        if samples_per_q and name in samples_per_q:
            out["by_source"][name]["samples_per_question"] = samples_per_q[name]
    c = stats.get("counts", {})
    pooled = {"samples": c.get("samples"), "correct": c.get("correct"), "kept": c.get("kept"),
              "duplicates": sum((e.get("duplicates") or 0)
                                for e in (stats.get("by_source") or {}).values()),
              "false_positive": stats.get("false_positive")}
    out["pooled"] = row(pooled, stats.get("metrics") or {})
    return out


def plot_data_quality(rounds: Sequence[dict], out_path: str) -> str:
    """Rounds x sources: coverage@k and diversity@k at the largest k, kept examples and the
    false-positive share, as a 2x2 PNG. `rounds`: [{round, data_quality}]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for r in rounds for n in (r.get("data_quality") or {}).get("by_source", {})})
    xs = [r["round"] for r in rounds]

    def series(name, key):
        vals = []
        for r in rounds:
            e = ((r.get("data_quality") or {}).get("by_source") or {}).get(name) or {}
            v = e.get(key)
            if isinstance(v, dict):  # @k: the largest k
                v = v[max(v, key=int)] if v else None
            vals.append(v)
        return vals

    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=100)
    for ax, (key, label) in zip(axes.flat, [("coverage@k", "coverage@k (largest k)"),
                                            ("diversity@k", "diversity@k (largest k)"),
                                            ("kept", "kept examples"),
                                            ("false_positive", "false-positive share")]):
        for name in names:
            ax.plot(xs, series(name, key), "o-", label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("data quality per source")
    return save_png(fig, out_path)
