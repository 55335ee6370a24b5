"""Yardstick for `tpt bench sample --shape small --batch 16 --prompt 64 --new 128`: tokens/s of
a bare loop of one decode step's matmuls (q, k+v, o, gate, up, down per layer, then the
vocabulary projection) over the small shape's weights at batch 16, float32, 128 steps. No
attention, norms, sampling or prefill: an upper bound for any float32 sampler on this machine.

    python docs/decode_floor.py
"""
import json
import time

import jax
import jax.numpy as jnp

B, D, F, V, LAYERS, STEPS = 16, 512, 2048, 8192, 4, 128
key = jax.random.key(0)
shapes = dict(q=(D, 512), kv=(D, 512), o=(512, D), gate=(D, F), up=(D, F), down=(F, D))
weights = [{n: jax.random.normal(key, s) for n, s in shapes.items()} for _ in range(LAYERS)]
unembed = jax.random.normal(key, (D, V))


@jax.jit
def decode(x, weights, unembed):
    def step(_, x):
        for w in weights:
            x = x + (x @ w["q"] + x @ w["kv"]) @ w["o"]
            x = x + (jax.nn.gelu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
        return x + (x @ unembed)[:, :D] * 1e-3
    return jax.lax.fori_loop(0, STEPS, step, x)


x = jnp.ones((B, D))
decode(x, weights, unembed).block_until_ready()
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter()
    decode(x, weights, unembed).block_until_ready()
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"system": "matmul-floor", "batch": B, "new": STEPS, "best_s": round(best, 3),
                  "tokens_per_s": round(B * STEPS / best, 1)}))
