"""What every round of a run shares: mesh, model, tokenizer, questions, few-shot examples.

`setup` reads and checks everything a run needs before the run directory is touched, so a
refused start (a mesh that does not fit the devices, a missing checkpoint, a bad dataset)
fails here and leaves nothing behind. `tpt eval` uses the same set-up.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import jax

from tpt_jax.config import RunConfig, load_run_config, round_config
from tpt_jax.gemma.config import model_preset
from tpt_jax.data.sources import load_seed, load_split
from tpt_jax.gemma import model as M
from tpt_jax.gemma import sharding, weights
from tpt_jax.data.builtin_tokenizer import load_tokenizer
from tpt_jax.gemma.tokenizer import check_vocab
from tpt_jax.loop import report
from tpt_jax.methods.multimodel import check_source_checkpoints
from tpt_jax import prompts
from tpt_jax.stages import budget
from tpt_jax.stages.think import Samplers, check_cache
from tpt_jax.stages.train_step import check_batch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
    """What every round shares: config, mesh, model, tokenizer, data."""

    cfg: RunConfig
    mesh: Any
    model: Any
    tokenizer: Any
    train_questions: list
    eval_questions: list
    shots: list
    progress: bool = True  # progress bars (also off when stderr is not a terminal)
    samplers: Any = None  # the run's samplers (think.Samplers), made with the Setup


def setup(cfg: RunConfig, progress: bool = True) -> Setup:
    """Mesh, model, tokenizer and data for a config (no weights yet)."""
    mesh = sharding.make_mesh(cfg.mesh)
    for r in range(cfg.rounds + 1):  # a batch that cannot split over the devices fails now
        check_batch(round_config(cfg, r).train, mesh)
    check_source_checkpoints(cfg)
    model_cfg = weights.read_hf_config(cfg.checkpoint) if cfg.checkpoint else model_preset(cfg.model)
    model = M.make_model(model_cfg, cfg.dtype, cfg.param_dtype, cfg.train.remat)
    check_cache(model, cfg.think, mesh)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, model_cfg.vocab_size)
    train_q = load_split(cfg.data, "train")
    for r in range(1, cfg.rounds + 1):  # budget mode's settings, before round 0 trains
        rc = round_config(cfg, r)
        budget.check(rc.think, rc.prune, len(train_q))
    eval_q = load_split(cfg.data, cfg.eval.split)
    if cfg.eval.limit:
        eval_q = eval_q[: cfg.eval.limit]
    load_seed(cfg.data)  # seed solutions (round 0's training data) are read and checked now
    shots = prompts.pick_shots(train_q, prompts.num_shots(cfg.prompt))
    s = Setup(cfg, mesh, model, tokenizer, train_q, eval_q, shots, progress,
              Samplers(tokenizer, mesh))
    for line in report.describe_start(s).splitlines():
        log.info("%s", line)
    return s


def base_params(s: Setup) -> Any:
    """The starting model: the configured checkpoint, else a seeded random init."""
    if s.cfg.checkpoint:
        return weights.load_hf(s.cfg.checkpoint, s.model, s.mesh, sharding.TRAIN_RULES)
    return M.init_params(s.model, jax.random.key(s.cfg.seed), s.mesh, sharding.TRAIN_RULES)


def config_from_args(config: Optional[str], overrides: list[str]) -> RunConfig:
    """`tpt run [CONFIG] [key=value ...]`; a first argument with '=' is an override."""
    overrides = list(overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return load_run_config(config, overrides)
