"""`tpt` command line: run | think | prune | train | eval | bench | convert | plan | budget.

Each command has its module in this package: `add_cli(parser)` adds its arguments and sets
`func`, the function that runs it. Library modules hold no argparse code. Only the chosen
command's module is imported, so `tpt --help` stays fast. Expected errors (`TptError`) print one
line and exit 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tpt_jax.config import TptError
from tpt_jax.errors import disk_full_as_error, quiet_disk_full

COMMANDS = {
    "run": ("tpt_jax.cli.run", "run rounds of Think -> Prune -> Train -> Eval (resumable)"),
    "think": ("tpt_jax.cli.think", "sample n reasoning traces per question into JSONL shards"),
    "prune": ("tpt_jax.cli.prune", "verify samples against gold answers and select training data"),
    "train": ("tpt_jax.cli.train", "supervised fine-tuning on pruned examples (Orbax checkpoints)"),
    "eval": ("tpt_jax.cli.eval", "greedy Pass@1 and sampled pass@k on an eval split"),
    "bench": ("tpt_jax.cli.bench", "benchmarks printing one JSON line (sample | train | prune)"),
    "convert": ("tpt_jax.cli.convert", "convert between HF safetensors checkpoints and Orbax params"),
    "plan": ("tpt_jax.cli.plan", "ahead-of-time per-device memory plan for a config on N devices"),
    "budget": ("tpt_jax.cli.budget", "compute-matched samples per question for two models"),
}


# Commands that may run on several hosts: they connect to the other processes first.
MULTI_HOST = ("run", "think", "train", "eval", "convert")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpt", description="Think, Prune, Train for Gemma2, Llama 3.x and Qwen2.5 in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            importlib.import_module(module).add_cli(p)
    return parser


def _resolve_hub_args(command: str | None, args) -> None:
    """`tpt think --checkpoint` and `tpt eval --params` look for config.json or model.json in
    the directory before loading, so a Hub id (ORG/NAME[@REV]) becomes its snapshot dir here
    (run, train and convert resolve ids where they open the checkpoint)."""
    from tpt_jax.gemma import hub

    name = {"think": "checkpoint", "eval": "params"}.get(command or "")
    value = getattr(args, name, None) if name else None
    if not hub.is_hub_id(value):
        return
    if command == "think" and not getattr(args, "source", None):
        args.source = value.split("@")[0].split("/")[-1]  # the model name, not the snapshot hash
    setattr(args, name, hub.resolve(value, "checkpoint"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    if chosen is None and not argv:
        build_parser(only="").print_help()
        return 2
    # JAX probes every backend at its first use and logs each one missing ("Unable to initialize
    # backend 'tpu'") at INFO, which our INFO logging would print first on every CPU machine.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        from tpt_jax import distributed

        if chosen in MULTI_HOST:
            distributed.initialize()  # before any other JAX use; a no-op on one process
        distributed.setup_logging(force=True)  # every line carries [pN], its process
        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes
        # Orbax's background readers log an unread task exception after we have already
        # caught the error and reported it in one line.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        # `tpt --help` lists commands without importing their modules.
        parser = build_parser(only=chosen or "")
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        _resolve_hub_args(chosen, args)
        quiet_disk_full()  # reported below, in one line
        with disk_full_as_error():
            result = args.func(args)
        return int(result or 0)
    except TptError as e:
        print(f"tpt {chosen or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpt: interrupted", file=sys.stderr)
        return 130
