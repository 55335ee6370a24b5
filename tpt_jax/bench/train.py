"""`tpt bench train`: trained tokens/s and MFU of the SFT step, one JSON line.

The step timed is the one `train` runs (sharded over all local devices, state donated) on
random tokens with the first quarter of each row masked out of the loss, as in the Tunix peer
benchmark (../shared/peers/tunix_train_bench.py). MFU is against a peak measured on the same
machine: the best FLOP/s of a large jitted matmul in the compute dtype. Model FLOPs per token
are PaLM's 6 N + 12 L H Dh T (N = all parameters, the tied embedding counted once as the
output projection; attention counted without the causal half, as it is computed); with the
loss compacted to trained positions (`--loss-bucket`, on by default) the output projection is
counted only at the positions that reach it, so skipped work is not credited.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.config import TrainConfig

from tpt_jax.gemma.config import MODEL_PRESETS, model_preset
from tpt_jax.stages.sft_data import compact_targets


def add_bench_cli(parser) -> None:
    parser.add_argument("--shape", default="small", choices=list(MODEL_PRESETS),
                        help="model preset (tiny/small match ../shared/peers/configs.py)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (params and optimizer state stay f32)")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--loss-chunk", type=int, default=TrainConfig.loss_chunk)
    parser.add_argument("--loss-bucket", type=int, default=TrainConfig.loss_bucket,
                        help="project only trained positions, padded to a multiple (0 = all)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--matmul", type=int, default=2048, help="peak-matmul size (n x n)")
    parser.set_defaults(func=_bench)


def peak_flops(n: int = 2048, dtype=jnp.float32, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def model_flops_per_step(cfg, n_params: int, batch: int, seq: int,
                         projected: Optional[int] = None) -> float:
    """6 N T + attention; with `projected` (positions that reach the vocabulary projection,
    when the loss skips the others) the tied output projection counts only those."""
    tokens = batch * seq
    attention = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
    out = (6.0 * n_params + attention) * tokens
    if projected is not None:
        out -= 6.0 * cfg.vocab_size * cfg.embed_dim * (tokens - projected)
    return out


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0, loss_bucket: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq)).astype(np.int32)
    weights = np.ones((batch, seq), np.float32)
    weights[:, : seq // 4] = 0.0  # the "prompt" is not trained on
    weights[:, -1] = 0.0  # no next token
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    return {"tokens": tokens, "positions": positions, "segments": np.ones_like(tokens),
            **compact_targets(targets, weights, loss_bucket)}


def _bench(args) -> int:
    from tpt_jax.gemma.model import count_params, init_params, make_model
    from tpt_jax.gemma.sharding import TRAIN_RULES
    from tpt_jax.stages.train_step import Stepper, check_batch, default_mesh, schedule_args

    mcfg = model_preset(args.shape)
    model = make_model(mcfg, args.dtype, "float32", args.remat)
    mesh = default_mesh()
    cfg = TrainConfig(batch_size=args.batch, max_length=args.seq, learning_rate=1e-4,
                      remat=args.remat, loss_chunk=args.loss_chunk, grad_accum=args.grad_accum,
                      loss_bucket=args.loss_bucket)
    check_batch(cfg, mesh)
    stepper = Stepper.get(model, cfg, mesh)
    params = init_params(model, jax.random.key(0), mesh, TRAIN_RULES)
    n_params = count_params(params)
    state = stepper.init_state(params, 0, copy=False)
    del params
    sched = schedule_args(cfg, args.warmup + args.steps)
    batch = random_batch(mcfg.vocab_size, args.batch, args.seq, loss_bucket=args.loss_bucket)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        state, metrics = stepper.train_step(state, batch, sched)
    jax.block_until_ready((state, metrics))
    warm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = stepper.train_step(state, batch, sched)
    jax.block_until_ready((state, metrics))
    dt = time.perf_counter() - t1
    peak = peak_flops(args.matmul, jnp.dtype(args.dtype))
    projected = batch["loss_pos"].size if args.loss_bucket else None
    flops = model_flops_per_step(mcfg, n_params, args.batch, args.seq, projected)
    step_s = dt / args.steps
    print(json.dumps({
        "system": "tpt_jax", "bench": "train", "config": args.shape,
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "mesh": dict(mesh.shape), "dtype": args.dtype, "remat": args.remat,
        "loss_bucket": args.loss_bucket, "batch": args.batch, "seq": args.seq, "steady_steps": args.steps, "warmup_s": round(warm_s, 3),
        "step_s": round(step_s, 4), "tokens_per_s": round(args.batch * args.seq / step_s, 1),
        "params": n_params, "model_flops_per_step": flops,
        "achieved_flops": round(flops / step_s), "peak_flops": round(peak),
        "mfu": round(flops / step_s / peak, 4), "loss": float(metrics["loss"])}))
    return 0
