"""The sampler's KV caches, their logical axes and shardings (the one place that knows them).

- `SlotCache`: the decode slots' cache, one [slots, kv_heads, length, head_dim] array per
  layer (no layer axis: a stacked cache sliced per layer inside the decode loop would be
  copied every step) and the position held in each column ([slots, length], -1 = empty).
- `Store`: prompts prefilled once and waiting for their samples to start, in the same layout.
- `LayerView`: one layer of a `SlotCache` as attention sees it (`gemma.attention.attend`
  calls its `attend`): it writes the step's keys and attends over every column.

A slot's columns are [0, bucket) for its left-padded prompt, then one per drawn token; the
length is the largest bucket + max_new_tokens, the same for every row, so a row's numerics
never depend on what runs beside it.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from tpt_jax.gemma import attention as A
from tpt_jax.gemma.config import ModelConfig
from tpt_jax.gemma.sharding import constrain, logical_to_spec

Array = jax.Array

CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
POS_AXES = ("cache_batch", "cache_length")


def cache_length(length: int) -> int:
    """Columns to allocate for `length` positions: long caches round up to whole blocks of
    `attention.CACHE_BLOCK` (scored block by block, see `attention.cached_logits`)."""
    if length <= A.LONG_CACHE:
        return length
    return -(-length // A.CACHE_BLOCK) * A.CACHE_BLOCK


@flax.struct.dataclass
class SlotCache:
    """Keys/values per layer [B, K, S, H] and the position in each column [B, S]."""

    k: tuple
    v: tuple
    pos: Array

    def views(self, positions: Array, index: Array) -> list:
        """Per layer, the view `attention.attend` writes through (positions [B, T] written
        at column `index` first)."""
        key_pos = write_positions(self.pos, positions, index)
        return [LayerView(k=k, v=v, pos=key_pos, index=index) for k, v in zip(self.k, self.v)]

    def from_views(self, views: list) -> "SlotCache":
        return SlotCache(k=tuple(x.k for x in views), v=tuple(x.v for x in views),
                         pos=views[0].pos)


@flax.struct.dataclass
class LayerView:
    """One layer of a `SlotCache` for `attention.attend`: keys/values [B, K, S, H], the column
    positions with this step's already written, and the column this step writes (a scalar
    for every row, or one per row)."""

    k: Array
    v: Array
    pos: Array
    index: Array

    def attend(self, q: Array, k: Array, v: Array, positions: Array, sliding: bool,
               cfg: ModelConfig) -> tuple[Array, "LayerView"]:
        k_all, v_all = self._write(self.k, k), self._write(self.v, v)
        out = A.cached_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), self.pos,
                                 positions, sliding, cfg)
        return out, self.replace(k=k_all, v=v_all)

    def _write(self, cache: Array, new: Array) -> Array:
        """new [B, T, K, H] into cache [B, K, S, H] at column `index` (in place when donated)."""
        new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)
        if jnp.ndim(self.index) == 1:  # a column per row (continuous batching)
            write = lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0))
            return jax.vmap(write)(cache, new, self.index)
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, self.index, 0))


def write_positions(pos: Array, positions: Array, index: Array) -> Array:
    """pos [B, S] with positions [B, T] written at column `index` (scalar or one per row)."""
    positions = positions.astype(jnp.int32)
    if jnp.ndim(index):
        write = lambda x, n, i: jax.lax.dynamic_update_slice_in_dim(x, n, i, axis=0)
        return jax.vmap(write)(pos, positions, index)
    return jax.lax.dynamic_update_slice(pos, positions, (0, index))


def init_cache(cfg: ModelConfig, rows: int, length: int, dtype: Any = jnp.float32) -> SlotCache:
    shape = (rows, cfg.num_kv_heads, length, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return SlotCache(k=zeros(), v=zeros(), pos=jnp.full((rows, length), -1, jnp.int32))


def constrain_cache(c: SlotCache) -> SlotCache:
    return SlotCache(k=tuple(constrain(x, CACHE_AXES) for x in c.k),
                     v=tuple(constrain(x, CACHE_AXES) for x in c.v),
                     pos=constrain(c.pos, POS_AXES))


def cache_shardings(cfg: ModelConfig, rows: int, length: int, mesh, rules) -> SlotCache:
    """NamedShardings of a [rows, length] `SlotCache` (slots over data/fsdp, heads over
    tensor, as the rules say)."""
    shape = (rows, cfg.num_kv_heads, length, cfg.head_dim)
    kv = NamedSharding(mesh, logical_to_spec(CACHE_AXES, rules, mesh, shape))
    pos = NamedSharding(mesh, logical_to_spec(POS_AXES, rules, mesh, (rows, length)))
    return SlotCache(k=(kv,) * cfg.num_layers, v=(kv,) * cfg.num_layers, pos=pos)


def cache_bytes(cfg: ModelConfig, rows: int, length: int, dtype: Any) -> int:
    """Device bytes of a [rows, length] `SlotCache` (keys, values, column positions)."""
    per_column = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return rows * length * (per_column + 4)


@flax.struct.dataclass
class Store:
    """Prefilled prompts waiting for (more of) their samples to start: keys/values [E, K, Lp, H]
    per layer (left-padded to their bucket, columns past it empty), positions [E, Lp], the
    logits of the last prompt position [E, V], the bucket and the prompt length [E]."""

    k: tuple
    v: tuple
    pos: Array
    logits: Array
    start: Array
    pos0: Array


def init_store(cfg: ModelConfig, entries: int, length: int, dtype: Any) -> Store:
    c = init_cache(cfg, entries, length, dtype)
    z = jnp.zeros((entries,), jnp.int32)
    return constrain_store(Store(k=c.k, v=c.v, pos=c.pos, start=z, pos0=z,
                                 logits=jnp.zeros((entries, cfg.vocab_size), jnp.float32)))


def constrain_store(s: Store) -> Store:
    c = constrain_cache(SlotCache(k=s.k, v=s.v, pos=s.pos))
    row = lambda x: constrain(x, ("cache_batch",) + (None,) * (x.ndim - 1))
    return Store(k=c.k, v=c.v, pos=c.pos, logits=row(s.logits), start=row(s.start),
                 pos0=row(s.pos0))
