"""`tpt bench sample | train | prune`: each prints one JSON line; `tpt bench accelerator` runs
the first two in turn and prints a table.

Each benchmark has its module in `tpt_jax.bench`; each provides `add_bench_cli(parser)`, which
adds its arguments and sets `func`.
"""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "sample": ("tpt_jax.bench.sample", "tokens/s of the sampler, uniform or ragged (random init)"),
    "train": ("tpt_jax.bench.train", "trained tokens/s and MFU of the SFT step"),
    "prune": ("tpt_jax.bench.prune", "records/s of tpt prune on synthetic samples"),
    "accelerator": ("tpt_jax.bench.accelerator",
                    "sampler (uniform, ragged Think on each decode cache) and train step on an "
                    "accelerator, as one table"),
}


def add_cli(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    chosen = next((a for a in sys.argv[2:3] if a in BENCHES), None)
    for name, (module, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if chosen is None or chosen == name:
            try:
                importlib.import_module(module).add_bench_cli(p)
            except (ImportError, AttributeError):
                if chosen == name:
                    raise
