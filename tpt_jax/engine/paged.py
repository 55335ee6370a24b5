"""The paged KV cache on the device: a page pool per layer and the attention that reads a
slot's pages through its page table (`pages.PageTable` decides which pages a slot holds).

- `init_pool` / `pool_shardings`: one [kv_heads, pages, page, head_dim] pool per layer (the
  layout of the Pallas kernels; heads over tensor). Where the slots are split over devices
  (the data axes), the pages are split with them: each device holds its slots' pages, and
  the decode attention runs per device (`shard_map`) on its own slots and pages, with page
  ids local to the device (`pages.PageTable`).
- `PagedCache`: the pools plus, for one chunk of decode steps, each slot's page table, the
  column offset between the dense layout and the pages, whether each row is live, and which
  few rows are long. Its layers (`PagedView`) write the step's keys into the row's page and
  attend over the row's pages: the plain path (`plain_attention`) gathers them and scores
  them as the dense path's `attention.cached_attention` does, kv heads leading; most rows
  read the first `short` pages (a page bucket that covers them for the chunk) and the few
  longest (`long_rows`, an eighth of the slots at most) every page, so the cost follows the
  rows' lengths, not the longest row's; `kernel="gpu"` / `"tpu"` runs JAX's Pallas
  `paged_attention` for that platform (each row reads only its own pages; per-row lengths,
  Gemma2's soft-cap; the pool's layout is the one both kernels take) on layers where the
  sliding window cannot bite (global layers, or every layer while the pages read are within
  the window), the plain path on the others. `"gpu-interpret"` / `"tpu-interpret"` run the
  same kernels interpreted on CPU (the tests).

A row's prompt sits at columns [0, prompt length) of its pages (the dense cache left-pads it
to its bucket; `programs.insert_paged` shifts it), so column c holds position c: what the
kernel's per-row lengths assume, and a row takes pages for its own prompt, not its bucket.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from tpt_jax.gemma import attention as A
from tpt_jax.gemma.config import ModelConfig
from tpt_jax.gemma.sharding import active_rules, constrain, logical_to_spec

Array = jax.Array


def pool_axes(split: bool) -> tuple:
    """The pool's logical axes: pages split like the slots (`split`) or held whole."""
    return ("cache_kv_heads", "act_batch" if split else None, None, "head_dim")


KERNEL_PLATFORMS = ("gpu", "tpu")  # where JAX has a Pallas paged-attention kernel
KERNELS = ("plain", *KERNEL_PLATFORMS, *(f"{p}-interpret" for p in KERNEL_PLATFORMS))
TPU_BLOCK_PAGES = 8  # pages the TPU kernel reads a block


def init_pool(cfg: ModelConfig, pages: int, page: int, dtype: Any) -> tuple:
    shape = (cfg.num_kv_heads, pages, page, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return zeros(), zeros()


def pool_shardings(cfg: ModelConfig, pages: int, page: int, mesh, rules,
                   shards: int = 1) -> tuple:
    shape = (cfg.num_kv_heads, pages, page, cfg.head_dim)
    sh = NamedSharding(mesh, logical_to_spec(pool_axes(shards > 1), rules, mesh, shape))
    return (sh,) * cfg.num_layers, (sh,) * cfg.num_layers


def constrain_pool(pool: tuple, split: bool) -> tuple:
    return tuple(tuple(constrain(x, pool_axes(split)) for x in part) for part in pool)


def pool_bytes(cfg: ModelConfig, pages: int, page: int, dtype: Any) -> int:
    """Device bytes of a pool of `pages` pages (keys and values, every layer)."""
    return (2 * cfg.num_layers * pages * page * cfg.num_kv_heads * cfg.head_dim
            * jnp.dtype(dtype).itemsize)


def kernel_attention(q: Array, k_pool: Array, v_pool: Array, table: Array, lengths: Array,
                     cfg: ModelConfig, kernel: str) -> Array:
    """JAX's Pallas paged attention of `kernel`'s platform: q [B, 1, N, H] (scaled) over each
    row's first `lengths` columns -> [B, 1, N, H]. Its blocks of pages must divide the page
    table; entries past a row's pages must still name a page."""
    platform, _, how = kernel.partition("-")
    B, _, N, H = q.shape
    P = table.shape[1]
    k_pool, v_pool = k_pool.astype(q.dtype), v_pool.astype(q.dtype)
    table, lengths = jnp.minimum(table, k_pool.shape[1] - 1), lengths.astype(jnp.int32)
    cap = cfg.attn_logit_softcap
    if platform == "gpu":
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        splits = math.gcd(P, 16)
        out = paged_attention(q[:, 0], k_pool, v_pool, table, lengths, k_splits=splits,
                              pages_per_compute_block=math.gcd(P // splits, 8),
                              attn_logits_soft_cap=cap, interpret=how == "interpret")
    else:
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
        # blocks of 8 pages (128 keys at 16 a page, the TPU's lane width): the table padded to
        # whole blocks (the kernel skips blocks past a row's length)
        table = jnp.pad(table, ((0, 0), (0, -P % TPU_BLOCK_PAGES)))
        interpret = pltpu.force_tpu_interpret_mode() if how else contextlib.nullcontext()
        with interpret:  # applies to the kernels traced inside
            out = paged_attention(q[:, 0], k_pool, v_pool, lengths, table,
                                  pages_per_compute_block=TPU_BLOCK_PAGES,
                                  attn_logits_soft_cap=cap)
    return out.astype(q.dtype).reshape(B, 1, N, H)


@flax.struct.dataclass
class PagedView:
    """One layer of a `PagedCache` for `attention.attend`."""

    k: Array  # [K, pages, page, H]
    v: Array
    table: Array  # [B, W] every page each row holds (out of range: none)
    column: Array  # [B] the column this step writes (= its position)
    live: Array  # [B] rows that write (done rows' pages may already be someone else's)
    long_rows: Array  # [L] rows read at the whole width W (B: none); the others read `short`
    short: int = flax.struct.field(pytree_node=False, default=0)  # pages most rows read
    kernel: str = flax.struct.field(pytree_node=False, default="plain")
    shards: int = flax.struct.field(pytree_node=False, default=1)  # devices rows are split over

    def attend(self, q: Array, k: Array, v: Array, positions: Array, sliding: bool,
               cfg: ModelConfig) -> tuple[Array, "PagedView"]:
        if self.shards > 1:
            return split_attend(self, q, k, v, positions, sliding, cfg)
        out, view = self.local_attend(q, k, v, positions, sliding, cfg)
        return constrain(out, A.HEADS_AXES), view

    def local_attend(self, q: Array, k: Array, v: Array, positions: Array, sliding: bool,
                     cfg: ModelConfig) -> tuple[Array, "PagedView"]:
        """Write the step's keys and attend, all on one device's rows and pages."""
        k_pool, v_pool = self._write(self.k, k), self._write(self.v, v)
        view = self.replace(k=k_pool, v=v_pool)
        table = self.table[:, :self.short]
        if self.kernel != "plain" and (not sliding or self.short * k_pool.shape[2]
                                       <= cfg.sliding_window):
            out = kernel_attention(q, k_pool, v_pool, table, self.column + 1, cfg,
                                   self.kernel)
            return out, view
        out = plain_attention(q, k_pool, v_pool, table, self.column, positions, sliding, cfg)
        if self.long_rows.shape[0]:  # the longest rows, over every page they hold
            rows = jnp.minimum(self.long_rows, q.shape[0] - 1)
            long = plain_attention(q[rows], k_pool, v_pool, self.table[rows], self.column[rows],
                                   positions[rows], sliding, cfg)
            out = out.at[self.long_rows].set(long, mode="drop")
        return out, view

    def _write(self, pool: Array, new: Array) -> Array:
        """new [B, 1, K, H] into each live row's page at `column`."""
        page = pool.shape[2]
        at = jnp.take_along_axis(self.table, (self.column // page)[:, None], axis=1)[:, 0]
        at = jnp.where(self.live, at, pool.shape[1])
        new = jnp.swapaxes(new[:, 0], 0, 1).astype(pool.dtype)  # [K, B, H]
        return pool.at[:, at, self.column % page].set(new, mode="drop")


def split_attend(view: PagedView, q: Array, k: Array, v: Array, positions: Array,
                 sliding: bool, cfg: ModelConfig) -> tuple[Array, PagedView]:
    """`PagedView.local_attend` on each device's own rows and pages (`shard_map` over the
    active mesh): page ids and long rows are local to the device, so no page crosses
    devices. Heads stay split as the pool's are (queries follow the kv heads)."""
    mesh, rules = active_rules()
    batch = logical_to_spec(("act_batch",), rules, mesh, view.table.shape[:1])[0]
    heads = logical_to_spec(pool_axes(True), rules, mesh, view.k.shape)[0]
    pool, rows = P(heads, batch, None, None), P(batch)
    per_head = P(batch, None, heads, None)  # q, k, v, out: [B, T, heads, H]

    def body(q, k, v, positions, k_pool, v_pool, table, column, live, long_rows):
        local = view.replace(k=k_pool, v=v_pool, table=table, column=column, live=live,
                             long_rows=long_rows, shards=1)
        out, local = local.local_attend(q, k, v, positions, sliding, cfg)
        return out, local.k, local.v

    out, k_pool, v_pool = jax.shard_map(
        body, mesh=mesh, check_vma=False,
        in_specs=(per_head, per_head, per_head, P(batch, None), pool, pool, P(batch, None),
                  rows, rows, rows),
        out_specs=(per_head, pool, pool))(q, k, v, positions, view.k, view.v, view.table,
                                          view.column, view.live, view.long_rows)
    return constrain(out, A.HEADS_AXES), view.replace(k=k_pool, v=v_pool)


def plain_attention(q: Array, k_pool: Array, v_pool: Array, table: Array, column: Array,
                    positions: Array, sliding: bool, cfg: ModelConfig) -> Array:
    """`attention.cached_attention` over the rows' gathered pages table [B, P] (columns up to
    `column` [B]), kv heads leading: the gather gives [K, B, P, page, H], and moving K
    behind B would copy it again (on CPU that copy cost more than the attention), so the
    small queries move instead."""
    B, T, N, H = q.shape
    K, G, page = k_pool.shape[0], N // k_pool.shape[0], k_pool.shape[2]
    k, v = gather(k_pool, table, q.dtype), gather(v_pool, table, q.dtype)
    qg = q.reshape(B, T, K, G, H).transpose(2, 0, 1, 3, 4).reshape(K, B, T * G, H)
    logits = A.cached_logits(qg, k)  # [K, B, T * G, S]
    col = jnp.arange(table.shape[1] * page, dtype=jnp.int32)[None]
    mask = A.key_mask(positions, jnp.where(col <= column[:, None], col, -1), sliding, cfg)
    mask = jnp.repeat(mask, G, axis=1) if G > 1 else mask  # query t*G + g
    logits = jnp.where(mask[None], A.softcap(logits, cfg.attn_logit_softcap),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("KBQS,KBSH->KBQH", probs, v).reshape(K, B, T, G, H)
    return out.transpose(1, 2, 0, 3, 4).reshape(B, T, N, H)


def gather(pool: Array, table: Array, dtype: Any) -> Array:
    """The rows' pages [K, B, P * page, H] (entries past a row's pages read some page, masked
    by the columns)."""
    B, P = table.shape
    K, _, page, H = pool.shape
    return jnp.take(pool, table, axis=1, mode="clip").reshape(K, B, P * page, H).astype(dtype)


@flax.struct.dataclass
class PagedCache:
    """Pools per layer, and for the current chunk: page tables [B, W], offsets [B] (dense
    column - paged column), live rows [B], and the rows read at the whole width [L] (the
    others read the first `short` pages)."""

    k: tuple
    v: tuple
    table: Array
    offset: Array
    live: Array
    long_rows: Array
    short: int = flax.struct.field(pytree_node=False, default=0)
    kernel: str = flax.struct.field(pytree_node=False, default="plain")
    shards: int = flax.struct.field(pytree_node=False, default=1)

    def views(self, positions: Array, index: Array) -> list:
        """Per layer, the view that writes at dense column `index` (paged: index - offset)."""
        return [PagedView(k=k, v=v, table=self.table, column=index - self.offset,
                          live=self.live, long_rows=self.long_rows, short=self.short,
                          kernel=self.kernel, shards=self.shards)
                for k, v in zip(self.k, self.v)]

    def from_views(self, views: list) -> "PagedCache":
        return self.replace(k=tuple(x.k for x in views), v=tuple(x.v for x in views))

    def constrain(self) -> "PagedCache":
        k, v = constrain_pool((self.k, self.v), self.shards > 1)
        return self.replace(k=k, v=v)
