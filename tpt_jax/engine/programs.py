"""The sampler's compiled device programs (`device.Device` drives them).

Continuous batching keeps a fixed set of decode slots:

- `prefill`: a batch of waiting prompts (left-padded to one bucket) runs through the model once
  into a prompt-sized cache, and its keys/values and last-position logits go to entries of the
  prompt store (a prompt's n samples all start from its one entry);
- `insert`: free slots take (prompt entry, sample): the entry's keys are copied into the slot's
  row of the decode cache (columns [0, bucket), the layout of the static path), the rest of the
  row is marked empty, and the first token is drawn from the stored logits (`insert_paged`:
  the prompt's keys go to the row's pages of a paged pool instead);
- `chunk`: a `lax.while_loop` of decode steps over every slot, each at its own position and
  cache column (per-row writes, per-row masks, sliding windows included), that exits once
  `min_exit` slots have finished (so the host can refill them), when all are done, or after
  `max_steps`.

`generate` (the static path, the reference in tests and `tpt bench sample --static`) runs a
batch of rows from one prefill to the end of its longest row, with the same keys, cache layout
and length. Randomness is per row (`sampling.row_keys`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from tpt_jax.engine.cache import (SlotCache, Store, constrain_cache, constrain_store,
                                  init_cache)
from tpt_jax.engine.layout import forward_layers, logits_of
from tpt_jax.engine.paged import PagedCache, constrain_pool
from tpt_jax.engine.sampling import SamplingConfig, row_keys, sample_logits, step_keys
from tpt_jax.gemma import model as M
from tpt_jax.gemma.sharding import constrain

Array = jax.Array

# Incremented in the Python body of each jitted program: counts traces (= compilations).
TRACE_COUNT: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Program:
    """Static settings of the compiled programs (shapes add the rest)."""

    sampling: SamplingConfig
    group: int  # static path: rows per prompt (samples sharing one prefill); 1 otherwise
    eos_ids: tuple
    stop_seqs: tuple  # tuple of token-id tuples
    pad_id: int
    record_logits: bool = False  # also return every step's logits (tests)


def _prefill_cache(model, sp, tokens, positions, dtype):
    """Prefill prompts [P, Lb] into a prompt-sized cache -> (cache, last-position logits)."""
    small = constrain_cache(init_cache(model.cfg, tokens.shape[0], tokens.shape[1], dtype))
    hidden, small = forward_layers(model, sp, tokens, positions, small, jnp.int32(0))
    return small, logits_of(sp, hidden[:, -1], model.cfg)


def _recent_hit(recent: Array, drawn: Array, new: Array, prog: Program) -> Array:
    """Rows whose newest token `new` (the last of `recent`, after `drawn` earlier tokens) is
    EOS or completes a stop sequence."""
    hit = jnp.zeros(new.shape, bool)
    for e in prog.eos_ids:
        hit |= new == e
    for seq in prog.stop_seqs:
        m = len(seq)
        if m <= prog.sampling.max_new_tokens:
            tail = recent[:, recent.shape[1] - m:]
            hit |= (drawn + 1 >= m) & jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1)
    return hit


# ----------------------------------------------------------------------------- static path


def _stop_hit(out: Array, step: Array, tok: Array, prog: Program) -> Array:
    """Rows whose generated tokens (out[:, :step+1], tok at `step`) end with EOS or a stop
    sequence."""
    hit = jnp.zeros(tok.shape, bool)
    for e in prog.eos_ids:
        hit |= tok == e
    for seq in prog.stop_seqs:
        m = len(seq)
        if m > out.shape[1]:  # longer than max_new: can never complete
            continue
        if m == 1:
            hit |= tok == seq[0]
            continue
        window = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(step - m + 1, 0), m, axis=1)
        hit |= (step + 1 >= m) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1)
    return hit


def generate(model: M.Gemma2, sp: dict, cache: SlotCache, tokens: Array, positions: Array,
             id_hashes: Array, samples: Array, limits: Array, seed: Array, prog: Program):
    """The static program: prefill P prompts, expand to P*g rows, decode until every row is done.

    tokens/positions [P, Lb] (left-padded, position -1 = padding); id_hashes/samples/limits [R]
    (limit 0 = a padding row). Returns (cache, out [R, max_new] (pad after the end),
    num_tokens [R], stopped [R], the logits of every step [R, max_new, V] or None)."""
    TRACE_COUNT["generate"] += 1
    cfg, g, max_new = model.cfg, prog.group, prog.sampling.max_new_tokens
    n_prompts, lb = tokens.shape
    rows = n_prompts * g
    live = limits > 0

    # 1. prefill the unique prompts; logits for the last position only
    small, last = _prefill_cache(model, sp, tokens, positions, cache.k[0].dtype)

    # 2. share it: g rows per prompt, written into the donated decode cache in place
    rep = lambda x, axis: jnp.repeat(x, g, axis=axis) if g > 1 else x
    put = lambda big, x: jax.lax.dynamic_update_slice(big, rep(x, 0), (0,) * big.ndim)
    cache = constrain_cache(SlotCache(
        k=tuple(put(b, x) for b, x in zip(cache.k, small.k)),
        v=tuple(put(b, x) for b, x in zip(cache.v, small.v)),
        pos=jnp.full(cache.pos.shape, -1, jnp.int32).at[:, :lb].set(rep(small.pos, 0))))
    next_pos = rep(jnp.max(positions, axis=1) + 1, 0)  # [R] position of the first new token

    keys = row_keys(seed, id_hashes, samples)
    tok = sample_logits(rep(last, 0), step_keys(keys, 0), prog.sampling)
    out = jnp.full((rows, max_new), prog.pad_id, jnp.int32).at[:, 0].set(tok)
    seen = None
    if prog.record_logits:
        seen = jnp.zeros((rows, max_new, cfg.vocab_size), jnp.float32).at[:, 0].set(rep(last, 0))
    hit = _stop_hit(out, jnp.int32(0), tok, prog) & live
    done = hit | (limits <= 1)
    num = jnp.where(hit, 1, 0).astype(jnp.int32)

    # 3. decode: feed token i-1, draw token i
    def cond(state):
        i, _, _, done, _, _, _ = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, out, tok, done, num, cache, seen = state
        pos = (next_pos + i - 1)[:, None]
        hidden, cache = forward_layers(model, sp, tok[:, None], pos, cache, lb + i - 1)
        step_logits = logits_of(sp, hidden[:, 0], cfg)
        if seen is not None:
            seen = jax.lax.dynamic_update_slice_in_dim(seen, step_logits[:, None], i, axis=1)
        new = sample_logits(step_logits, step_keys(keys, i), prog.sampling)
        new = jnp.where(done, prog.pad_id, new)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
        hit = _stop_hit(out, i, new, prog) & ~done
        num = jnp.where(hit, i + 1, num)
        return i + 1, out, new, done | hit | (i + 1 >= limits), num, constrain_cache(cache), seen

    state = (jnp.int32(1), out, tok, done, num, cache, seen)
    steps, out, _, done, num, cache, seen = jax.lax.while_loop(cond, body, state)
    stopped = (num > 0) & live
    num = jnp.where(stopped, num, jnp.minimum(limits, max_new))
    # replicated on every device, so each host can read the whole result
    if seen is not None:
        seen = constrain(seen, (None, None, None))
    return (cache, constrain(out, (None, None)), constrain(num, (None,)),
            constrain(stopped, (None,)), seen, steps)


# ----------------------------------------------------------------------------- continuous


@flax.struct.dataclass
class Slots:
    """Per decode slot: the last drawn token (fed next), tokens drawn so far (`step`), first
    generated column (= the prompt's bucket) and position (= prompt length), token limit, the
    row's (id hash, sample), done/stopped flags, drawn tokens [R, max_new], the last tokens
    (for stop sequences) and, for tests, every step's logits."""

    tok: Array
    step: Array
    start: Array
    pos0: Array
    limit: Array
    hash: Array
    sample: Array
    done: Array
    stopped: Array
    out: Array
    recent: Array
    seen: Optional[Array]


def init_slots(cfg, rows: int, prog: Program) -> Slots:
    z = jnp.zeros((rows,), jnp.int32)
    m = prog.sampling.max_new_tokens
    window = max([len(s) for s in prog.stop_seqs] + [1])
    seen = jnp.zeros((rows, m, cfg.vocab_size), jnp.float32) if prog.record_logits else None
    return _constrain_slots(Slots(
        tok=z, step=z, start=z, pos0=z, limit=z, hash=z, sample=z, done=jnp.ones((rows,), bool),
        stopped=jnp.zeros((rows,), bool), out=jnp.full((rows, m), prog.pad_id, jnp.int32),
        recent=jnp.full((rows, window), prog.pad_id, jnp.int32), seen=seen))


def _constrain_slots(s: Slots) -> Slots:
    row = lambda x: None if x is None else constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
    return jax.tree.map(row, s)


def prefill(model: M.Gemma2, sp: dict, store: Store, tokens: Array, positions: Array,
            src: Array) -> Store:
    """Prefill prompts [P, Lb] into the (donated) store: entry e takes prompt src[e] (-1: kept)."""
    TRACE_COUNT["prefill"] += 1
    lb = tokens.shape[1]
    small, last = _prefill_cache(model, sp, tokens, positions, store.k[0].dtype)
    take, keep = jnp.maximum(src, 0), src < 0

    def pick(old, new):  # new [P, ...] gathered per entry, old kept where src < 0
        mask = keep.reshape((-1,) + (1,) * (old.ndim - 1))
        return jnp.where(mask, old, new[take])

    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, store.k[0].shape[2] - lb), (0, 0)))
    pos = jnp.pad(small.pos, ((0, 0), (0, store.pos.shape[1] - lb)), constant_values=-1)
    return constrain_store(Store(
        k=tuple(pick(o, pad(n)) for o, n in zip(store.k, small.k)),
        v=tuple(pick(o, pad(n)) for o, n in zip(store.v, small.v)),
        pos=pick(store.pos, pos), logits=pick(store.logits, last),
        start=pick(store.start, jnp.full(src.shape, lb, jnp.int32)),
        pos0=pick(store.pos0, jnp.max(positions, axis=1) + 1)))


def insert(model: M.Gemma2, cache: SlotCache, slots: Slots, store: Store, entry: Array,
           hashes: Array, samples: Array, limits: Array, seed: Array, prog: Program):
    """Start new rows in the (donated) decode cache and slots: slot r takes store entry
    entry[r] (-1: slot untouched) as sample (hashes[r], samples[r]) with token limit limits[r],
    and draws its first token."""
    TRACE_COUNT["insert"] += 1
    new, take = entry >= 0, jnp.maximum(entry, 0)
    lp = store.k[0].shape[2]
    sel = lambda old, x: jnp.where(new.reshape((-1,) + (1,) * (old.ndim - 1)), x, old)
    prefix = lambda c, s: jax.lax.dynamic_update_slice(c, sel(c[:, :, :lp], s[take]), (0,) * 4)
    pos = jnp.pad(store.pos[take], ((0, 0), (0, cache.pos.shape[1] - lp)), constant_values=-1)
    cache = constrain_cache(SlotCache(k=tuple(prefix(c, s) for c, s in zip(cache.k, store.k)),
                                       v=tuple(prefix(c, s) for c, s in zip(cache.v, store.v)),
                                       pos=sel(cache.pos, pos)))
    return cache, _start_rows(slots, store, entry, hashes, samples, limits, seed, prog)


def insert_paged(model: M.Gemma2, pool: tuple, slots: Slots, store: Store, entry: Array,
                 pages: Array, hashes: Array, samples: Array, limits: Array, seed: Array,
                 prog: Program, split: bool = False):
    """`insert` into a (donated) paged pool: slot r's prompt, moved from the end of its bucket
    to column 0, goes to the pages pages[r] [ceil(Lp / page)] (ids in the whole pool; out of
    range: not written, e.g. past the prompt or not inserted); `split`: the pool's pages are
    split like the slots."""
    TRACE_COUNT["insert"] += 1
    take = jnp.maximum(entry, 0)
    n, page = pages.shape[1], pool[0][0].shape[2]
    shift = store.start[take] - store.pos0[take]  # the bucket's left padding

    def copy(p, s):  # s [E, K, Lp, H] -> pool p [K, pages, page, H]
        x = jnp.pad(s[take], ((0, 0), (0, 0), (0, n * page), (0, 0)))
        x = jax.vmap(lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, n * page, axis=1))(x, shift)
        x = x.reshape(x.shape[0], x.shape[1], n, page, x.shape[3]).swapaxes(0, 1)
        return p.at[:, pages].set(x.astype(p.dtype), mode="drop")

    pool = constrain_pool((tuple(copy(p, s) for p, s in zip(pool[0], store.k)),
                           tuple(copy(p, s) for p, s in zip(pool[1], store.v))), split)
    return pool, _start_rows(slots, store, entry, hashes, samples, limits, seed, prog)


def _start_rows(slots: Slots, store: Store, entry: Array, hashes: Array, samples: Array,
                limits: Array, seed: Array, prog: Program) -> Slots:
    """The slot state of the rows `insert` starts, their first token drawn."""
    new, take = entry >= 0, jnp.maximum(entry, 0)
    sel = lambda old, x: jnp.where(new.reshape((-1,) + (1,) * (old.ndim - 1)), x, old)
    first = store.logits[take]
    tok = sample_logits(first, step_keys(row_keys(seed, hashes, samples), 0), prog.sampling)
    out0 = jnp.full(slots.out.shape, prog.pad_id, jnp.int32).at[:, 0].set(tok)
    recent0 = jnp.full(slots.recent.shape, prog.pad_id, jnp.int32).at[:, -1].set(tok)
    hit = _recent_hit(recent0, jnp.zeros_like(tok), tok, prog)
    seen = slots.seen
    if seen is not None:
        seen = sel(seen, jnp.zeros_like(seen).at[:, 0].set(first))
    slots = Slots(tok=sel(slots.tok, tok), step=sel(slots.step, jnp.ones_like(tok)),
                  start=sel(slots.start, store.start[take]), pos0=sel(slots.pos0, store.pos0[take]),
                  limit=sel(slots.limit, limits), hash=sel(slots.hash, hashes),
                  sample=sel(slots.sample, samples), done=sel(slots.done, hit | (limits <= 1)),
                  stopped=sel(slots.stopped, hit), out=sel(slots.out, out0),
                  recent=sel(slots.recent, recent0), seen=seen)
    return _constrain_slots(slots)


def chunk(model: M.Gemma2, sp: dict, cache: SlotCache | PagedCache, slots: Slots, seed: Array,
          max_steps: Array, min_exit: Array, prog: Program):
    """Decode every live slot, one token a step, until `min_exit` slots have finished, all are
    done, or `max_steps` steps (a paged cache's page tables must cover the columns those
    steps write). Returns (cache, slots, steps run, replicated (done, tokens
    drawn, stopped, out, logits or None))."""
    TRACE_COUNT["chunk"] += 1
    cfg, max_new = model.cfg, prog.sampling.max_new_tokens

    def cond(state):
        k, fin, s, _ = state
        return (k < max_steps) & (fin < min_exit) & ~jnp.all(s.done)

    def body(state):
        k, fin, s, cache = state
        live = ~s.done
        pos = (s.pos0 + s.step - 1)[:, None]
        if isinstance(cache, PagedCache):
            cache = cache.replace(offset=s.start - s.pos0, live=live)
        hidden, cache = forward_layers(model, sp, s.tok[:, None], pos, cache,
                                       s.start + s.step - 1)
        step_logits = logits_of(sp, hidden[:, 0], cfg)
        keys = step_keys(row_keys(seed, s.hash, s.sample), s.step)
        new = jnp.where(live, sample_logits(step_logits, keys, prog.sampling), prog.pad_id)
        at = jnp.where(live, s.step, max_new)  # done rows write nothing
        write = jax.vmap(lambda x, n, i: x.at[i].set(n, mode="drop"))
        out, seen = write(s.out, new, at), s.seen
        if seen is not None:
            seen = write(seen, step_logits, at)
        recent = jnp.where(live[:, None], jnp.concatenate([s.recent[:, 1:], new[:, None]], 1),
                           s.recent)
        hit = _recent_hit(recent, s.step, new, prog) & live
        step = s.step + live.astype(jnp.int32)
        done = s.done | hit | (step >= s.limit)
        s = s.replace(tok=new, step=step, done=done, stopped=s.stopped | hit, out=out,
                      recent=recent, seen=seen)
        fin = fin + jnp.sum(done & live).astype(jnp.int32)
        cache = cache.constrain() if isinstance(cache, PagedCache) else constrain_cache(cache)
        return k + 1, fin, _constrain_slots(s), cache

    state = (jnp.int32(0), jnp.int32(0), slots, cache)
    steps, _, slots, cache = jax.lax.while_loop(cond, body, state)
    rep = lambda x: None if x is None else constrain(x, (None,) * x.ndim)
    return cache, slots, steps, tuple(rep(x) for x in (slots.done, slots.step, slots.stopped,
                                                       slots.out, slots.seen))


def release(slots: Slots, mask: Array) -> Slots:
    """Mark the rows of `mask` done: cancelled samples stop drawing tokens."""
    TRACE_COUNT["release"] += 1
    return _constrain_slots(slots.replace(done=slots.done | mask))


@functools.lru_cache(maxsize=None)
def compiled(cfg, dtype, param_dtype):
    """The jitted programs of one model shape, shared by every Sampler (new samplers for the
    same model, e.g. one per round, reuse the compiled programs)."""
    model = M.make_model(cfg, dtype, param_dtype)
    jit = lambda f, donate, static=("prog",): jax.jit(functools.partial(f, model),
                                                     static_argnames=static,
                                                     donate_argnames=donate)
    return {"generate": jit(generate, ("cache",)), "prefill": jit(prefill, ("store",), ()),
            "insert": jit(insert, ("cache", "slots")), "chunk": jit(chunk, ("cache", "slots")),
            "insert_paged": jit(insert_paged, ("pool", "slots"), ("prog", "split")),
            "release": jax.jit(release, donate_argnames=("slots",))}
