"""`tpt train`: SFT on a JSONL of pruned examples, resumable; TensorBoard events in OUT/tb and
an HF export (weights, tokenizer, generation config) in OUT/model."""
from __future__ import annotations

import dataclasses
import json
import logging

import jax

from tpt_jax import io
from tpt_jax.config import TrainConfig
from tpt_jax.gemma.sharding import TRAIN_RULES, make_mesh
from tpt_jax.stages import sft_data
from tpt_jax.stages.train import train

log = logging.getLogger(__name__)


def _qualify(override: str) -> str:
    """`learning_rate=1e-5` -> `train.learning_rate=1e-5` (bare train keys are accepted)."""
    key = override.split("=", 1)[0].strip()
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    return f"train.{override.strip()}" if "." not in key and key in train_keys else override


def add_cli(parser) -> None:
    parser.add_argument("--examples", required=True,
                        help="training examples JSONL (prompt, completion; written by tpt prune)")
    parser.add_argument("--eval-examples", help="held-out examples JSONL for the eval loss "
                        "(default: train.eval_fraction of --examples, if set)")
    parser.add_argument("--checkpoint", help="HF checkpoint (Gemma2, Llama, Qwen2): local or "
                        "gs:// dir, or Hub id ORG/NAME[@REV]; default: the config's checkpoint, else a random init of "
                        "the config's model preset")
    parser.add_argument("--tokenizer", help="sentencepiece .model, HF tokenizer dir, Hub id or "
                        "'builtin' (default: the config's tokenizer)")
    parser.add_argument("--out", required=True,
                        help="output dir: checkpoints/, best/, model/, tb/, logs")
    parser.add_argument("--config", help="run config YAML or a configs/ name (default: built-in "
                        "defaults: TPT's lr 1e-6, batch 8, max length 1600, 1 epoch)")
    parser.add_argument("--no-export", action="store_true",
                        help="do not write the trained params as an HF checkpoint to OUT/model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.learning_rate=1e-5 or learning_rate=1e-5")
    parser.set_defaults(func=_cli)


def _cli(args) -> int:
    from tpt_jax.config import RunConfig, validate_run
    from tpt_jax.data.builtin_tokenizer import load_tokenizer
    from tpt_jax.config_io import apply_overrides, from_dict, read_yaml, resolve_config_path
    from tpt_jax.gemma.config import model_preset
    from tpt_jax.gemma.export import export_hf
    from tpt_jax.gemma.model import init_params, make_model
    from tpt_jax.gemma.weights import load_hf, read_hf_config
    from tpt_jax.loop.tracking import Tracker

    io.check_writable_dir(args.out, "--out")
    data = read_yaml(resolve_config_path(args.config)) if args.config else {}
    data = apply_overrides(data, [_qualify(o) for o in args.overrides])
    cfg = validate_run(from_dict(RunConfig, data, "config"))
    examples = sft_data.read_examples(args.examples)  # before any model work: bad files fail fast
    evals = sft_data.read_examples(args.eval_examples) if args.eval_examples else None
    mesh = make_mesh(cfg.mesh)
    ckpt = args.checkpoint or cfg.checkpoint
    mcfg = read_hf_config(ckpt) if ckpt else model_preset(cfg.model)
    model = make_model(mcfg, cfg.dtype, cfg.param_dtype, cfg.train.remat)
    if ckpt:
        params = load_hf(ckpt, model, mesh, TRAIN_RULES)
    else:
        log.warning("no --checkpoint: training a random init of model preset %r", cfg.model)
        params = init_params(model, jax.random.key(cfg.seed), mesh, TRAIN_RULES)
    tokenizer = load_tokenizer(args.tokenizer or cfg.tokenizer)
    tracker = Tracker(args.out, cfg.tracking, config=dataclasses.asdict(cfg))
    try:
        params, metrics = train(params, model, tokenizer, examples, cfg.train, args.out, mesh,
                                evals, donate=True, tracker=tracker.train(),
                                progress=not args.no_progress)
    finally:
        tracker.close()
    if not args.no_export:
        export_hf(params, mcfg, tokenizer, str(io.path(args.out) / "model"),
                  dtype=cfg.param_dtype)
    summary = {k: metrics[k] for k in ("steps", "total_steps", "resumed_from", "final_loss",
                                       "best_step", "best_eval_loss", "examples",
                                       "trained_tokens_per_s")}
    print(json.dumps(summary))
    return 0

