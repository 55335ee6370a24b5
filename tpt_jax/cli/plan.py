"""`tpt plan`: ahead-of-time per-device memory of a config's train and sample steps
(`bench.plan`). More CPU devices than this process has: the command reruns itself in a fresh
process that asks XLA for them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tpt_jax.bench.plan import apply_shape_overrides, cpu_devices, format_plan, make_plan
from tpt_jax.config import ConfigError, TptError

_CHILD_ENV = "TPT_PLAN_CHILD"


def add_cli(parser) -> None:
    parser.add_argument("config", help="run config YAML (path or name in configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.remat=dots think.batch_size=64")
    parser.add_argument("--devices", type=int,
                        help="number of devices (chips) to plan for, simulated on CPU")
    parser.add_argument("--tpu", metavar="TOPOLOGY",
                        help="plan with the TPU compiler for a topology, e.g. v5e:2x4, v6e:4x8, "
                        "v5p:2x4x4 (needs libtpu: pip install 'jax[tpu]'; no TPU needed)")
    parser.add_argument("--mesh", help="data,fsdp,tensor sizes (-1 = the rest); default: the "
                        "config's mesh")
    parser.add_argument("--batch", type=int, help="train batch size (default: train.batch_size)")
    parser.add_argument("--seq", type=int, help="train sequence length (default: train.max_length)")
    parser.add_argument("--rows", type=int, help="sampler rows per batch (default: think.batch_size)")
    parser.add_argument("--only", choices=["train", "sample"], help="plan one program only")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=_cli)


def _argv(args) -> list[str]:
    """The command line of `args`, to run the same plan in a fresh process."""
    argv = ["plan", args.config, *args.overrides, "--devices", str(args.devices)]
    for name in ("tpu", "mesh", "batch", "seq", "rows", "only"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv + (["--json"] if args.json else [])


def _cli(args) -> int:
    from tpt_jax.config import load_run_config
    from tpt_jax.gemma.sharding import parse_mesh

    if args.devices is None and not args.tpu:
        raise ConfigError("give --devices N (CPU devices) or --tpu TOPOLOGY")
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    cfg = load_run_config(args.config, list(args.overrides))
    cfg = apply_shape_overrides(cfg, parse_mesh(args.mesh) if args.mesh else None, args.batch,
                                args.seq, args.rows)
    if not args.tpu and cpu_devices(args.devices) is None:
        if os.environ.get(_CHILD_ENV):
            raise TptError(f"could not get {args.devices} CPU devices")
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                             f"{args.devices}"])
        return subprocess.call([sys.executable, "-m", "tpt_jax.cli", *_argv(args)], env=env)
    plan = make_plan(cfg, args.devices, (args.only,) if args.only else ("train", "sample"),
                     tpu=args.tpu)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
