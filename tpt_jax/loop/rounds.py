"""The TPT loop, `tpt run`: round 0 (the starting model), then rounds of
Think -> Prune -> Train -> Eval, each round's trained weights feeding the next round's sampler
in memory.

Every stage is recorded in the run directory's state file once its artifacts are written, so
running the same command again resumes where it stopped:

    DIR/config.json, state.json, metrics.json, metrics.png
    DIR/rNN/samples/        Think: JSONL shards of sample records (resumable per shard)
    DIR/rNN/train.jsonl     Prune: the kept training examples, and rNN/prune_stats.json
    DIR/rNN/train/          Train: Orbax checkpoints (resumable per step)
    DIR/rNN/params/         the round's final params (what a resumed run reloads)
    DIR/rNN/eval.json       Eval: metrics and per-question verdicts
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import jax

from tpt_jax import distributed, faults, io
from tpt_jax.methods import multimodel
from tpt_jax.loop import report
from tpt_jax.config import RunConfig, TptError, load_run_config, model_preset, round_config
from tpt_jax.loop.rundir import RunDir, check_output

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
    """What every round shares: config, run dir, mesh, model, tokenizer, data."""

    cfg: RunConfig
    mesh: Any
    model: Any
    tokenizer: Any
    train_questions: list
    eval_questions: list
    shots: list


def setup(cfg: RunConfig) -> Setup:
    """Mesh, model, tokenizer and data for a config (no weights yet)."""
    from tpt_jax.stages import prompts
    from tpt_jax.gemma import sharding
    from tpt_jax.data.sources import load_split
    from tpt_jax.gemma.model import make_model
    from tpt_jax.gemma.tokenizer import check_vocab, load_tokenizer

    mesh = sharding.make_mesh(cfg.mesh)
    from tpt_jax.stages.train import check_batch
    for r in range(cfg.rounds + 1):  # a batch that cannot split over the devices fails now
        check_batch(round_config(cfg, r).train, mesh)
    from tpt_jax.methods.multimodel import check_source_checkpoints
    check_source_checkpoints(cfg)
    model_cfg = model_preset(cfg.model)
    if cfg.checkpoint:
        from tpt_jax.gemma.weights import read_hf_config
        model_cfg = read_hf_config(cfg.checkpoint)
    model = make_model(model_cfg, cfg.dtype, cfg.param_dtype, cfg.train.remat)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, model_cfg.vocab_size)
    train_q = load_split(cfg.data, "train")
    eval_q = load_split(cfg.data, cfg.eval.split)
    if cfg.eval.limit:
        eval_q = eval_q[: cfg.eval.limit]
    shots = prompts.pick_shots(train_q, prompts.num_shots(cfg.prompt))
    log.info("data: %d training questions, %d %s questions", len(train_q), len(eval_q),
             cfg.eval.split)
    return Setup(cfg, mesh, model, tokenizer, train_q, eval_q, shots)


def _base_params(s: Setup) -> Any:
    from tpt_jax.gemma import model as M, sharding, weights
    if s.cfg.checkpoint:
        return weights.load_hf(s.cfg.checkpoint, s.model, s.mesh, sharding.TRAIN_RULES)
    return M.init_params(s.model, jax.random.key(s.cfg.seed), s.mesh, sharding.TRAIN_RULES)


def _stage(rd: RunDir, name: str, compute: Callable[[], Any], wall: dict) -> None:
    """Run `compute` unless stage `name` is already done; record its wall time."""
    short = name.split("/")[-1]
    if rd.done(name):
        wall[short] = (rd.info(name) or {}).get("wall_s", 0.0)
        return
    t0 = time.perf_counter()
    faults.set_stage(name)
    faults.point("start")
    compute()
    wall[short] = round(time.perf_counter() - t0, 2)
    # Process 0 wrote the stage's files; the others read them only after this point.
    distributed.barrier(f"tpt-stage-{name}")
    faults.point("before-mark")  # artifacts written, stage not yet recorded
    rd.mark(name, wall_s=wall[short])
    faults.set_stage("")


def run(cfg: RunConfig, out_dir: str, force: bool = False) -> list[dict]:
    """Run (or resume) all rounds; returns the metrics records (also in DIR/metrics.json)."""
    from tpt_jax.stages import evaluate, prune, think, train
    from tpt_jax.gemma import sharding, weights
    from tpt_jax.data.sources import seed_examples

    check_output(out_dir, cfg, force)  # a refused start writes nothing
    s = setup(cfg)
    with RunDir(out_dir, cfg, force) as rd:
        metrics: list[dict] = []
        base: Optional[Any] = None
        params: Optional[Any] = None  # the latest model, in memory

        retrain: dict = {}  # round -> its train stage (returns the params), for a redo

        def params_of(r: int) -> Any:
            where = rd.path(f"r{r:02d}", "params")
            try:
                return weights.load_params(where, s.model, s.mesh, sharding.TRAIN_RULES)
            except TptError as e:
                if r not in retrain:
                    raise
                # marked done but unreadable (damaged or deleted files): train resumes from
                # its last checkpoint, so the redo is quick and gives the same params
                log.warning("%s is unreadable (%s); redoing round %d's train stage from its "
                            "checkpoints", where, e, r)
                return retrain[r]()

        def get_base() -> Any:
            nonlocal base
            if base is None:
                base = _base_params(s)
            return base

        for r in range(cfg.rounds + 1):
            rc = round_config(cfg, r)
            tag = f"r{r:02d}"
            wall: dict = {}
            record: dict = {"round": r}
            have_params = rd.done(f"{tag}/train")
            if r == 0:
                examples = seed_examples(rc.data, rc.prompt, s.shots)
                record["train_examples"] = len(examples)
                if examples:
                    # (defaults bind this round's values: `retrain` may call it in a later round)
                    def seed_train(r=r, rc=rc, tag=tag, examples=examples):
                        nonlocal params
                        params, _ = train.train(get_base(), s.model, s.tokenizer, examples,
                                                rc.train, rd.path(tag, "train"), s.mesh,
                                                label=f"round {r} train")
                        weights.save_params(params, s.model.cfg, rd.path(tag, "params"))
                        return params
                    retrain[r] = seed_train
                    _stage(rd, f"{tag}/train", seed_train, wall)
                    if params is None:
                        params = params_of(0)
                else:
                    params = get_base()
            else:
                samples_dir, sources_dir = rd.path(tag, "samples"), rd.path(tag, "sources")
                latest = lambda r=r: params if params is not None else params_of(r - 1)
                self_name = f"{cfg.model}@r{r - 1}"
                questions = s.train_questions  # + synthesized problems (optional stage)
                if not have_params:
                    questions = multimodel.round_questions(
                        rc, s, rd, tag, r, latest, lambda name, f: _stage(rd, name, f, wall))

                def do_think():
                    if rc.sources.self:
                        think.think(latest(), s.model, s.tokenizer, questions, rc.think,
                                    samples_dir, s.mesh, template=rc.prompt, shots=s.shots,
                                    source=self_name)
                    multimodel.think_sources(rc, s, questions, sources_dir, r)  # other models

                def do_prune():
                    samples = (think.read_samples(samples_dir) if rc.sources.self else []) \
                        + multimodel.read_source_samples(rc, sources_dir)
                    kept, stats = multimodel.prune_sources(questions, samples, rc.prune,
                                                           rc.sources.pool)
                    kept, stats = multimodel.after_prune(  # influence step, data quality
                        rc, s, rd, tag, kept, stats, latest, self_name,
                        lambda: seed_examples(rc.data, rc.prompt, s.shots))
                    if rd.primary:
                        io.write_jsonl_atomic(rd.path(tag, "train.jsonl"), kept)
                        io.write_json_atomic(rd.path(tag, "prune_stats.json"), stats)
                    log.info("round %d prune: %s", r, prune.summary_line(stats))

                def do_train(r=r, rc=rc, tag=tag):  # defaults: see seed_train
                    nonlocal params
                    kept = [rec for _, rec in io.read_jsonl(rd.path(tag, "train.jsonl"))]
                    if not kept:
                        log.warning("round %d: prune kept no training examples (see %s); the "
                                    "model is carried over unchanged", r,
                                    rd.path(tag, "prune_stats.json"))
                    start = get_base() if rc.init_from == "base" else (
                        params if params is not None else params_of(r - 1))
                    if kept:
                        params, _ = train.train(start, s.model, s.tokenizer, kept, rc.train,
                                                rd.path(tag, "train"), s.mesh,
                                                label=f"round {r} train")
                    else:
                        params = start
                    weights.save_params(params, s.model.cfg, rd.path(tag, "params"))
                    return params
                retrain[r] = do_train

                if not have_params:
                    _stage(rd, f"{tag}/think", do_think, wall)
                    _stage(rd, f"{tag}/prune", do_prune, wall)
                    _stage(rd, f"{tag}/train", do_train, wall)
                else:
                    for st in ("think", "prune", "train"):
                        wall[st] = (rd.info(f"{tag}/{st}") or {}).get("wall_s", 0.0)
                stats = io.read_json(rd.path(tag, "prune_stats.json"))
                record["train_examples"] = stats["counts"]["kept"]
                record["coverage"] = stats["metrics"].get("coverage")  # share of questions with a correct sample
                if stats.get("data_quality"):
                    record["data_quality"] = stats["data_quality"]

            def do_eval():
                p = params if params is not None else params_of(r)
                result = evaluate.evaluate(p, s.model, s.tokenizer, s.eval_questions, rc.eval,
                                           s.mesh, template=rc.prompt, shots=s.shots,
                                           seed=cfg.seed, think_cfg=rc.think,
                                           out_dir=rd.path(tag, "eval"))
                if rd.primary:
                    io.write_json_atomic(rd.path(tag, "eval.json"), result)

            if rd.done(f"{tag}/train") and params is None and not rd.done(f"{tag}/eval"):
                params = params_of(r)
            _stage(rd, f"{tag}/eval", do_eval, wall)
            result = io.read_json(rd.path(tag, "eval.json"))
            record.update({"pass@1": result["pass@1"], "pass@k": result.get("pass@k", {}),
                           "maj@k": result.get("maj@k", {}), "wall_s": wall})
            metrics.append(record)
            if rd.primary:
                io.write_json_atomic(rd.path("metrics.json"), metrics)
            log.info("round %d: greedy pass@1 %.1f%%", r, 100 * record["pass@1"])

        if rd.primary:
            print(report.table(metrics))
            report.plot(metrics, rd.path("metrics.png"))
            if any(m.get("data_quality") for m in metrics):
                multimodel.plot_data_quality(metrics, rd.path("data_quality.png"))
            print(f"metrics: {rd.path('metrics.json')}  plot: {rd.path('metrics.png')}")
        return metrics


def add_cli(parser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (path or name in configs/; default: tiny_cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. think.n=8 train.learning_rate=2e-6")
    parser.add_argument("--output", "-o", default=None,
                        help="run directory, local or gs:// (default: runs/<config name>)")
    parser.add_argument("--force", action="store_true",
                        help="resume even though the config changed since the run started")
    parser.set_defaults(func=_cli)


def config_from_args(config: Optional[str], overrides: list[str]) -> RunConfig:
    """`tpt run [CONFIG] [key=value ...]`; a first argument with '=' is an override."""
    overrides = list(overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return load_run_config(config, overrides)


def _cli(args) -> int:
    cfg = config_from_args(args.config, args.overrides)
    first = args.config if args.config and "=" not in args.config else "tiny_cpu"
    name = first.rsplit("/", 1)[-1].removesuffix(".yaml").removesuffix(".yml")
    run(cfg, args.output or f"runs/{name}", force=args.force)
    return 0
