"""The paged KV cache on the device: a page pool per layer and the attention that reads a
slot's pages through its page table (`pages.PageTable` decides which pages a slot holds).

- `init_pool` / `pool_shardings`: one [pages, kv_heads, page, head_dim] pool per layer (pages
  replicated over the data axes, so any slot can hold any page; heads over tensor).
- `PagedCache`: the pools plus, for one decode step, each slot's page table cut to the pages a
  chunk can reach, the column offset of its positions and whether it is live. Its layers
  (`PagedView`) write the step's keys into the slot's page and attend over the gathered pages
  with the dense path's own `attention.cached_attention`: the cost follows the chunk's page
  count (the longest live row, rounded up to a page bucket), not the reserved length.

A slot's column c holds position c - offset (offset = prompt bucket - prompt length, as in the
dense cache's left-padded layout); columns before the prompt or past the step's column are
masked, exactly the columns the dense cache marks empty.
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

POOL_AXES = (None, "cache_kv_heads", None, "head_dim")


def init_pool(cfg: ModelConfig, pages: int, page: int, dtype: Any) -> tuple:
    shape = (pages, cfg.num_kv_heads, page, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return zeros(), zeros()


def pool_shardings(cfg: ModelConfig, pages: int, page: int, mesh, rules) -> tuple:
    shape = (pages, cfg.num_kv_heads, page, cfg.head_dim)
    sh = NamedSharding(mesh, logical_to_spec(POOL_AXES, rules, mesh, shape))
    return (sh,) * cfg.num_layers, (sh,) * cfg.num_layers


def constrain_pool(pool: tuple) -> tuple:
    return tuple(tuple(constrain(x, POOL_AXES) for x in part) for part in pool)


def pool_bytes(cfg: ModelConfig, pages: int, page: int, dtype: Any) -> int:
    """Device bytes of a pool of `pages` pages (keys and values, every layer)."""
    return (2 * cfg.num_layers * pages * page * cfg.num_kv_heads * cfg.head_dim
            * jnp.dtype(dtype).itemsize)


@flax.struct.dataclass
class PagedView:
    """One layer of a `PagedCache` for `attention.attend`."""

    k: Array  # [pages, K, page, H]
    v: Array
    table: Array  # [B, P] page ids (out of range: none held)
    index: Array  # [B] the column this step writes
    key_pos: Array  # [B, P * page] positions of the gathered columns (-1: masked)
    live: Array  # [B] rows that write (done rows' pages may already be someone else's)

    def attend(self, q: Array, k: Array, v: Array, positions: Array, sliding: bool,
               cfg: ModelConfig) -> tuple[Array, "PagedView"]:
        k_pool, v_pool = self._write(self.k, k), self._write(self.v, v)
        out = A.cached_attention(q, self._gather(k_pool, q.dtype), self._gather(v_pool, q.dtype),
                                 self.key_pos, positions, sliding, cfg)
        return out, self.replace(k=k_pool, v=v_pool)

    def _write(self, pool: Array, new: Array) -> Array:
        """new [B, 1, K, H] into each live row's page at column `index`."""
        page = pool.shape[2]
        at = jnp.take_along_axis(self.table, (self.index // page)[:, None], axis=1)[:, 0]
        at = jnp.where(self.live, at, pool.shape[0])
        return pool.at[at, :, self.index % page].set(new[:, 0].astype(pool.dtype), mode="drop")

    def _gather(self, pool: Array, dtype: Any) -> Array:
        """The rows' pages [B, K, P * page, H] (entries past a row's pages read some page,
        masked by key_pos)."""
        B, P = self.table.shape
        _, K, page, H = pool.shape
        pages = jnp.take(pool, self.table, axis=0, mode="clip")  # [B, P, K, page, H]
        return jnp.swapaxes(pages, 1, 2).reshape(B, K, P * page, H).astype(dtype)


@flax.struct.dataclass
class PagedCache:
    """Pools per layer, and for the current step: page tables [B, P], position offsets [B]
    and live rows [B]."""

    k: tuple
    v: tuple
    table: Array
    offset: Array
    live: Array

    def views(self, positions: Array, index: Array) -> list:
        page = self.k[0].shape[2]
        col = jnp.arange(self.table.shape[1] * page, dtype=jnp.int32)[None]
        key_pos = col - self.offset[:, None]
        key_pos = jnp.where((key_pos >= 0) & (col <= index[:, None]), key_pos, -1)
        return [PagedView(k=k, v=v, table=self.table, index=index, key_pos=key_pos,
                          live=self.live) for k, v in zip(self.k, self.v)]

    def from_views(self, views: list) -> "PagedCache":
        return self.replace(k=tuple(x.k for x in views), v=tuple(x.v for x in views))

    def constrain(self) -> "PagedCache":
        k, v = constrain_pool((self.k, self.v))
        return self.replace(k=k, v=v)
