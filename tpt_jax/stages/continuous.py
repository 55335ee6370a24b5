"""Continuous batching's host side: which request each decode slot holds, which prompts sit in
the prompt store, and when to prefill, insert and decode (the device programs are in
`decode.py`; `sampler.Sampler.generate` makes one `ContinuousRun` per call).

Requests are (prompt, sample) pairs in the given order. When slots are free, the next requests
take them: prompts not yet in the store are prefilled in batches of one bucket (spare rows of a
prefill batch take the prompts that come next), and each free slot starts one sample from its
prompt's entry. Then a compiled chunk of decode steps runs until `refill_at` slots have
finished (or every slot, once nothing waits), so the host steps in once per refill, not once
per token. While a chunk runs, the host turns the previous chunk's finished rows into results.
Every host takes the same decisions from the same replicated outputs.
"""
from __future__ import annotations

import collections
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from tpt_jax.stages import decode as D

MAX_CHUNK = 256  # decode steps between host checks at most (an interrupt waits this long)


def prefill_sizes(entries: int) -> tuple[int, ...]:
    """Prompt counts of the compiled prefill programs: powers of 4 below `entries`, and it."""
    out, b = [], 1
    while b < entries:
        out.append(b)
        b *= 4
    return tuple(out) + (entries,)


def left_pad(prompts: Sequence[list], rows: int, bucket: int, pad_id: int):
    """Prompts (at most `bucket` ids each) -> host tokens and positions [rows, bucket],
    left-padded (position -1 = padding) so every prompt's first new token goes to cache
    column `bucket`; rows past the prompts are all padding. The static path uses it too."""
    tokens = np.full((rows, bucket), pad_id, np.int32)
    positions = np.full((rows, bucket), -1, np.int32)
    for r, ids in enumerate(prompts):
        if ids:
            tokens[r, bucket - len(ids):] = ids
            positions[r, bucket - len(ids):] = np.arange(len(ids))
    return tokens, positions


class ContinuousRun:
    """One `generate` call over the sampler's slots. work[i] = (bucket, prompt ids);
    hashes/limits per prompt; n samples each; order = the prompts in start order."""

    def __init__(self, sampler, work: list, hashes: list, limits: list, n: int, seed: int,
                 prog: D.Program, order: list):
        self.s, self.work, self.hashes, self.limits, self.n = sampler, work, hashes, limits, n
        self.prog, self.seed = prog, jnp.asarray(seed, jnp.int32)
        self.cache, self.store, self.slots = sampler.fresh_state(prog, n)
        self.entries = self.store.pos.shape[0]
        self.sizes = prefill_sizes(self.entries)
        self.queue = [(i, j) for i in order for j in range(n)]
        self.next = 0  # index of the next request to start
        self.held: list = [None] * sampler.rows  # the request each slot holds
        self.entry_of: dict[int, int] = {}  # prompt -> its store entry
        self.left = [0] * self.entries  # samples of an entry's prompt not yet started
        self.free_entries = collections.deque(range(self.entries))

    # -- the loop

    def run(self, results: list, progress: Optional[Callable[[int], None]]) -> None:
        finished: list = []
        try:
            while True:
                free = [r for r, h in enumerate(self.held) if h is None]
                while free and self.admit(free):
                    pass
                if all(h is None for h in self.held):
                    break
                out = self.decode_chunk()
                self.s.collect(finished, results, progress)  # while the chunk runs
                finished = self.finished_rows(out)
            self.s.collect(finished, results, progress)
            if self.next < len(self.queue):  # the store always has room for the next prompt
                raise RuntimeError(f"sampler stalled with {len(self.queue) - self.next} "
                                   "requests waiting")
        finally:
            self.s.keep_state(self.cache, self.store)

    def decode_chunk(self):
        """Dispatch one chunk: it exits once refill_at slots have finished while requests wait,
        else when every slot is done. Returns its replicated outputs."""
        waiting = len(self.queue) - self.next
        min_exit = min(self.s.refill_at, waiting) if waiting else self.s.rows + 1
        with self.s.rules_context():
            self.cache, self.slots, steps, out = self.s.programs["chunk"](
                self.s.params, self.cache, self.slots, self.seed, jnp.int32(MAX_CHUNK),
                jnp.int32(min_exit), prog=self.prog)
        return steps, out

    def finished_rows(self, chunk_out) -> list:
        """Free the slots whose rows are done; returns those rows (request, tokens, count,
        stopped, logits)."""
        steps, out = chunk_out
        done, num, stopped, toks, seen = (None if x is None else np.asarray(x) for x in out)
        self.s.stats["decode_steps"] += int(steps)
        self.s.stats["host_checks"] += 1
        rows = []
        for r, request in enumerate(self.held):
            if request is not None and done[r]:
                rows.append((request, toks[r], int(num[r]), bool(stopped[r]),
                             None if seen is None else seen[r]))
                self.held[r] = None
        return rows

    # -- starting requests

    def admit(self, free: list) -> bool:
        """Start waiting requests in free slots (prefilling the prompts they need first);
        False when nothing could start."""
        take, need = [], []
        while free and self.next < len(self.queue):
            i, j = self.queue[self.next]
            if i not in self.entry_of:
                if not self.free_entries:
                    break
                self.open_entry(i)
                need.append(i)
            take.append((free.pop(0), self.entry_of[i], i, j))
            self.left[self.entry_of[i]] -= 1
            self.next += 1
        if not take:
            return False
        if need:
            need += self.spare_prefill_rows(need)
            for bucket in dict.fromkeys(self.work[i][0] for i in need):
                self.prefill([i for i in need if self.work[i][0] == bucket])
        self.insert(take)
        for _, e, i, _ in take:  # entries whose prompt has started all its samples
            if self.left[e] == 0 and self.entry_of.get(i) == e:
                del self.entry_of[i]
                self.free_entries.append(e)
        self.s.stats["decode_steps"] += 1  # the step that drew the first tokens
        return True

    def open_entry(self, i: int) -> None:
        self.entry_of[i] = e = self.free_entries.popleft()
        self.left[e] = self.n

    def spare_prefill_rows(self, need: list) -> list:
        """Prompts that come next in the queue, of the last needed prompt's bucket, to fill
        the rows of its prefill batch that would otherwise run empty."""
        bucket = self.work[need[-1]][0]
        count = sum(self.work[i][0] == bucket for i in need)
        size = next(s for s in self.sizes if s >= min(count, self.entries))
        extra, k = [], self.next
        while k < len(self.queue) and self.free_entries and count < size:
            i = self.queue[k][0]
            k += 1
            if i in self.entry_of:
                continue
            if self.work[i][0] != bucket:
                break
            self.open_entry(i)
            extra.append(i)
            count += 1
        return extra

    def prefill(self, group: list) -> None:
        """Prefill prompts of one bucket (at most `entries`) into their store entries."""
        b = self.work[group[0]][0]
        size = next(s for s in self.sizes if s >= len(group))
        tokens, positions = left_pad([self.work[i][1] for i in group], size, b, self.s.pad_id)
        src = np.full(self.entries, -1, np.int32)
        for r, i in enumerate(group):
            src[self.entry_of[i]] = r
        self.s.stats["prefills"] += 1
        put = self.s.put
        with self.s.rules_context():
            self.store = self.s.programs["prefill"](
                self.s.params, self.store, put(tokens, ("act_batch", None)),
                put(positions, ("act_batch", None)), put(src, (None,)))

    def insert(self, take: list) -> None:
        """Slot r starts sample j of prompt i from store entry e, for each (r, e, i, j)."""
        rows = self.s.rows
        entry, hashes, samples, limits = (np.full(rows, -1, np.int32), np.zeros(rows, np.int32),
                                          np.zeros(rows, np.int32), np.zeros(rows, np.int32))
        for slot, e, i, j in take:
            entry[slot], hashes[slot], samples[slot], limits[slot] = (
                e, self.hashes[i], j, self.limits[i])
            self.held[slot] = (i, j)
        row = lambda x: self.s.put(x, ("act_batch",))
        with self.s.rules_context():
            self.cache, self.slots = self.s.programs["insert"](
                self.cache, self.slots, self.store, row(entry), row(hashes), row(samples),
                row(limits), self.seed, prog=self.prog)
