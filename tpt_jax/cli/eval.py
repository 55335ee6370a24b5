"""`tpt eval`: greedy Pass@1 and sampled pass@k of saved weights on a run config's eval split."""
from __future__ import annotations

import json

from tpt_jax import io
from tpt_jax.stages.evaluate import evaluate


def add_cli(parser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="run config (path or configs/ name; default tiny_cpu): model, "
                             "tokenizer, data, prompt and eval settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--params", required=True,
                        help="weights: Orbax params dir (e.g. a run's rNN/params) or HF dir")
    parser.add_argument("--out", default=None, help="write the metrics JSON here")
    parser.set_defaults(func=_cli)


def _cli(args) -> int:
    from tpt_jax.gemma import sharding, weights
    from tpt_jax.loop.setup import config_from_args, setup

    if args.out:
        io.check_writable_file(args.out, "--out")
    cfg = config_from_args(args.config, args.overrides)
    s = setup(cfg)
    if (io.path(args.params) / "config.json").exists():
        params = weights.load_hf(args.params, s.model, s.mesh, sharding.TRAIN_RULES)
    else:
        params = weights.load_params(args.params, s.model, s.mesh, sharding.TRAIN_RULES)
    result = evaluate(params, s.model, s.tokenizer, s.eval_questions, cfg.eval, s.mesh,
                      template=cfg.prompt, shots=s.shots, seed=cfg.seed, think_cfg=cfg.think)
    result.pop("greedy", None)
    if args.out:
        io.write_json_atomic(args.out, result)
    print(json.dumps(result, sort_keys=True))
    return 0
