"""The device side of the sampler for one model on one mesh: the weights in the sampling
layout, the decode cache, the prompt store and the slot state, and the compiled programs.

`Device` implements `contract.SlotDevice` for the scheduler (prefill / insert / decode /
read / release) and runs static batches for the reference path. Its buffers are donated to
each program and kept between calls while their shapes stay, so a run allocates its caches
once. With `attention="paged"` the decode cache is a page pool (`paged`) and the host page
table (`pages.PageTable`) gives each row pages as it grows; prefill and the prompt store stay
dense. A pool smaller than every slot at its longest admits rows by their live pages and,
when the running rows outgrow it, preempts the newest (`preempt`; the scheduler starts it again
from scratch: its tokens depend only on seed, question and sample, so they do not change).
Rows are data-parallel and heads tensor-parallel through the sampling rules; what the
host reads is replicated, so every host takes the same decisions. Where the rows are split
over `shards` devices, the page pool is split with them: each device holds the pages of its
own slots (`pages.PageTable` keeps a pool per group of slots), a row is admitted into the
group with the most room (or the one already holding its prompt's pages) and preemption is
per group.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from tpt_jax.engine import programs as PR
from tpt_jax.engine.cache import SlotCache, cache_length, cache_shardings, init_cache, init_store
from tpt_jax.engine.contract import Chunk, Prompt, Start
from tpt_jax.engine.layout import SamplingWeights
from tpt_jax.engine.pages import PageTable
from tpt_jax.engine.paged import PagedCache, init_pool, pool_shardings
from tpt_jax.gemma import model as M
from tpt_jax.gemma.attention import CACHE_BLOCK
from tpt_jax.gemma.sharding import logical_to_spec, use_rules

MAX_CHUNK = 256  # decode steps between host checks at most (an interrupt waits this long)
MIN_STEPS = 64  # paged: a chunk's page table leaves its longest row at least this many steps
# (and a row is admitted while every running row has pages for this many more steps)
PREEMPT_BELOW = 16  # paged: preempt rows when the free pages last fewer steps than this
PAGE_BUCKETS = 4  # paged chunk programs: page tables cut to 1/8, 1/4, 1/2 or all of a slot's
LONG_SHARE = 8  # paged, plain attention: up to slots / LONG_SHARE rows read every page they hold


def prefill_sizes(entries: int) -> tuple[int, ...]:
    """Prompt counts of the compiled prefill programs: powers of 4 below `entries`, and it."""
    out, b = [], 1
    while b < entries:
        out.append(b)
        b *= 4
    return tuple(out) + (entries,)


def left_pad(prompts: list, rows: int, bucket: int, pad_id: int):
    """Prompts (at most `bucket` ids each) -> host tokens and positions [rows, bucket],
    left-padded (position -1 = padding) so every prompt's first new token goes to cache
    column `bucket`; rows past the prompts are all padding."""
    tokens = np.full((rows, bucket), pad_id, np.int32)
    positions = np.full((rows, bucket), -1, np.int32)
    for r, ids in enumerate(prompts):
        if len(ids):
            tokens[r, bucket - len(ids):] = ids
            positions[r, bucket - len(ids):] = np.arange(len(ids))
    return tokens, positions


class Device:
    """Weights, caches and programs of one model: `slots` decode slots, prompts up to
    `max_bucket` tokens."""

    def __init__(self, model: M.Gemma2, mesh, rules, slots: int, max_bucket: int, pad_id: int,
                 attention: str = "dense", page: int = 16, pages: Optional[int] = None,
                 kernel: str = "plain", shards: int = 1):
        self.model, self.cfg, self.mesh, self.rules = model, model.cfg, mesh, rules
        self.slots, self.max_bucket, self.pad_id = slots, max_bucket, pad_id
        # paged: `pages` pool pages of `page` columns (None: every slot at its longest), the
        # decode attention `kernel` (paged.KERNELS), the devices the slots (and the pool) are
        # split over
        self.attention, self.page, self.pages, self.kernel = attention, page, pages, kernel
        self.shards = shards
        self.table: Optional[PageTable] = None
        self.pages_used = (0, 0)  # paged: the last call's most pages held at once, of its pool
        self.weights = SamplingWeights(model, mesh, rules)
        self.programs = PR.compiled(model.cfg, model.dtype, model.param_dtype)
        self._bufs: dict = {}  # donated device buffers reused between calls
        self._init_slots: dict = {}
        self.entries, self.prefill_sizes = 1, (1,)
        self.prog: Optional[PR.Program] = None

    @property
    def params(self) -> dict:
        if self.weights.params is None:
            raise RuntimeError("the sampler has no weights yet: call update_params first")
        return self.weights.params

    # -- placement

    def put(self, x: np.ndarray, logical: tuple) -> jax.Array:
        """Host array (identical on every host) -> global array sharded by logical axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(logical, self.rules, self.mesh, x.shape)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec),
                                            lambda idx: x[idx])

    def split_axis(self) -> Optional[str]:
        """The logical axis of arrays split like the slots (None: not split)."""
        return "act_batch" if self.shards > 1 else None

    def rules_context(self):
        return (use_rules(self.mesh, self.rules) if self.mesh is not None
                else contextlib.nullcontext())

    def _buffer(self, name: str, key: tuple, make: Callable, shardings=None):
        """A donated device buffer: reused while `key` (its shape) stays, else allocated."""
        have = self._bufs.pop(name, None)
        if have is not None and have[0] == key and not jax.tree.leaves(have[1])[0].is_deleted():
            return have[1]
        del have  # free the old one before allocating
        with self.rules_context():
            return jax.jit(make, out_shardings=shardings)()

    def _keep(self, name: str, key: tuple, buf) -> None:
        self._bufs[name] = (key, buf)

    def cache_length(self, max_new: int) -> int:
        """Columns of a decode slot: the largest bucket + max_new (whole blocks when long).
        The same for every prompt, whatever else runs, so a row's numerics never change."""
        return cache_length(self.max_bucket + max_new)

    def decode_cache(self, rows: int, length: int) -> SlotCache:
        make = functools.partial(init_cache, self.cfg, rows, length, self.model.dtype)
        sh = None if self.mesh is None else cache_shardings(self.cfg, rows, length, self.mesh,
                                                            self.rules)
        return self._buffer("cache", (rows, length), make, sh)

    def kv_bytes(self, names: tuple = ("cache", "pool", "store"),
                 one_device: bool = False) -> int:
        """Device bytes of the caches held between calls (keys, values, column positions):
        the decode cache or page pool, and the prompt store; all devices together (an array
        counted once, however it is split), or what the first device holds."""
        arrays = [x for name, (_, buf) in self._bufs.items() if name in names
                  for x in jax.tree.leaves(buf if isinstance(buf, tuple)
                                           else (buf.k, buf.v, buf.pos))]
        if not one_device:
            return sum(x.nbytes for x in arrays)
        return sum(s.data.nbytes for x in arrays for s in x.addressable_shards[:1])

    def pool_pages(self, max_new: int) -> int:
        """Pages of the paged pool (all devices together, a whole share each): the budget,
        else every slot at its longest."""
        pages = self.pages or self.slots * -(-self.cache_length(max_new) // self.page)
        return pages // self.shards * self.shards

    def page_buckets(self, max_pages: int) -> tuple[int, ...]:
        """Page counts the chunk program is compiled for: whole blocks of the dense path's
        long-cache scoring (`attention.CACHE_BLOCK` columns) up to a slot's longest."""
        unit = max(1, CACHE_BLOCK // self.page)
        out = {min(max_pages, -(-max_pages // 2 ** i // unit) * unit)
               for i in range(PAGE_BUCKETS)}
        return tuple(sorted(out))

    # -- a call's buffers

    def begin(self, prog: PR.Program, n: int, seed: int, by_sample: bool = False) -> None:
        """Decode cache, prompt store (as many entries as a static batch has prompts: the
        static path's prefill cache; twice as many as slots for sample-major order, whose
        prompts stay while their later samples wait for a verdict) and fresh slots for a call
        with n samples per prompt."""
        R = self.slots
        self.prog, self.seed = prog, jnp.asarray(seed, jnp.int32)
        self.columns_read = 0  # cache columns the call's decode steps read, every slot's
        self.entries = 2 * R if by_sample else max(1, R // min(n, R))
        self.prefill_sizes = prefill_sizes(self.entries)
        length = self.cache_length(prog.sampling.max_new_tokens)
        if self.attention == "dense":
            self.cache = self.decode_cache(R, length)
        else:
            self.begin_paged(length, self.pool_pages(prog.sampling.max_new_tokens))
        self.store = self._buffer("store", (self.entries, self.max_bucket), functools.partial(
            init_store, self.cfg, self.entries, self.max_bucket, self.model.dtype))
        if prog not in self._init_slots:  # one compiled initialiser per setting, not per call
            self._init_slots[prog] = jax.jit(functools.partial(PR.init_slots, self.cfg, R, prog))
        with self.rules_context():
            self.state = self._init_slots[prog]()

    def end(self) -> None:
        """Hold the decode cache and prompt store for the next call (same shapes: no
        allocation)."""
        if self.table is None:
            self._keep("cache", (self.slots, self.cache.pos.shape[1]), self.cache)
        else:
            total = self.table.pages * self.shards
            self._keep("pool", (total, self.page), self.pool)
            self.pages_used = (self.table.peak, total)
        self._keep("store", self.store.pos.shape, self.store)
        self.cache = self.pool = self.table = self.store = self.state = None

    # -- the paged cache

    def begin_paged(self, length: int, pages: int) -> None:
        """A pool of `pages` pages (split over the shards) and an empty page table for slots
        of `length` columns."""
        make = functools.partial(init_pool, self.cfg, pages, self.page, self.model.dtype)
        sh = None if self.mesh is None else pool_shardings(self.cfg, pages, self.page,
                                                           self.mesh, self.rules, self.shards)
        self.pool = self._buffer("pool", (pages, self.page), make, sh)
        self.table = PageTable(pages // self.shards, self.page, self.slots,
                               -(-length // self.page), self.shards)
        self.grown = np.zeros((self.slots, 3), np.int64)  # per slot: prompt length, limit, drawn
        self.running = np.zeros(self.slots, bool)  # slots whose rows hold pages
        self.started = np.zeros(self.slots, np.int64)  # when each slot's row started
        self.starts = 0
        self.headroom: Optional[list] = None  # pages each group's running rows need next

    def reserve(self, index: int, prompt: Prompt, free: list[int]) -> Optional[int]:
        """The free slot a row of prompt `index` may start in now, or None (paged: its prompt
        pages and MIN_STEPS more columns fit in the slot's group beside what the group's
        running rows need for as many steps; they are set aside for it)."""
        if self.table is None:
            return free[0]
        t = self.table
        if self.headroom is None:
            self.headroom = self._growth(MIN_STEPS, *self._columns())
        length = len(prompt.tokens)
        columns = max(length, min(length + MIN_STEPS, self.row_columns(prompt)))
        firsts = {}  # each group's first free slot
        for r in free:
            firsts.setdefault(t.shard(r), r)
        # the group that holds the prompt's pages, else the one with the most room
        order = sorted(firsts, key=lambda g: (not t.holds(index, g),
                                              self.headroom[g] - t.room(g), g))
        return next((firsts[g] for g in order
                     if t.reserve(index, length, columns, self.headroom[g], g)), None)

    def preempt(self) -> dict[int, int]:
        """Paged: when the free pages would last the running rows fewer than PREEMPT_BELOW
        steps, the newest rows give theirs back (marked done) until they last, or one row is
        left (a pool holds one row at its longest). Returns {slot: tokens it had drawn}; the
        scheduler starts those requests again."""
        if self.table is None:
            return {}
        out = {}
        for g in range(self.shards):
            group = slice(g * self.table.per, (g + 1) * self.table.per)
            while self.running[group].sum() > 1:
                at, end = self._columns()
                steps = min(self._plan(at, end)[1], PREEMPT_BELOW)
                if self._growth(steps, at, end)[g] <= len(self.table.free[g]):
                    break
                rows = np.flatnonzero(self.running[group]) + group.start
                r = int(rows[np.argmax(self.started[rows])])
                out[r] = int(self.grown[r, 2])
                self._free(r)
        if out:
            self.release(list(out))  # marks them done (their pages are already free)
        return out

    @staticmethod
    def row_columns(prompt: Prompt) -> int:
        """Columns a row writes in its pages: its prompt, then one per token fed back (all
        but the last drawn)."""
        return len(prompt.tokens) + prompt.limit - 1

    def _insert_paged(self, starts: list[Start], prompts: list[Prompt], entry, args) -> None:
        t = self.table
        total = t.pages * self.shards
        pages = np.full((self.slots, -(-self.max_bucket // self.page)), total, np.int32)
        for s in starts:
            p = prompts[s.request.prompt]
            write = np.asarray(t.start(s.slot, s.request.prompt, len(p.tokens)), np.int32)
            # ids within the slot's group -> ids in the whole pool
            pages[s.slot, :len(write)] = np.where(write < t.pages,
                                                  write + t.shard(s.slot) * t.pages, total)
            self.grown[s.slot] = (len(p.tokens), p.limit, 1)
            self.running[s.slot] = True
            self.starts += 1
            self.started[s.slot] = self.starts
        t.end_admission()
        self.headroom = None
        with self.rules_context():
            self.pool, self.state = self.programs["insert_paged"](
                self.pool, self.state, self.store, entry, self.put(pages, ("act_batch", None)),
                *args, self.seed, prog=self.prog, split=self.shards > 1)

    def _columns(self) -> tuple[dict, dict]:
        """Per running slot: the next column it writes, and its columns at its limit."""
        rows = [(r, *self.grown[r]) for r in np.flatnonzero(self.running).tolist()]
        return ({r: length + drawn - 1 for r, length, _, drawn in rows},
                {r: length + limit - 1 for r, length, limit, _ in rows})

    def _growth(self, steps: int, at: dict, end: dict) -> list[int]:
        """Pages the running rows of each group lack for `steps` more steps."""
        out = [0] * self.shards
        for r in at:
            out[self.table.shard(r)] += self.table.growth(r, min(at[r] + steps, end[r]))
        return out

    def long_slots(self) -> int:
        """Rows of each group a chunk may read at their whole width (the plain attention's
        long rows)."""
        per = self.slots // self.shards
        return 0 if self.kernel != "plain" else max(1, per // LONG_SHARE)

    def _plan(self, at: dict, end: dict, cut: Optional[int] = None) -> tuple[int, int, list]:
        """The long rows (the `long_slots` needing the most columns), the smallest page bucket
        (or `cut`) that gives every other row at least MIN_STEPS more columns (or all it has
        left), and the steps a chunk may take within it: (cut, steps, long rows). `at`, `end`:
        `_columns`."""
        need = {r: min(at[r] + MIN_STEPS, end[r]) for r in at}
        long = []
        for g in range(self.shards):
            rows = [r for r in need if self.table.shard(r) == g]
            long += sorted(rows, key=lambda r: (-need[r], r))[:self.long_slots()]
        short = [r for r in at if r not in long]
        if cut is None:
            most = max([need[r] for r in short], default=0)
            cut = next(b for b in self.page_buckets(self.table.table.shape[1])
                       if b * self.page >= most)
        return cut, min([MAX_CHUNK] + [cut * self.page - at[r] for r in short
                                       if end[r] > cut * self.page]), long

    def _fit(self, steps: int, at: dict, end: dict) -> int:
        """The most steps, up to `steps`, whose pages every group's free list holds."""
        free = [len(f) for f in self.table.free]
        fits = lambda n: all(g <= f for g, f in zip(self._growth(n, at, end), free))
        if fits(steps):
            return steps
        lo, hi = 0, steps  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def _free(self, slot: int) -> None:
        self.table.release(slot)
        self.running[slot] = False
        self.headroom = None

    def _chunk_cache(self, cut: Optional[int] = None) -> tuple[PagedCache, int]:
        """The pool with `_plan`'s page bucket and long rows, and the steps the chunk takes
        (as many as the free pages allow); each row gets the pages those steps fill."""
        t = self.table
        at, end = self._columns()
        cut, steps, long = self._plan(at, end, cut)
        steps = self._fit(steps, at, end)
        if at and not steps:
            raise RuntimeError("the page pool has no page for the next step (call preempt "
                               "before decode)")
        for r in at:
            t.grow(r, min(at[r] + steps, end[r]))
        # each group's long rows, as slots within the group (t.per: none)
        long_rows = np.full((self.shards, self.long_slots()), t.per, np.int32)
        for g in range(self.shards):
            rows = [r - g * t.per for r in long if t.shard(r) == g]
            long_rows[g, :len(rows)] = rows
        zeros = self.put(np.zeros(self.slots, np.int32), ("act_batch",))
        cache = PagedCache(k=self.pool[0], v=self.pool[1], live=zeros.astype(bool),
                           table=self.put(t.table, ("act_batch", None)), offset=zeros,
                           long_rows=self.put(long_rows.reshape(-1), (self.split_axis(),)),
                           short=cut, kernel=self.kernel, shards=self.shards)
        return cache, steps

    # -- continuous batching (contract.SlotDevice)

    def prefill(self, batch: list[tuple[int, Prompt]]) -> None:
        bucket = batch[0][1].bucket
        size = next(s for s in self.prefill_sizes if s >= len(batch))
        tokens, positions = left_pad([p.tokens for _, p in batch], size, bucket, self.pad_id)
        src = np.full(self.entries, -1, np.int32)
        for r, (entry, _) in enumerate(batch):
            src[entry] = r
        with self.rules_context():
            self.store = self.programs["prefill"](
                self.params, self.store, self.put(tokens, ("act_batch", None)),
                self.put(positions, ("act_batch", None)), self.put(src, (None,)))

    def insert(self, starts: list[Start], prompts: list[Prompt]) -> None:
        R = self.slots
        entry = np.full(R, -1, np.int32)
        hashes, samples, limits = (np.zeros(R, np.int32) for _ in range(3))
        for s in starts:
            p = prompts[s.request.prompt]
            entry[s.slot], hashes[s.slot], samples[s.slot], limits[s.slot] = (
                s.entry, p.id_hash, p.first_sample + s.request.sample, p.limit)
        row = lambda x: self.put(x, ("act_batch",))
        if self.table is not None:
            return self._insert_paged(starts, prompts, row(entry),
                                      (row(hashes), row(samples), row(limits)))
        with self.rules_context():
            self.cache, self.state = self.programs["insert"](
                self.cache, self.state, self.store, row(entry), row(hashes), row(samples),
                row(limits), self.seed, prog=self.prog)

    def decode(self, min_exit: int, cut: Optional[int] = None) -> Any:
        cache, max_steps = ((self.cache, MAX_CHUNK) if self.table is None
                            else self._chunk_cache(cut))
        with self.rules_context():
            cache, self.state, steps, out = self.programs["chunk"](
                self.params, cache, self.state, self.seed, jnp.int32(max_steps),
                jnp.int32(min_exit), prog=self.prog)
        if self.table is None:  # columns every step reads, all slots together
            self.cache, columns = cache, self.slots * cache.pos.shape[1]
        else:
            self.pool = (cache.k, cache.v)
            columns = self.page * (self.slots * cache.short + cache.long_rows.shape[0]
                                   * cache.table.shape[1])
        return steps, out, columns

    def read(self, handle: Any) -> Chunk:
        """Wait for a chunk (counting the cache columns its steps read, `columns_read`);
        paged, the pages of rows that ended go back to the free list."""
        steps, out, columns = handle
        done, drawn, stopped, tokens, logits = (None if x is None else np.asarray(x)
                                                for x in out)
        self.columns_read += int(steps) * columns
        if self.table is not None:
            self.grown[:, 2] = drawn
            for r in np.flatnonzero(done & self.running).tolist():
                self._free(r)
            self.headroom = None
        return Chunk(int(steps), done, drawn, stopped, tokens, logits)

    def release(self, slots: list[int]) -> None:
        mask = np.zeros(self.slots, bool)
        mask[slots] = True
        for r in slots if self.table is not None else ():
            self._free(r)
        with self.rules_context():
            self.state = self.programs["release"](self.state, self.put(mask, ("act_batch",)))

    def warm_up(self, buckets) -> None:
        """Compile prefill (every bucket and size), insert and chunk for the current call's
        setting; the buffers change only where nothing is inserted."""
        none = self.put(np.full(self.entries, -1, np.int32), (None,))
        with self.rules_context():
            for b in buckets:
                for size in self.prefill_sizes:
                    x = self.put(np.zeros((size, b), np.int32), ("act_batch", None))
                    self.store = self.programs["prefill"](self.params, self.store, x, x, none)
        self.insert([], [])
        self.release([])
        cuts = (None,) if self.table is None else self.page_buckets(self.table.table.shape[1])
        for cut in cuts:
            self.read(self.decode(1, cut))  # every slot is empty: no step runs

    # -- static batches (the reference)

    def generate(self, tokens: np.ndarray, positions: np.ndarray, hashes: np.ndarray,
                 samples: np.ndarray, limits: np.ndarray, prog: PR.Program, seed: int) -> Any:
        """Dispatch one static batch (asynchronously): prompts [P, bucket], rows [R]."""
        rows, length = len(hashes), self.cache_length(prog.sampling.max_new_tokens)
        cache = self.decode_cache(rows, length)
        args = [self.put(x, ("act_batch", None)) for x in (tokens, positions)]
        args += [self.put(x, ("act_batch",)) for x in (hashes, samples, limits)]
        with self.rules_context():
            cache, *result = self.programs["generate"](self.params, cache, *args,
                                                       jnp.asarray(seed, jnp.int32), prog=prog)
        self._keep("cache", (rows, length), cache)
        return result

    @staticmethod
    def read_static(handle: Any) -> tuple:
        """(tokens [R, max_new], drawn [R], stopped [R], logits or None, steps) on the host."""
        out, num, stopped, seen, steps = handle
        return (np.asarray(out), np.asarray(num), np.asarray(stopped),
                None if seen is None else np.asarray(seen), int(steps))
