"""`tpt bench sample`: the sampler (`Sampler.generate`, the engine behind Think) on a randomly
initialised model of a peer shape, one JSON line.

Uniform workload (default): `--batch` prompts x `--n` samples, every row runs to `--new` tokens
(no EOS); tokens/s of the best of `--repeats` calls after a compile call, as the peer scripts.

Ragged workload (`--lengths FILE`, a JSON list of per-row lengths, e.g. from
../shared/peers/ragged_lengths.py): one prompt a length (`--n` samples of it, each running to
it), the length as its token limit and no EOS, so every path does the same useful work;
`--batch` decode slots. Every program is
compiled first (`Sampler.warm_up`), then one timed call: `useful_tokens_per_s` = sum of the
lengths / wall time, `slot_utilization` = useful tokens / (slots x decode steps), a step being
one decode step of every slot (the step that inserts rows and draws their first tokens counts
as one). Rows start in file order, as in Think, which cannot know a trace's length before it
ends, in one generate call, as Think streams its shards (`--per-call P`: a call every P
prompts, each waiting for the last to end); `--longest-first` starts the longest limits first
(the best case, with lengths known in advance). `--static` runs the same rows through static
batches in file order (each runs to its longest row: the peer's best case).

Bytes a decode step moves: `weights_mib` (read once a step), `kv_read_mib_per_step` (the dense
slot cache: every column of every slot, whatever its live length) and `kv_live_mib_per_step`
(the columns rows actually hold, averaged over the run's steps). On an accelerator the HBM
bandwidth is measured in-process (`hbm_gbps`, a sum over 4 GiB) and
`roofline_share` = (weights + live KV) / bandwidth / measured step time: how close the step is
to what reading only live keys would allow.

Memory: `decode_kv_mib` is the decode cache (dense) or page pool (paged, `--kv-cache-gb`),
all devices together (`decode_kv_mib_a_device`: what one device holds), and `rows_per_gb`
the rows decoding on an average step per GB of it: a dense slot holds its reservation
whatever its row's length, a paged pool holds rows by their live pages (a
prompt's full pages shared by its samples), admitting rows while pages last and preempting
(`preempted`, `preempted_tokens`: started again, tokens thrown away) when they run out.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from tpt_jax import io
from tpt_jax.config import ConfigError, TptError
from tpt_jax.gemma import model as M
from tpt_jax.gemma.sharding import SAMPLE_RULES
from tpt_jax.engine import Sampler, SamplingConfig
from tpt_jax.engine.cache import cache_bytes
from tpt_jax.engine.contract import DRAWN, Stats
from tpt_jax.engine.programs import TRACE_COUNT


def add_bench_cli(parser) -> None:
    from tpt_jax.gemma.config import MODEL_PRESETS
    parser.add_argument("--shape", "--config", dest="shape", default="small",
                        choices=sorted(MODEL_PRESETS),
                        help="model preset (tiny/small match ../shared/peers/configs.py)")
    parser.add_argument("--batch", type=int, default=16,
                        help="prompts per batch (uniform); decode slots (--lengths)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (shared prefill)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row (no early stop)")
    parser.add_argument("--lengths", metavar="FILE",
                        help="JSON list of per-row token limits: the ragged workload")
    parser.add_argument("--static", action="store_true",
                        help="static batches (the reference) instead of continuous batching")
    parser.add_argument("--longest-first", action="store_true",
                        help="start the longest rows first (lengths known in advance: the best "
                             "case), not in file order (as in Think, where EOS decides lengths)")
    parser.add_argument("--per-call", type=int, default=None, metavar="P",
                        help="ragged: P prompts a generate call, one call after another (a "
                             "call a Think shard; Think streams its shards through one call)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the compile")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = rest)")
    parser.add_argument("--attention", default="auto",
                        choices=["auto", "dense", "paged", "pallas"],
                        help="decode cache: dense slots, or pages rows take as they grow "
                             "(pallas: read by the Pallas GPU/TPU kernel; auto: dense on CPU, "
                             "paged on one accelerator device)")
    parser.add_argument("--kv-cache-gb", type=float, default=None,
                        help="paged: the page pool's size (default: every slot at its longest)")
    parser.add_argument("--kv-cache-share", type=float, default=None,
                        help="paged, instead of --kv-cache-gb: the pool's share of each "
                             "device's free memory (GPU, TPU)")
    parser.set_defaults(func=_bench)


def read_lengths(path: str) -> list[int]:
    """A JSON list of positive integers, or a one-line TptError naming the file."""
    try:
        data = io.read_json(path, list)
    except TptError as e:
        raise TptError(f"--lengths {e}") from None
    if not data or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in data):
        raise TptError(f"--lengths {path}: must be a non-empty JSON list of positive integers")
    return data


def kv_bytes(sampler: Sampler, static: bool, batch_prompts: int) -> int:
    """Device bytes of the KV cache (keys, values, slot positions) the path keeps: the decode
    cache + the prompt store (continuous), the decode cache + the prefill cache inside the
    program (static: one entry per prompt of a batch)."""
    total = sampler.device.kv_bytes()
    if static:
        total += cache_bytes(sampler.model.cfg, batch_prompts, sampler.buckets[-1],
                             sampler.model.dtype)
    return total


def added(calls: list[Stats]) -> Stats:
    """The Stats of generate calls run one after another, as one."""
    counts = (*DRAWN, "decode_steps", "prefills", "host_checks")
    return dataclasses.replace(calls[0], **{k: sum(getattr(c, k) for c in calls)
                                            for k in counts})


def memory(sampler: Sampler, stats, static: bool) -> dict:
    """Decode cache bytes and the rows it held on an average decode step (preempted rows'
    thrown-away steps included: they held pages too)."""
    decode = sampler.device.kv_bytes(("cache", "pool"))
    running = stats.tokens / max(stats.decode_steps, 1)
    one = sampler.device.kv_bytes(("cache", "pool"), one_device=True)
    out = {"decode_kv_mib": round(decode / 2 ** 20, 1),
           "decode_kv_mib_a_device": round(one / 2 ** 20, 1),  # where the mesh splits it
           "mean_running_rows": round(running, 1),
           "rows_per_gb": round(running / (decode / 1e9), 2)}
    if sampler.attention != "dense" and not static:
        peak, pages = sampler.device.pages_used
        out.update(pool_pages=pages, peak_pages=peak, preempted=stats.preempted,
                   preempted_tokens=stats.preempted_tokens)
    return out


def measure_bandwidth(nbytes: int = 2 ** 32, repeats: int = 5) -> float:
    """Device memory read bandwidth in GB/s: median of a jitted sum over `nbytes` of bf16 (a
    decode step mostly reads: weights and keys)."""
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 2 // 4096, 4096), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32))
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times)) / 1e9


def step_bytes(sampler: Sampler, lengths: list, prompt: int, decode_steps: int,
               rows_read: int, static: bool, columns_read: int) -> dict:
    """Bytes a decode step reads: weights, the cache columns attention read (static: the
    whole dense cache of `rows_read` slots; continuous: `columns_read`, as the device counted
    them, the chunks' page buckets when paged), and the live columns only (row of length L
    reads prompt + t columns at its step t)."""
    cfg, dtype = sampler.model.cfg, sampler.model.dtype
    column = cache_bytes(cfg, 1, 1, dtype)
    weights = sum(x.nbytes for x in jax.tree.leaves(sampler.device.params))
    steps = max(decode_steps, 1)
    read = (rows_read * sampler.cache_length(max(lengths)) if static
            else columns_read / steps)
    live = sum(L * prompt + L * (L + 1) // 2 for L in lengths) / steps
    return {"weights": weights, "kv_read": read * column, "kv_live": live * column}


def _bench(args) -> int:
    from tpt_jax.gemma.config import model_preset
    from tpt_jax.gemma.sharding import make_mesh, parse_mesh
    for name in ("batch", "n", "prompt", "new", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    if args.per_call is not None and (args.per_call < 1 or not args.lengths):
        raise ConfigError("--per-call must be >= 1 and goes with --lengths")
    lengths = read_lengths(args.lengths) if args.lengths else None
    cfg = model_preset(args.shape)
    model = M.make_model(cfg, args.dtype, args.dtype)
    mesh = make_mesh(parse_mesh(args.mesh))
    params = M.init_params(model, jax.random.key(0), mesh, SAMPLE_RULES)
    rows = args.batch if lengths else args.batch * args.n
    sampler = Sampler(model, params, mesh, rows=rows, buckets=(args.prompt,), eos_id=None,
                      attention=args.attention, kv_cache_gb=args.kv_cache_gb,
                      kv_cache_share=args.kv_cache_share)
    rng = np.random.default_rng(0)
    count = len(lengths) if lengths else args.batch
    prompts = [[2] + rng.integers(3, cfg.vocab_size, size=args.prompt - 1).tolist()
               for _ in range(count)]
    new = max(lengths) if lengths else args.new
    sampling = SamplingConfig(temperature=0.8, top_k=50, max_new_tokens=new)
    info = {"system": "tpt_jax",
            "path": "static" if args.static else "continuous" + ("-longest-first" if args.longest_first else ""),
            "shape": args.shape, "backend": jax.default_backend(), "devices": len(jax.devices()),
            "slots": rows, "prompt": args.prompt, "attention": sampler.attention}

    def run(seed):
        t0, c0 = time.perf_counter(), time.process_time()
        step, res, calls, columns = args.per_call or len(prompts), [], [], 0
        for a in range(0, len(prompts), step):
            b = min(a + step, len(prompts))
            res += sampler.generate(prompts[a:b], sampling, n=args.n,
                                    ids=[str(i) for i in range(a, b)], seed=seed,
                                    static=args.static,
                                    max_new_tokens=None if lengths is None else lengths[a:b],
                                    longest_first=args.longest_first)
            calls.append(sampler.stats)
            columns += 0 if args.static else sampler.device.columns_read
        sampler.stats = added(calls)
        n_tok = sum(len(s.tokens) for r in res for s in r)
        return time.perf_counter() - t0, time.process_time() - c0, n_tok, columns

    if lengths:
        t0 = time.perf_counter()
        sampler.warm_up(sampling, static=args.static)
        compile_s = time.perf_counter() - t0
        before = sum(TRACE_COUNT.values())
        wall, cpu, n_tok, columns = run(1)
        s = sampler.stats
        assert n_tok == args.n * sum(lengths), (n_tok, args.n * sum(lengths))
        moved = step_bytes(sampler, [L for L in lengths for _ in range(args.n)], args.prompt,
                           s.decode_steps, rows, args.static, columns)
        step_s = wall / max(s.decode_steps, 1)
        roof = {}
        if jax.default_backend() != "cpu":
            gbps = measure_bandwidth()
            roof = {"hbm_gbps": round(gbps, 1), "roofline_share": round(
                (moved["weights"] + moved["kv_live"]) / (gbps * 1e9) / step_s, 3)}
        print(json.dumps({
            **info, "workload": "ragged", "prompts": len(lengths), "n": args.n,
            "rows": args.n * len(lengths), "max_new": new,
            "prompts_a_call": args.per_call or len(lengths),
            "useful_tokens": n_tok, "decode_steps": s.decode_steps,
            "slot_utilization": s.slot_utilization, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "useful_tokens_per_s": round(n_tok / wall, 1),
            "step_ms": round(1e3 * wall / max(s.decode_steps, 1), 2),
            "host_checks": s.host_checks, "prefills": s.prefills,
            "warm_up_s": round(compile_s, 1), "compiles": sum(TRACE_COUNT.values()) - before,
            "kv_cache_mib": round(kv_bytes(sampler, args.static, rows) / 2 ** 20, 1),
            "weights_mib": round(moved["weights"] / 2 ** 20, 1),
            "kv_read_mib_per_step": round(moved["kv_read"] / 2 ** 20, 1),
            "kv_live_mib_per_step": round(moved["kv_live"] / 2 ** 20, 1),
            **memory(sampler, s, args.static), **roof}))
        return 0

    first = run(0)[0]
    times, cpu = [], []
    for r in range(args.repeats):
        dt, dc, n_tok, _ = run(r + 1)
        times.append(dt)
        cpu.append(dc)
    best = min(times)
    print(json.dumps({
        **info, "workload": "uniform", "batch": args.batch, "n": args.n, "rows": rows,
        "new": args.new, "generated_tokens": n_tok, "first_call_s": round(first, 3),
        "best_s": round(best, 3), "median_s": round(float(np.median(times)), 3),
        "cpu_s": round(min(cpu), 3), "tokens_per_s": round(n_tok / best, 1),
        "slot_utilization": sampler.stats.slot_utilization,
        "compiles": sum(TRACE_COUNT.values())}))
    return 0
