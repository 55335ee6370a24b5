"""`tpt bench sample`: generated tokens/s of the sampler on random weights, every row to
`--new` with no early stop; one JSON line (peer: ../shared/peers/tunix_sample_bench.py)."""
from __future__ import annotations

import json
import time

import jax
import numpy as np

from tpt_jax.config import ConfigError
from tpt_jax.gemma import model as M
from tpt_jax.gemma.sharding import SAMPLE_RULES
from tpt_jax.stages.sampler import TRACE_COUNT, Sampler, SamplingConfig, parse_mesh


def add_bench_cli(parser) -> None:
    from tpt_jax.gemma.config import MODEL_PRESETS
    parser.add_argument("--shape", default="small", choices=sorted(MODEL_PRESETS),
                        help="model preset (tiny/small match ../shared/peers/configs.py)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (shared prefill)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row (no early stop)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the compile")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = rest)")
    parser.set_defaults(func=_bench)


def _bench(args) -> int:
    from tpt_jax.gemma.config import model_preset
    from tpt_jax.gemma.sharding import make_mesh
    for name in ("batch", "n", "prompt", "new", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    cfg = model_preset(args.shape)
    model = M.make_model(cfg, args.dtype, args.dtype)
    mesh = make_mesh(parse_mesh(args.mesh))
    params = M.init_params(model, jax.random.key(0), mesh, SAMPLE_RULES)
    rows = args.batch * args.n
    sampler = Sampler(model, params, mesh, rows=rows, buckets=(args.prompt,), eos_id=None)
    rng = np.random.default_rng(0)
    prompts = [[2] + rng.integers(3, cfg.vocab_size, size=args.prompt - 1).tolist()
               for _ in range(args.batch)]
    sampling = SamplingConfig(temperature=0.8, top_k=50, max_new_tokens=args.new)

    def run(seed):
        t0, c0 = time.perf_counter(), time.process_time()
        res = sampler.generate(prompts, sampling, n=args.n, seed=seed)
        n_tok = sum(len(s.tokens) for r in res for s in r)
        return time.perf_counter() - t0, time.process_time() - c0, n_tok

    first, _, _ = run(0)
    times, cpu = [], []
    for r in range(args.repeats):
        dt, dc, n_tok = run(r + 1)
        times.append(dt)
        cpu.append(dc)
    best = min(times)
    print(json.dumps({
        "system": "tpt_jax", "shape": args.shape, "backend": jax.default_backend(),
        "devices": len(jax.devices()), "batch": args.batch, "n": args.n, "rows": rows,
        "prompt": args.prompt, "new": args.new, "generated_tokens": n_tok,
        "first_call_s": round(first, 3), "best_s": round(best, 3),
        "median_s": round(float(np.median(times)), 3), "cpu_s": round(min(cpu), 3),
        "tokens_per_s": round(n_tok / best, 1),
        "compiles": TRACE_COUNT["generate"]}))
    return 0
