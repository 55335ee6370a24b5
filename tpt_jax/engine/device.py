"""The device side of the sampler for one model on one mesh: the weights in the sampling
layout, the decode cache, the prompt store and the slot state, and the compiled programs.

`Device` implements `contract.SlotDevice` for the scheduler (prefill / insert / decode /
read / release) and runs static batches for the reference path. Its buffers are donated to
each program and kept between calls while their shapes stay, so a run allocates its caches
once. Rows are data-parallel and heads tensor-parallel through the sampling rules; what the
host reads is replicated, so every host takes the same decisions.
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
from tpt_jax.gemma import model as M
from tpt_jax.gemma.sharding import logical_to_spec, use_rules

MAX_CHUNK = 256  # decode steps between host checks at most (an interrupt waits this long)


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

    def __init__(self, model: M.Gemma2, mesh, rules, slots: int, max_bucket: int, pad_id: int):
        self.model, self.cfg, self.mesh, self.rules = model, model.cfg, mesh, rules
        self.slots, self.max_bucket, self.pad_id = slots, max_bucket, pad_id
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

    def kv_bytes(self) -> int:
        """Device bytes of the caches held between calls (keys, values, column positions)."""
        return sum(x.nbytes for _, buf in self._bufs.values()
                   for x in jax.tree.leaves((buf.k, buf.v, buf.pos)))

    # -- continuous batching (contract.SlotDevice)

    def begin(self, prog: PR.Program, n: int, seed: int, by_sample: bool = False) -> None:
        """Decode cache, prompt store (as many entries as a static batch has prompts: the
        static path's prefill cache; twice as many as slots for sample-major order, whose
        prompts stay while their later samples wait for a verdict) and fresh slots for a call
        with n samples per prompt."""
        R = self.slots
        self.prog, self.seed = prog, jnp.asarray(seed, jnp.int32)
        self.entries = 2 * R if by_sample else max(1, R // min(n, R))
        self.prefill_sizes = prefill_sizes(self.entries)
        self.cache = self.decode_cache(R, self.cache_length(prog.sampling.max_new_tokens))
        self.store = self._buffer("store", (self.entries, self.max_bucket), functools.partial(
            init_store, self.cfg, self.entries, self.max_bucket, self.model.dtype))
        if prog not in self._init_slots:  # one compiled initialiser per setting, not per call
            self._init_slots[prog] = jax.jit(functools.partial(PR.init_slots, self.cfg, R, prog))
        with self.rules_context():
            self.state = self._init_slots[prog]()

    def end(self) -> None:
        """Hold the decode cache and prompt store for the next call (same shapes: no
        allocation)."""
        self._keep("cache", (self.slots, self.cache.pos.shape[1]), self.cache)
        self._keep("store", self.store.pos.shape, self.store)
        self.cache = self.store = self.state = None

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
        with self.rules_context():
            self.cache, self.state = self.programs["insert"](
                self.cache, self.state, self.store, row(entry), row(hashes), row(samples),
                row(limits), self.seed, prog=self.prog)

    def decode(self, min_exit: int) -> Any:
        with self.rules_context():
            self.cache, self.state, steps, out = self.programs["chunk"](
                self.params, self.cache, self.state, self.seed, jnp.int32(MAX_CHUNK),
                jnp.int32(min_exit), prog=self.prog)
        return steps, out

    def read(self, handle: Any) -> Chunk:
        steps, out = handle
        done, drawn, stopped, tokens, logits = (None if x is None else np.asarray(x)
                                                for x in out)
        return Chunk(int(steps), done, drawn, stopped, tokens, logits)

    def release(self, slots: list[int]) -> None:
        mask = np.zeros(self.slots, bool)
        mask[slots] = True
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
        self.read(self.decode(1))  # every slot is empty: no step runs

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
