"""`tpt bench accelerator`: the sampler and the train step on an accelerator, from the
repository alone, as one table (and a JSON line per run).

It runs `tpt bench sample` and `tpt bench train` in subprocesses (each with its own memory
and a time limit, so one failing or slow run leaves the others): uniform decode, then ragged
Think at each `--slots` with `--rows-per-slot` rows a slot in file order (lengths from
GSM8K's training solutions, `gsm8k_lengths.json`, clipped to `--max-new`), on each decode
cache (dense, paged, and on a GPU or TPU the Pallas kernel), then one train step setting. The
defaults (gemma2-2b, bf16) are sized to fit 8 minutes on a lent H200 from the earlier
figures there; each run is capped by `--timeout` and the whole by `--budget` (later runs are
skipped, with a row saying so). They have not run on one yet.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from tpt_jax.config import ConfigError
from tpt_jax.engine.paged import KERNEL_PLATFORMS
from tpt_jax.gemma.config import MODEL_PRESETS

LENGTHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_lengths.json")


def add_bench_cli(parser) -> None:
    parser.add_argument("--shape", default="gemma2-2b", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--max-new", type=int, default=1024, help="longest trace")
    parser.add_argument("--slots", default="64,256", help="decode slots, comma-separated")
    parser.add_argument("--rows-per-slot", type=int, default=16,
                        help="ragged rows a slot (a real round has many more)")
    parser.add_argument("--attention", default=None,
                        help="decode caches, comma-separated (default: dense,paged and, on a "
                             "GPU or TPU, pallas)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq", type=int, default=1024)
    parser.add_argument("--timeout", type=int, default=240, help="seconds a run may take")
    parser.add_argument("--budget", type=int, default=470,
                        help="seconds for everything: runs that would start later are skipped")
    parser.set_defaults(func=_bench)


def ragged_lengths(rows: int, max_new: int) -> list[int]:
    """The first `rows` GSM8K-like trace lengths, clipped to `max_new`."""
    with open(LENGTHS) as f:
        lengths = json.load(f)["lengths"]
    if rows > len(lengths):
        raise ConfigError(f"at most {len(lengths)} ragged rows are shipped, asked for {rows}")
    return [min(L, max_new) for L in lengths[:rows]]


def runs(args, backend: str, lengths_file) -> list[tuple[str, list[str]]]:
    """(label, `tpt bench` arguments) of every run, in order."""
    slots = [int(s) for s in args.slots.split(",")]
    caches = (args.attention.split(",") if args.attention else
              ["dense", "paged"] + (["pallas"] if backend in KERNEL_PLATFORMS else []))
    common = ["--shape", args.shape, "--dtype", args.dtype, "--prompt", str(args.prompt)]
    out = [("uniform", ["sample", *common, "--batch", str(slots[0]),
                        "--new", str(min(256, args.max_new)), "--repeats", "3"])]
    for s in slots:
        for cache in caches:
            out.append((f"ragged {s} slots {cache}",
                        ["sample", *common, "--batch", str(s), "--lengths", lengths_file(s),
                         "--attention", cache]))
    out.append(("train", ["train", "--shape", args.shape, "--dtype", args.dtype,
                          "--batch", str(args.train_batch), "--seq", str(args.train_seq),
                          "--remat", "full", "--steps", "3"]))
    return out


def run_one(argv: list[str], timeout: int) -> dict:
    """One `tpt bench` in a subprocess: its JSON line, or {"error": ...}."""
    try:
        p = subprocess.run([sys.executable, "-m", "tpt_jax.cli", "bench", *argv],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def row(label: str, r: dict) -> str:
    """One table line."""
    if "error" in r:
        return f"| {label} | {r['error']} |  |  |  |  |"
    if label == "train":
        return (f"| train | {r.get('tokens_per_s', '')} tokens/s | | | "
                f"MFU {r.get('mfu', '')} | |")
    rate = r.get("useful_tokens_per_s", r.get("tokens_per_s"))
    share = r.get("roofline_share", "")
    mem = f"{r['rows_per_gb']} rows/GB" if "rows_per_gb" in r else ""
    return (f"| {label} | {rate} tokens/s | {r.get('slot_utilization', '')} | "
            f"{r.get('step_ms', '')} | {share} | {mem} |")


def _bench(args) -> int:
    import jax
    for name in ("prompt", "max_new", "rows_per_slot", "timeout", "budget"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    backend = jax.default_backend()
    print(f"# tpt bench accelerator: {args.shape} {args.dtype} on {backend} "
          f"({jax.devices()[0].device_kind}, {len(jax.devices())} devices)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def lengths_file(slots: int) -> str:
            path = os.path.join(tmp, f"lengths-{slots}.json")
            with open(path, "w") as f:
                json.dump(ragged_lengths(slots * args.rows_per_slot, args.max_new), f)
            return path

        table = ["| run | rate | slot use | step ms | roofline share | KV |",
                 "| --- | --- | --- | --- | --- | --- |"]
        failed, start = 0, time.monotonic()
        for label, argv in runs(args, backend, lengths_file):
            left = int(args.budget - (time.monotonic() - start))
            result = (run_one(argv, min(args.timeout, left)) if left >= 10 else
                      {"error": f"skipped: the {args.budget} s budget is spent"})
            print(json.dumps({"run": label, **result}), flush=True)
            table.append(row(label, result))
            failed += "error" in result
    print("\n".join(table))
    return 1 if failed else 0
