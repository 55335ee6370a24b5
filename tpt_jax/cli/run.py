"""`tpt run`: rounds of Think -> Prune -> Train -> Eval in a resumable run directory
(`loop.rounds`)."""
from __future__ import annotations

from tpt_jax.loop.rounds import run
from tpt_jax.loop.setup import config_from_args


def add_cli(parser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (path or name in configs/; default: tiny_cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. think.n=8 train.learning_rate=2e-6")
    parser.add_argument("--output", "-o", default=None,
                        help="run directory, local or gs:// (default: runs/<config name>)")
    parser.add_argument("--force", action="store_true",
                        help="resume even though the config changed since the run started")
    parser.add_argument("--no-progress", action="store_true",
                        help="log lines instead of progress bars (also when not a terminal)")
    parser.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = config_from_args(args.config, args.overrides)
    first = args.config if args.config and "=" not in args.config else "tiny_cpu"
    name = first.rsplit("/", 1)[-1].removesuffix(".yaml").removesuffix(".yml")
    run(cfg, args.output or f"runs/{name}", force=args.force, progress=not args.no_progress)
    return 0
