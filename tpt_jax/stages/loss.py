"""Cross-entropy over vocabulary chunks: the f32 [batch, length, vocab] logits never exist at once.

Gemma's vocabulary is 256k: full f32 logits for a batch of 8 x 1600 tokens would take 13 GB.
`chunked_cross_entropy` scans over vocabulary chunks, keeping a running log-sum-exp and the
target's logit; the chunk body is rematerialised (`jax.checkpoint`), so the backward pass also
holds one chunk's logits at a time. The final soft-cap applies element-wise, so it chunks
exactly.

Chunks are strided: chunk i holds vocabulary ids {i, i + n, i + 2n, ...}. Reshaping the
[V, D] embedding to [V/n, n, D] keeps the tensor-parallel sharding of the vocabulary on the
leading axis, so each device computes the logits of its own rows and no slice crosses devices.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tpt_jax.gemma.config import ModelConfig
from tpt_jax.gemma.attention import softcap

Array = jax.Array


@jax.custom_vjp
def _tied_matmul(hidden: Array, embedding: Array) -> Array:
    """hidden [..., D] x embedding [V, D] -> f32 logits [..., V] (as `logits_from_hidden`,
    before the soft-cap). The backward is written out as two 2-D matmuls: left to autodiff,
    XLA:CPU fuses the logits gradient into a strided transpose that costs more than the
    matmuls themselves."""
    return jnp.einsum("...d,vd->...v", hidden, embedding.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def _tied_fwd(hidden, embedding):
    return _tied_matmul(hidden, embedding), (hidden, embedding)


def _tied_bwd(res, g):
    hidden, embedding = res
    dt = hidden.dtype
    g = g.astype(dt)
    dh = jnp.einsum("...v,vd->...d", g, embedding.astype(dt), preferred_element_type=jnp.float32)
    g2, h2 = g.reshape(-1, g.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
    de = jnp.dot(g2.T, h2, preferred_element_type=jnp.float32)
    return dh.astype(dt), de.astype(embedding.dtype)


_tied_matmul.defvjp(_tied_fwd, _tied_bwd)


def tied_logits(hidden: Array, embedding: Array, cfg: ModelConfig) -> Array:
    """Same values as `model.logits_from_hidden` (tied projection + final soft-cap, f32)."""
    return softcap(_tied_matmul(hidden, embedding), cfg.final_logit_softcap)


def plain_cross_entropy(hidden: Array, embedding: Array, targets: Array, cfg: ModelConfig) -> Array:
    """Reference: per-token cross-entropy [B, T] from the full logits."""
    logits = tied_logits(hidden, embedding, cfg)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


def num_chunks(vocab: int, chunk: int) -> int:
    """Smallest n >= ceil(vocab / chunk) that divides vocab (no padding), else ceil(...)."""
    lo = max(1, math.ceil(vocab / max(1, chunk)))
    for n in range(lo, min(vocab, 2 * lo) + 1):
        if vocab % n == 0:
            return n
    return lo


def chunked_cross_entropy(hidden: Array, embedding: Array, targets: Array, cfg: ModelConfig,
                          chunk: int = 8192) -> Array:
    """Per-token cross-entropy [B, T] (f32) of `targets` under the tied-embedding logits of
    `hidden` [B, T, D], computed `chunk` vocabulary rows at a time."""
    V, D = embedding.shape
    n = num_chunks(V, chunk)
    if n == 1:
        return plain_cross_entropy(hidden, embedding, targets, cfg)
    padded = math.ceil(V / n) * n
    if padded != V:  # no divisor near V / chunk: pad with rows that are masked out below
        embedding = jnp.pad(embedding, ((0, padded - V), (0, 0)))
    c = padded // n
    emb = embedding.reshape(c, n, D)  # row a*n + i -> [a, i]
    row, col = targets // n, targets % n  # the target's place in the strided chunks

    @jax.checkpoint
    def body(carry, i):
        m, s, tgt = carry
        w = jax.lax.dynamic_index_in_dim(emb, i, axis=1, keepdims=False)  # [c, D]
        logits = tied_logits(hidden, w, cfg)  # [B, T, c] f32
        if padded != V:
            valid = jnp.arange(c) * n + i < V
            logits = jnp.where(valid, logits, -jnp.inf)
        # The shift only keeps exp() in range; the result does not depend on it.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        hit = jnp.take_along_axis(logits, row[..., None], axis=-1)[..., 0]
        tgt = tgt + jnp.where(col == i, hit, 0.0)
        return (m_new, s, tgt), None

    B, T = targets.shape
    init = (jnp.full((B, T), -1e30, jnp.float32), jnp.zeros((B, T), jnp.float32),
            jnp.zeros((B, T), jnp.float32))
    (m, s, tgt), _ = jax.lax.scan(body, init, jnp.arange(n))
    return m + jnp.log(s) - tgt
