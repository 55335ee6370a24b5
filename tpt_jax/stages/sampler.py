"""Think's engine: continuous batching over a fixed set of decode slots, n samples per prompt
from one prefill.

`Sampler.generate` keeps `rows` decode slots busy. Requests are (prompt, sample) pairs, longest
token limit first (stable, so dataset order when the limits agree: a long row that starts last
would run on alone). When slots are free, the
next requests take them: prompts not yet prefilled are prefilled in batches (one compiled
program per prompt bucket and batch size; spare rows of a batch prefill the prompts that come
next) into a prompt store, and each free slot starts one sample from its prompt's entry. Then a
compiled chunk of decode steps runs on device until enough slots have finished to be worth a
refill (`refill_at`), so the host steps in once per refill, not once per token. A finished
row's slot is refilled at once, so ragged traces (most stop early, a few run to the limit) no
longer idle their batch's other rows.

Randomness is per row: a sample's token i is drawn with key fold_in(fold_in(fold_in(key(seed),
hash(question id)), sample index), i), so its tokens never depend on its slot, when it started
or what else ran. The static path (`static=True`: one batch from prefill to its longest row,
as before) computes the same rows with the same keys and cache layout, and is the reference
the tests compare against. Rows are data-parallel and heads tensor-parallel through
`SAMPLE_RULES`; what the host reads is replicated, and every host takes the same decisions from
it, so it is safe on several hosts. The device programs are in `decode.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from tpt_jax.config import ConfigError, MeshConfig
from tpt_jax.gemma import model as M
from tpt_jax.gemma.sharding import SAMPLE_RULES, logical_to_spec, use_rules
from tpt_jax.stages import decode as D
from tpt_jax.stages.continuous import ContinuousRun, left_pad, prefill_sizes
from tpt_jax.stages.decode import (  # noqa: F401  (the sampler's public names)
    TRACE_COUNT, LayerCache, SamplingConfig, forward_layers, init_layer_cache, logits_of,
    row_keys, sample_logits, unstack_layers)

log = logging.getLogger(__name__)
Array = jax.Array


@dataclasses.dataclass
class Generation:
    """One sample: generated ids (EOS excluded), why it ended, and how many tokens were drawn
    (EOS included: the compute it cost)."""

    tokens: list
    finish: str  # "stop" (EOS or a stop sequence) | "length"
    num_tokens: int
    logits: Optional[np.ndarray] = None  # [num_tokens, V], only when asked for


def prompt_buckets(max_prompt_tokens: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` up to (and capped by) max_prompt_tokens."""
    if max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    out, b = [], smallest
    while b < max_prompt_tokens:
        out.append(b)
        b *= 2
    out.append(max_prompt_tokens)
    return tuple(out)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


def stable_hash(text: str) -> int:
    """31-bit hash of a question id, identical on every host and every run."""
    return int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:4], "little") & 0x7FFFFFFF


class Sampler:
    """Sampling on one model over `rows` decode slots, compiled once per sampling setting (and
    per prompt bucket and prefill size for the prefill).

    Prompts longer than the largest bucket keep their last tokens. The params (any layout,
    e.g. the trainer's) are copied once into the sampling layout (`unstack_layers`: one array
    per layer, `SAMPLE_RULES` shardings with a mesh), so slots are split over (data, fsdp) and
    heads over tensor, and the decode loop never gathers or slices a weight. `stats` describes
    the last `generate` call (decode steps, slot utilisation, prefills, host checks)."""

    def __init__(self, model: M.Gemma2, params: Any, mesh=None, *, rows: int = 32,
                 max_prompt_tokens: int = 512, buckets: Optional[Sequence[int]] = None,
                 eos_id: Optional[int | Sequence[int]] = 1, pad_id: int = 0,
                 stop_tokens: Sequence[Sequence[int]] = (), rules=SAMPLE_RULES,
                 refill_at: Optional[int] = None):
        if rows < 1:
            raise ConfigError(f"sampler rows must be >= 1, got {rows}")
        self.model, self.cfg, self.mesh, self.rules = model, model.cfg, mesh, rules
        self.rows = rows
        # a chunk ends once this many slots are free to refill: every host check costs a
        # round trip, every idle slot a share of a step
        self.refill_at = max(1, rows // 16) if refill_at is None else max(1, int(refill_at))
        self.buckets = tuple(sorted(buckets)) if buckets else prompt_buckets(max_prompt_tokens)
        self.eos_ids = () if eos_id is None else (
            (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(map(int, eos_id)))
        self.pad_id = int(pad_id)
        self.stop_seqs = tuple(tuple(int(t) for t in s) for s in stop_tokens if len(s))
        self.cache_dtype = model.dtype
        self.params = unstack_layers(params, model, mesh, rules)  # the sampling layout
        self._bufs: dict = {}  # donated device buffers reused between calls
        self._init_slots: dict = {}
        self.programs = D.compiled(model.cfg, model.dtype, model.param_dtype)
        self.stats: dict = {}

    # -- placement

    def _cache_shardings(self, rows: int, length: int) -> LayerCache:
        c = self.cfg
        shape = (rows, c.num_kv_heads, length, c.head_dim)
        kv = NamedSharding(self.mesh, logical_to_spec(D.CACHE_AXES, self.rules, self.mesh, shape))
        pos = NamedSharding(self.mesh, logical_to_spec(M.CACHE_POS_AXES, self.rules, self.mesh,
                                                       (rows, length)))
        return LayerCache(k=(kv,) * c.num_layers, v=(kv,) * c.num_layers, pos=pos)

    def put(self, x: np.ndarray, logical: tuple) -> Array:
        """Host array (identical on every host) -> global array sharded by logical axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(logical, self.rules, self.mesh, x.shape)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec),
                                            lambda idx: x[idx])

    def rules_context(self):
        return use_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _buffer(self, name: str, key: tuple, make: Callable, shardings=None):
        """A donated device buffer: reused while `key` (its shape) stays, else allocated."""
        have = self._bufs.pop(name, None)
        if have is not None and have[0] == key:
            return have[1]
        del have  # free the old one before allocating
        with self.rules_context():
            return jax.jit(make, out_shardings=shardings)()

    def _keep(self, name: str, key: tuple, buf) -> None:
        if not jax.tree.leaves(buf)[0].is_deleted():  # not donated to a call that failed
            self._bufs[name] = (key, buf)

    def cache_length(self, max_new: int) -> int:
        """Columns of a decode slot: the largest bucket + max_new (whole blocks when long).
        The same for every prompt, whatever else runs, so a row's numerics never change."""
        return M.cache_length(self.buckets[-1] + max_new)

    def _decode_cache(self, rows: int, length: int) -> LayerCache:
        make = lambda: init_layer_cache(self.cfg, rows, length, self.cache_dtype)
        sh = None if self.mesh is None else self._cache_shardings(rows, length)
        return self._buffer("cache", (rows, length), make, sh)

    def _program(self, sampling: SamplingConfig, group: int, record: bool = False) -> D.Program:
        return D.Program(sampling.validate(), group, self.eos_ids, self.stop_seqs, self.pad_id,
                         record)

    # -- public

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, n: int = 1,
                 ids: Optional[Sequence[str]] = None, seed: int = 0,
                 progress: Optional[Callable[[int], None]] = None, return_logits: bool = False,
                 max_new_tokens: Optional[Sequence[int]] = None, static: bool = False,
                 longest_first: bool = True) -> list[list[Generation]]:
        """n samples for each prompt (token ids, BOS included if wanted) -> [prompt][sample].

        `ids` (default: the prompt's index) and `seed` decide each sample's randomness, so the
        same (seed, id, sample) gives the same tokens in any slot, order or batch.
        `max_new_tokens` (one per prompt, each 1..sampling.max_new_tokens) gives prompts their
        own token limits. `progress(k)` is called as k more samples finish. `return_logits`
        (tests) also returns each step's logits. `static` runs static batches (the reference).
        `longest_first=False` starts requests in the given order even when their limits differ."""
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        ids = [str(i) for i in range(len(prompts))] if ids is None else list(ids)
        if len(ids) != len(prompts):
            raise ValueError("ids and prompts differ in length")
        cap = sampling.validate().max_new_tokens
        limits = [cap] * len(prompts) if max_new_tokens is None else [int(x) for x in max_new_tokens]
        if len(limits) != len(prompts):
            raise ValueError("max_new_tokens and prompts differ in length")
        if any(not 1 <= x <= cap for x in limits):
            raise ConfigError(f"per-prompt max_new_tokens must be in 1..{cap}")
        work = []  # (bucket, prompt ids after truncation)
        for i, p in enumerate(prompts):
            b = bucket_for(len(p), self.buckets)
            if len(p) > self.buckets[-1]:
                log.warning("prompt %s has %d tokens; keeping the last %d", ids[i], len(p), b)
            work.append((b, list(p)[-b:] if len(p) else []))
        results: list[list[Optional[Generation]]] = [[None] * n for _ in prompts]
        self.stats = {"slots": self.rows, "decode_steps": 0, "tokens": 0, "prefills": 0,
                      "host_checks": 0, "static": static}
        if prompts:
            run = self._static if static else self._continuous
            g = min(n, self.rows) if static else 1
            order = sorted(range(len(work)), key=lambda i: -limits[i] if longest_first else 0)
            run(work, [stable_hash(i) for i in ids], limits, n, seed, results, progress,
                self._program(sampling, g, return_logits), order)
        s = self.stats
        s["slot_utilization"] = round(s["tokens"] / max(s["slots"] * s["decode_steps"], 1), 4)
        return results  # type: ignore[return-value]

    def _generation(self, toks: list, num: int, stopped: bool, seen) -> Generation:
        toks = toks[:num]
        if stopped and toks and toks[-1] in self.eos_ids:
            toks = toks[:-1]
        self.stats["tokens"] += num
        return Generation(toks, "stop" if stopped else "length", num,
                          None if seen is None else seen[:num])

    # -- continuous batching

    def fresh_state(self, prog: D.Program, n: int):
        """Decode cache, prompt store (as many entries as a static batch has prompts: the
        static path's prefill cache) and fresh slots for n samples per prompt."""
        R, lp = self.rows, self.buckets[-1]
        E = max(1, R // min(n, R))
        cache = self._decode_cache(R, self.cache_length(prog.sampling.max_new_tokens))
        store = self._buffer("store", (E, lp), functools.partial(
            D.init_store, self.cfg, E, lp, self.cache_dtype))
        if prog not in self._init_slots:  # one compiled initialiser per setting, not per call
            self._init_slots[prog] = jax.jit(functools.partial(D.init_slots, self.cfg, R, prog))
        with self.rules_context():
            slots = self._init_slots[prog]()
        return cache, store, slots

    def keep_state(self, cache: LayerCache, store: D.Store) -> None:
        """Hold the decode cache and prompt store for the next call (same shapes: no
        allocation)."""
        self._keep("cache", (self.rows, cache.pos.shape[1]), cache)
        self._keep("store", store.pos.shape, store)

    def _continuous(self, work, hashes, limits, n, seed, results, progress, prog,
                    order) -> None:
        ContinuousRun(self, work, hashes, limits, n, seed, prog, order).run(results, progress)

    def warm_up(self, sampling: SamplingConfig, n: int = 1, static: bool = False) -> None:
        """Compile every program `generate` can use with these settings (benchmarks time
        decoding, not compiles); nothing is sampled."""
        R, fn, seed = self.rows, self.programs, jnp.int32(0)
        prog = self._program(sampling, min(n, R) if static else 1)
        if static:
            self.stats = {"tokens": 0, "decode_steps": 0}
            work, lim = [(b, [2]) for b in self.buckets], [0] * len(self.buckets)
            results = [[None] * n for _ in work]
            self._static(work, [0] * len(work), lim, n, 0, results, None, prog)
            return
        cache, store, slots = self.fresh_state(prog, n)
        E, lp = store.pos.shape
        none = lambda k: self.put(np.full(k, -1, np.int32), (None,))
        rows = lambda: self.put(np.zeros(R, np.int32), ("act_batch",))
        with self.rules_context():
            for b in self.buckets:
                for size in prefill_sizes(E):
                    x = self.put(np.zeros((size, b), np.int32), ("act_batch", None))
                    store = fn["prefill"](self.params, store, x, x, none(E))
            entry = self.put(np.full(R, -1, np.int32), ("act_batch",))
            cache, slots = fn["insert"](cache, slots, store, entry, rows(), rows(), rows(), seed,
                                        prog=prog)
            cache, slots, _, out = fn["chunk"](self.params, cache, slots, seed, jnp.int32(0),
                                               jnp.int32(1), prog=prog)
        jax.block_until_ready(out)
        self.keep_state(cache, store)

    def collect(self, finished: list, results, progress) -> None:
        for (i, j), toks, num, stopped, seen in finished:
            results[i][j] = self._generation(toks[:num].tolist(), num, stopped, seen)
        if finished and progress is not None:
            progress(len(finished))
        finished.clear()

    # -- static batches (the reference)

    def _static(self, work, hashes, limits, n, seed, results, progress, prog,
                order=None) -> None:
        g = prog.group
        per_batch = self.rows // g
        length = self.cache_length(prog.sampling.max_new_tokens)
        items = sorted(((work[i][0], i, first, min(g, n - first)) for i in range(len(work))
                        for first in range(0, n, g)), key=lambda w: w[0])  # stable
        batches = []
        for bucket in sorted({w[0] for w in items}):
            its = [w for w in items if w[0] == bucket]
            batches += [its[j:j + per_batch] for j in range(0, len(its), per_batch)]
        pending = None
        for batch in batches + [None]:
            launched = None
            if batch is not None:  # dispatch the next batch before reading the previous one
                launched = (batch, self._launch(batch, work, hashes, limits, length, prog, seed))
            if pending is not None:
                self._collect_static(pending, g, results, progress)
            pending = launched

    def _launch(self, batch, work, hashes, limits, length, prog, seed):
        """Dispatch one compiled static batch (asynchronously). batch: (bucket, prompt, first
        sample, count) per prompt; rows past the last item are padding (limit 0)."""
        g, bucket = prog.group, batch[0][0]
        n_prompts = self.rows // g
        tokens, positions = left_pad([work[i][1] for _, i, _, _ in batch], n_prompts, bucket,
                                       self.pad_id)
        hs, samples, lim = (np.zeros(n_prompts * g, np.int32) for _ in range(3))
        for p, (_, i, first, count) in enumerate(batch):
            hs[p * g:(p + 1) * g] = hashes[i]
            samples[p * g:(p + 1) * g] = first + np.arange(g)
            lim[p * g:p * g + count] = limits[i]
        cache = self._decode_cache(n_prompts * g, length)
        args = [self.put(x, ("act_batch", None)) for x in (tokens, positions)]
        args += [self.put(x, ("act_batch",)) for x in (hs, samples, lim)]
        with self.rules_context():
            cache, *result = self.programs["generate"](self.params, cache, *args,
                                                  jnp.asarray(seed, jnp.int32), prog=prog)
        self._keep("cache", (n_prompts * g, length), cache)
        return result

    def _collect_static(self, pending, g: int, results, progress) -> None:
        batch, (out, num, stopped, seen, steps) = pending
        out, num, stopped = np.asarray(out), np.asarray(num), np.asarray(stopped)
        seen = None if seen is None else np.asarray(seen)
        self.stats["decode_steps"] += int(steps)
        done = 0
        for p, (_, i, first, count) in enumerate(batch):
            for j in range(count):
                r = p * g + j
                results[i][first + j] = self._generation(out[r].tolist(), int(num[r]),
                                                         bool(stopped[r]),
                                                         None if seen is None else seen[r])
                done += 1
        if progress is not None:
            progress(done)


def parse_mesh(text: str) -> MeshConfig:
    """`--mesh data,fsdp,tensor` of the sampling commands."""
    try:
        d, f, t = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--mesh must be three integers data,fsdp,tensor, got {text!r}") from None
    return MeshConfig(data=d, fsdp=f, tensor=t)
