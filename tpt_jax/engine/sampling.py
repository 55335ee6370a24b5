"""How tokens are drawn: the sampling settings and per-row randomness.

A row's token i is drawn with key fold_in(row key, i), row key = fold_in(fold_in(key(seed),
hash(question id)), sample index), so a sample's tokens never depend on its slot, when it
started or what ran beside it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tpt_jax.config import validate_sampling

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def validate(self) -> "SamplingConfig":
        validate_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        return self


def row_keys(seed: Array, id_hashes: Array, samples: Array) -> Array:
    """Per-row PRNG keys from (seed, question id hash, sample index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda h, s: jax.random.fold_in(jax.random.fold_in(base, h), s))(
        id_hashes, samples)


def step_keys(keys: Array, steps: Array) -> Array:
    """The key of each row's token `steps` (a scalar or one step per row)."""
    return jax.vmap(jax.random.fold_in, (0, 0 if jnp.ndim(steps) else None))(keys, steps)


def sample_logits(logits: Array, keys: Array, cfg: SamplingConfig) -> Array:
    """Draw one token per row from logits [R, V] with per-row keys [R].

    Temperature first, then top-k, then top-p (the smallest set of most likely tokens whose mass
    reaches top_p; the first token is always kept), as in HF `generate`. Top-k uses `lax.top_k`,
    so a 256k vocabulary is never fully sorted unless top-p alone is asked for."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    vocab = logits.shape[-1]
    k = cfg.top_k if 0 < cfg.top_k < vocab else 0
    if k == 0 and cfg.top_p < 1:
        k = vocab
    draw = jax.vmap(jax.random.categorical)
    if k == 0:
        return draw(keys, logits).astype(jnp.int32)
    vals, idx = jax.lax.top_k(logits, k)  # sorted, largest first
    if cfg.top_p < 1:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        vals = jnp.where(before < cfg.top_p, vals, -jnp.inf)
    choice = draw(keys, vals)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
