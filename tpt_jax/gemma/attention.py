"""Attention after the projections (every family): one entry point, `attend`, chosen by the
cache.

The training forward has no cache: queries attend within their sequence (`self_attention`).
Sampling hands each layer a cache object that implements

    cache.attend(q, k, v, positions, sliding, cfg) -> (out [B, T, N, H], updated cache)

(the engine's slot cache writes the new keys and calls `cached_attention`; a paged cache or a
kernel is one more such class), so the model never knows how keys are stored.

Masks come from positions: a key with position < 0 is padding or an empty cache slot and is
never attended to; local (sliding-window) layers see the last `sliding_window` positions.
Logits are computed in f32 and soft-capped where the config has a cap (Gemma2).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp

from tpt_jax.gemma.config import ModelConfig
from tpt_jax.gemma.sharding import constrain

Array = jax.Array

# Caches longer than this are scored in blocks of CACHE_BLOCK slots (see `cached_logits`).
LONG_CACHE = 256
CACHE_BLOCK = 64

HEADS_AXES = ("act_batch", "act_length", "act_heads", None)


class Cache(Protocol):
    """What a sampling cache gives attention: write this step's keys, attend over the cache."""

    def attend(self, q: Array, k: Array, v: Array, positions: Array, sliding: bool,
               cfg: ModelConfig) -> tuple[Array, "Cache"]: ...


def softcap(x: Array, cap: Optional[float]) -> Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def attend(q: Array, k: Array, v: Array, positions: Array, segment_ids: Optional[Array],
           cache: Optional[Cache], sliding: bool, cfg: ModelConfig) -> tuple[Array, Any]:
    """q [B, T, N, H] (scaled), k/v [B, T, K, H] of the T new tokens -> (out [B, T, N, H],
    the updated cache or None)."""
    if cache is None:
        return self_attention(q, k, v, positions, segment_ids, sliding, cfg), None
    return cache.attend(q, k, v, positions, sliding, cfg)


def key_mask(query_pos: Array, key_pos: Array, sliding: bool, cfg: ModelConfig) -> Array:
    """[B, T, S]: causal over positions, padding/empty keys (position < 0) never seen, and the
    sliding window on local layers."""
    qp, kp = query_pos[:, :, None], key_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if sliding:
        mask &= qp - kp < cfg.sliding_window
    return mask


def self_attention(q: Array, k: Array, v: Array, positions: Array,
                   segment_ids: Optional[Array], sliding: bool, cfg: ModelConfig) -> Array:
    """Attention within the sequence (training, scoring): keys [B, S, K, H]; packed rows
    attend only within their segment."""
    B, T, N, H = q.shape
    K = k.shape[2]
    mask = key_mask(positions, positions, sliding, cfg)
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    qg = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], softcap(logits, cfg.attn_logit_softcap),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)
    return constrain(out, HEADS_AXES)


def cached_logits(q: Array, k: Array) -> Array:
    """Attention logits [B, K, Q, S] (f32) of queries q [B, K, Q, H] over a cache k [B, K, S, H].

    Up to LONG_CACHE slots, or for many queries (a prefill): one batched matmul. A decode step
    over a longer cache views it (a free reshape) as S / CACHE_BLOCK blocks of CACHE_BLOCK
    slots, one matmul per block: on XLA:CPU the single [Q, H] x [S, H]^T matmul falls off a
    cliff past a few hundred slots (45 ms at 32 rows x 1088 slots of the small shape, against
    5 ms blocked). A block's logits do not depend on how many blocks there are, so a row's
    results are the same at every (long) cache length."""
    B, K, S, H = k.shape
    if S <= LONG_CACHE or S % CACHE_BLOCK or q.shape[2] > 16:
        return jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32)
    kb = k.reshape(B, K, S // CACHE_BLOCK, CACHE_BLOCK, H)
    logits = jnp.einsum("BKQH,BKNSH->BKNQS", q, kb, preferred_element_type=jnp.float32)
    return jnp.swapaxes(logits, 2, 3).reshape(B, K, q.shape[2], S)


def cached_attention(q: Array, k_cache: Array, v_cache: Array, key_pos: Array,
                     positions: Array, sliding: bool, cfg: ModelConfig) -> Array:
    """Queries q [B, T, N, H] over a dense cache [B, K, S, H] whose slots hold positions
    key_pos [B, S]: the T*G queries of a kv head form one matrix, so a decode step is a plain
    batched matmul with no transpose of the cache."""
    B, T, N, H = q.shape
    K = k_cache.shape[1]
    G = N // K
    qg = jnp.swapaxes(q.reshape(B, T, K, G, H), 1, 2).reshape(B, K, T * G, H)
    logits = cached_logits(qg, k_cache)
    mask = key_mask(positions, key_pos, sliding, cfg)
    mask = jnp.repeat(mask, G, axis=1) if G > 1 else mask  # query t*G + g
    logits = jnp.where(mask[:, None], softcap(logits, cfg.attn_logit_softcap),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v_cache).reshape(B, K, T, G, H)
    return constrain(jnp.swapaxes(out, 1, 2).reshape(B, T, N, H), HEADS_AXES)
