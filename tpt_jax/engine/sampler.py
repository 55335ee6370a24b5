"""The engine's front door: `Sampler.generate` draws n samples per prompt over a fixed set of
decode slots, and `Sampler.update_params` swaps the weights in, so one sampler (its compiled
programs, caches and sampling-layout buffers) serves a whole run.

Continuous batching (the default): the host `scheduler.Scheduler` keeps every slot busy (a
slot whose row ends takes the next waiting sample at once) and drives the device side
(`device.Device`) through the narrow contract of `contract.py`. `attention="paged"` (or
"pallas", the same cache read by JAX's Pallas paged-attention kernel, GPU or TPU) keeps the
decode cache in pages (split like the slots over devices) that rows take as they grow (`pages`, `paged`; a prompt's full pages shared by its samples):
tokens are those of the dense cache, the attention reads only the pages a chunk can reach, and
a KV budget (`kv_cache_gb`) holds rows by their live pages (when they outgrow it the newest is
preempted and started again, with the same tokens). `static=True` runs static
batches instead (`static.py`), the reference the tests compare against. A sample's tokens
depend only on (seed, question id, sample index), never on its slot, when it started or what
else ran, so cancelling some (early stop, `samples_needed`) never changes the others.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from tpt_jax.config import ATTENTIONS, ConfigError
from tpt_jax.engine import programs as PR
from tpt_jax.engine.contract import Finished, Prompt, Stats
from tpt_jax.engine.device import Device
from tpt_jax.engine.paged import KERNEL_PLATFORMS, pool_bytes
from tpt_jax.engine.sampling import SamplingConfig
from tpt_jax.engine.scheduler import Scheduler
from tpt_jax.engine.static import run_static
from tpt_jax.gemma import model as M
from tpt_jax.gemma.attention import CACHE_BLOCK
from tpt_jax.gemma.sharding import SAMPLE_RULES, logical_to_spec, mesh_axis_size

log = logging.getLogger(__name__)


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


def row_shards(mesh, rows: int, rules=SAMPLE_RULES) -> int:
    """Devices the decode slots are split over (the sampling layout's batch axes)."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("act_batch",), rules, mesh, (rows,))[0]
    return 1 if spec is None else mesh_axis_size(mesh, spec)


def resolve_attention(name: str, interpret: Optional[str] = None) -> str:
    """The decode attention to use: 'auto' is the dense cache on CPU (its figures unchanged),
    else the paged cache; 'pallas'
    (the paged cache read by JAX's Pallas paged-attention kernel) needs a GPU or a TPU, or
    `interpret` ('gpu' or 'tpu': that platform's kernel interpreted, for tests on CPU)."""
    if name not in ATTENTIONS:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTIONS)}, got {name!r}")
    if interpret not in (None, *KERNEL_PLATFORMS):
        raise ConfigError(f"interpret must be one of {', '.join(KERNEL_PLATFORMS)}, "
                          f"got {interpret!r}")
    backend = jax.default_backend()
    if name == "pallas" and backend not in KERNEL_PLATFORMS and not interpret:
        raise ConfigError(f"attention 'pallas' runs JAX's Pallas paged-attention kernel (GPU or "
                          f"TPU), and this backend is {backend}: use 'paged'")
    if name == "auto":
        return "dense" if backend == "cpu" else "paged"
    return name


def decode_kernel(attention: str, interpret: Optional[str] = None) -> str:
    """The paged decode attention's kernel (`paged.KERNELS`): the backend's Pallas kernel for
    'pallas' (interpreted on CPU for `interpret`), else the plain-JAX path."""
    if attention != "pallas":
        return "plain"
    return f"{interpret}-interpret" if interpret else jax.default_backend()


PAGE_SIZE = 16  # paged cache: columns a page holds


def pool_pages(model: M.Gemma2, attention: str, page: int, buckets: Sequence[int],
               kv_cache_gb: Optional[float], max_new_tokens: Optional[int] = None,
               what: Optional[str] = None, shards: int = 1) -> Optional[int]:
    """Pages of the paged pool from the KV budget (None: dense, or every slot at its
    longest; the pool is split over the `shards` devices the slots are split over), or a
    one-line error: a budget without a paged cache, a page size that does not divide the
    cache's blocks, a budget (`what` names it) that cannot hold one row at its longest on
    each device."""
    if attention == "dense":
        if kv_cache_gb is not None:
            raise ConfigError("kv_cache_gb sizes the paged cache: set attention to 'paged'")
        return None
    if page < 1 or CACHE_BLOCK % page:
        raise ConfigError(f"page size {page} does not divide the cache's blocks of "
                          f"{CACHE_BLOCK} columns")
    if kv_cache_gb is None:
        return None
    if kv_cache_gb <= 0:
        raise ConfigError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
    pages = int(kv_cache_gb * 1e9 // pool_bytes(model.cfg, 1, page, model.dtype))
    need = 0 if max_new_tokens is None else -(-(buckets[-1] + max_new_tokens - 1) // page)
    # (a row's pages hold its own prompt; the longest prompt fills the largest bucket)
    if pages // shards < need:
        split = f" ({pages // shards} on each of {shards} devices)" if shards > 1 else ""
        raise ConfigError(
            f"{what or f'kv_cache_gb={kv_cache_gb}'} holds {pages} pages of {page} tokens"
            f"{split}, but one row at its longest ({buckets[-1]} prompt + {max_new_tokens} "
            f"new tokens) needs {need}")
    return pages


def free_memory_gb(mesh=None) -> Optional[float]:
    """The least free memory (GB) among this process's sampling devices, the same on every
    process (their page tables must agree); None where the backend does not report it (CPU)."""
    devices = (jax.local_devices() if mesh is None else
               [d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    stats = [d.memory_stats() for d in devices]
    if not stats or any(not s or "bytes_limit" not in s for s in stats):
        return None
    free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
    return free / 1e9


def check_share(attention: str, share: Optional[float], kv_cache_gb: Optional[float],
                mesh=None) -> None:
    """One-line errors for a KV budget given as a share of free device memory: out of (0, 1),
    beside kv_cache_gb, for a dense cache, or on a backend that does not report its memory."""
    if share is None:
        return
    if not 0 < share < 1:
        raise ConfigError(f"kv_cache_share must be in (0, 1), got {share}")
    if kv_cache_gb is not None:
        raise ConfigError("kv_cache_share and kv_cache_gb both size the page pool: set one")
    if attention == "dense":
        raise ConfigError("kv_cache_share sizes the paged cache, and the cache here is dense: "
                          "set attention to 'paged'")
    if free_memory_gb(mesh) is None:
        raise ConfigError(f"kv_cache_share needs a backend that reports its free memory (GPU, "
                          f"TPU), and this one is {jax.default_backend()}: set kv_cache_gb")


def stable_hash(text: str) -> int:
    """31-bit hash of a question id, identical on every host and every run."""
    return int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:4], "little") & 0x7FFFFFFF


def _id_tuple(ids: Any) -> tuple:
    if ids is None:
        return ()
    return (int(ids),) if isinstance(ids, (int, np.integer)) else tuple(map(int, ids))


class Sampler:
    """Sampling on one model over `rows` decode slots, compiled once per sampling setting (and
    per prompt bucket and prefill size for the prefill).

    Prompts longer than the largest bucket keep their last tokens. `params` (any layout, e.g.
    the trainer's) are copied into the sampling layout (one array per layer, sampling
    shardings with a mesh); `update_params` replaces them in place, and may be called first
    when the sampler was made without weights. `stop_tokens` are the default stop sequences
    of `generate`. `stats` describes the last `generate` call."""

    def __init__(self, model: M.Gemma2, params: Any = None, mesh=None, *, rows: int = 32,
                 max_prompt_tokens: int = 512, buckets: Optional[Sequence[int]] = None,
                 eos_id: Optional[int | Sequence[int]] = 1, pad_id: int = 0,
                 stop_tokens: Sequence[Sequence[int]] = (), rules=SAMPLE_RULES,
                 refill_at: Optional[int] = None, attention: str = "dense", page_size: int = PAGE_SIZE,
                 kv_cache_gb: Optional[float] = None, kv_cache_share: Optional[float] = None,
                 interpret: Optional[str] = None):
        if rows < 1:
            raise ConfigError(f"sampler rows must be >= 1, got {rows}")
        self.model, self.rows = model, rows
        # a chunk ends once this many slots are free to refill: every host check costs a
        # round trip, every idle slot a share of a step
        self.refill_at = max(1, rows // 16) if refill_at is None else max(1, int(refill_at))
        self.buckets = tuple(sorted(buckets)) if buckets else prompt_buckets(max_prompt_tokens)
        self.eos_ids = _id_tuple(eos_id)
        self.pad_id = int(pad_id)
        self.stop_tokens = stop_tokens
        self.shards = row_shards(mesh, rows, rules)  # devices the slots (and pages) split over
        self.attention = resolve_attention(attention, interpret)
        check_share(self.attention, kv_cache_share, kv_cache_gb, mesh)
        self.mesh, self.kv_cache_gb, self.kv_cache_share = mesh, kv_cache_gb, kv_cache_share
        pages = pool_pages(model, self.attention, page_size, self.buckets, kv_cache_gb,
                           shards=self.shards)
        self.device = Device(model, mesh, rules, rows, self.buckets[-1], self.pad_id,
                             self.attention, page_size, pages,
                             decode_kernel(self.attention, interpret), self.shards)
        self.stats = Stats(slots=rows)
        if params is not None:
            self.update_params(params)

    def check_kv(self, max_new_tokens: int) -> None:
        """One-line error when the KV budget cannot hold one row at its longest."""
        pool_pages(self.model, self.attention, self.device.page, self.buckets,
                   self.kv_cache_gb, max_new_tokens, shards=self.shards)

    def size_pool(self, max_new_tokens: int) -> None:
        """A budget given as kv_cache_share becomes the pool's pages the first time the
        sampler samples: its weights are on the devices by then, and the pool, once allocated,
        is kept for later calls. Each device the slots are split over holds its share (its
        heads' part of its pages where the heads are split too: the share then leaves more
        free)."""
        if self.kv_cache_share is None or self.kv_cache_gb is not None:
            return
        free = free_memory_gb(self.mesh)
        gb = self.kv_cache_share * free * self.shards
        self.device.pages = pool_pages(
            self.model, self.attention, self.device.page, self.buckets, gb, max_new_tokens,
            what=f"kv_cache_share={self.kv_cache_share} of {free:.2f} GB free",
            shards=self.shards)
        self.kv_cache_gb = gb
        log.info("paged KV cache: kv_cache_share=%s of %.2f GB free memory a device: %.2f GB, "
                 "%d pages of %d tokens", self.kv_cache_share, free, gb, self.device.pages,
                 self.device.page)

    def update_params(self, params: Any) -> bool:
        """Sample from `params` from now on: copied into the existing sampling buffers (the
        old ones donated); False when these very weights are already held (no copy)."""
        return self.device.weights.update(params)

    @property
    def layout_copies(self) -> int:
        """Weight copies into the sampling layout this sampler has made."""
        return self.device.weights.copies

    def cache_length(self, max_new: int) -> int:
        return self.device.cache_length(max_new)

    def _program(self, sampling: SamplingConfig, group: int, record: bool = False,
                 stop_tokens: Optional[Sequence[Sequence[int]]] = None) -> PR.Program:
        stops = self.stop_tokens if stop_tokens is None else stop_tokens
        stop_seqs = tuple(tuple(int(t) for t in s) for s in stops if len(s))
        return PR.Program(sampling.validate(), group, self.eos_ids, stop_seqs, self.pad_id,
                          record)

    def _prompts(self, prompts: Sequence[Sequence[int]], ids: Sequence[str],
                 limits: Sequence[int], firsts: Sequence[int]) -> list[Prompt]:
        out = []
        for i, p in enumerate(prompts):
            b = bucket_for(len(p), self.buckets)
            if len(p) > self.buckets[-1]:
                log.warning("prompt %s has %d tokens; keeping the last %d", ids[i], len(p), b)
            out.append(Prompt(tuple(p)[-b:] if len(p) else (), b, stable_hash(ids[i]),
                              limits[i], firsts[i]))
        return out

    # -- public

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, n: int = 1,
                 ids: Optional[Sequence[str]] = None, seed: int = 0,
                 progress: Optional[Callable[[int], None]] = None, return_logits: bool = False,
                 max_new_tokens: Optional[Sequence[int]] = None, static: bool = False,
                 longest_first: bool = True,
                 stop_tokens: Optional[Sequence[Sequence[int]]] = None,
                 samples_needed: Optional[Callable[[int, int, Generation], Optional[int]]] = None,
                 first_sample: Optional[Sequence[int]] = None) -> list[list[Generation]]:
        """n samples for each prompt (token ids, BOS included if wanted) -> [prompt][sample].

        `ids` (default: the prompt's index) and `seed` decide each sample's randomness, so the
        same (seed, id, sample) gives the same tokens in any slot, order or batch.
        `max_new_tokens` (one per prompt, each 1..sampling.max_new_tokens) gives prompts their
        own token limits. `stop_tokens` (token sequences) replace the sampler's default stop
        sequences for this call. `progress(k)` is called as k more samples finish (or are
        cancelled).
        `return_logits` (tests) also returns each step's logits. `static` runs static batches
        (the reference). `longest_first=False` starts requests in the given order even when
        their limits differ. `first_sample` (one per prompt, default 0) numbers a prompt's
        samples from there: result [i][j] is sample first_sample[i] + j, the very sample a call
        from 0 draws at that index, so a later call continues a question's samples.

        Early stop: `samples_needed(prompt, sample, generation)`, called as each sample
        finishes, may return m, the samples its prompt needs (every sample below m has
        finished): the later ones are cancelled (waiting ones never start, running ones stop
        at the next host check) and the prompt gets m results. Requests then run sample-major
        (every prompt's sample 0 before any sample 1), so answers come before later samples
        start. Static batches draw every sample and only cut the results."""
        out = []
        for _, group in self.stream(prompts, sampling, n, [len(prompts)], ids, seed, progress,
                                    return_logits, max_new_tokens, static, longest_first,
                                    stop_tokens, samples_needed, first_sample):
            out += group
        return out

    def stream(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, n: int,
               sizes: Sequence[int], ids: Optional[Sequence[str]] = None, seed: int = 0,
               progress: Optional[Callable[[int], None]] = None, return_logits: bool = False,
               max_new_tokens: Optional[Sequence[int]] = None, static: bool = False,
               longest_first: bool = True,
               stop_tokens: Optional[Sequence[Sequence[int]]] = None,
               samples_needed: Optional[Callable[[int, int, Generation], Optional[int]]] = None,
               first_sample: Optional[Sequence[int]] = None
               ) -> Iterator[tuple[int, list[list[Generation]]]]:
        """`generate` for prompts in consecutive groups of `sizes`, yielding (group, its
        [prompt][sample]) as soon as every sample of the group has finished or been cancelled.
        A group's requests start after the previous group's, so the next group fills the
        slots while one group's longest rows finish: one call over many groups keeps the
        slots busy where a call a group would leave them idle at each group's end. The
        per-prompt counts in `stats` (`Stats.drawn`) say what each group drew; those of a
        group's cancelled rows may still grow after it is yielded, until their slots are
        freed at the next host check."""
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if sum(sizes) != len(prompts) or any(m < 0 for m in sizes):
            raise ValueError("group sizes must be >= 0 and add up to the prompts")
        ids = [str(i) for i in range(len(prompts))] if ids is None else list(ids)
        if len(ids) != len(prompts):
            raise ValueError("ids and prompts differ in length")
        cap = sampling.validate().max_new_tokens
        self.size_pool(cap)
        self.check_kv(cap)
        limits = [cap] * len(prompts) if max_new_tokens is None else [int(x) for x in max_new_tokens]
        if len(limits) != len(prompts):
            raise ValueError("max_new_tokens and prompts differ in length")
        if any(not 1 <= x <= cap for x in limits):
            raise ConfigError(f"per-prompt max_new_tokens must be in 1..{cap}")
        firsts = [0] * len(prompts) if first_sample is None else [int(x) for x in first_sample]
        if len(firsts) != len(prompts) or any(x < 0 for x in firsts):
            raise ValueError("first_sample needs one index >= 0 per prompt")
        work = self._prompts(prompts, ids, limits, firsts)
        self.stats = Stats(slots=self.rows, static=static)
        bounds = np.cumsum([0, *sizes]).tolist()
        groups = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        group_of = [g for g, members in enumerate(groups) for _ in members]
        unsettled = [n * len(members) for members in groups]  # samples not yet settled
        results: list[list[Optional[Generation]]] = [[None] * n for _ in prompts]
        limit, cuts = [n] * len(prompts), []  # samples each prompt needs; cancellations due
        for g in (g for g, left in enumerate(unsettled) if not left):
            yield g, []
        if not prompts:
            return
        prog = self._program(sampling, min(n, self.rows) if static else 1, return_logits,
                             stop_tokens)
        order = [sorted(members, key=lambda i: -work[i].limit if longest_first else 0)
                 for members in groups]
        for finished in self._finished(work, n, prog, seed, static, order, cuts,
                                       samples_needed is not None):
            settled = 0  # samples finished, or cancelled before they finished
            complete = []  # groups whose every sample is now settled
            for f in finished:
                i, j = f.request.prompt, f.request.sample
                if j >= limit[i]:  # finished before its cancellation reached it
                    self.stats.drop(i, len(f.tokens), "cancelled")
                    continue
                results[i][j] = g = self._generation(f)
                settled += 1
                unsettled[group_of[i]] -= 1
                m = None if samples_needed is None else samples_needed(i, j, g)
                if m is not None and m < limit[i]:
                    if m < 1 or any(r is None for r in results[i][:m]):
                        raise ValueError(f"samples_needed gave {m} before samples 0.."
                                         f"{m - 1} of prompt {i} finished")
                    late = [r for r in results[i][m:limit[i]] if r is not None]
                    for r in late:  # finished before the cut (in this list): discarded
                        self.stats.drop(i, r.num_tokens, "cancelled")
                    dropped = limit[i] - m - len(late)  # not finished: cancelled
                    settled += dropped
                    unsettled[group_of[i]] -= dropped
                    limit[i] = m
                    cuts.append((i, m))
                if not unsettled[group_of[i]]:
                    complete.append(group_of[i])
            if progress is not None:
                progress(settled)
            for g in sorted(set(complete)):
                yield g, [results[i][:limit[i]] for i in groups[g]]  # type: ignore[misc]

    def _finished(self, work: list[Prompt], n: int, prog: PR.Program, seed: int, static: bool,
                  order: list[list[int]], cuts: list, by_sample: bool) -> Iterator[list[Finished]]:
        """The finished samples, a list at a time; between lists, the (prompt, sample)
        cancellations the caller appended to `cuts` go to the scheduler."""
        if static:
            yield from run_static(self.device, work, n, prog, seed, self.stats)
            return
        self.device.begin(prog, n, seed, by_sample)
        try:
            scheduler = Scheduler(self.device, work, n, order, self.refill_at, self.stats,
                                  by_sample)
            for finished in scheduler.run():
                yield finished
                for i, m in cuts:
                    scheduler.cancel(i, m)
                cuts.clear()
        finally:
            self.device.end()

    def _generation(self, f: Finished) -> Generation:
        toks = f.tokens.tolist()
        num = len(toks)
        if f.stopped and toks and toks[-1] in self.eos_ids:
            toks = toks[:-1]
        return Generation(toks, "stop" if f.stopped else "length", num, f.logits)

    def warm_up(self, sampling: SamplingConfig, n: int = 1, static: bool = False) -> None:
        """Compile every program `generate` can use with these settings (benchmarks time
        decoding, not compiles); nothing is kept."""
        prog = self._program(sampling, min(n, self.rows) if static else 1)
        if static:
            work = [Prompt((2,), b, 0, 0) for b in self.buckets]  # limit 0: padding rows
            for _ in run_static(self.device, work, n, prog, 0, Stats(slots=self.rows)):
                pass
            return
        self.device.begin(prog, n, 0)
        try:
            self.device.warm_up(self.buckets)
        finally:
            self.device.end()
