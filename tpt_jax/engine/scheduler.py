"""Continuous batching's host side: which request each decode slot holds, which prompts sit in
the prompt store, and when to prefill, insert and decode. It speaks to the device only through
`contract.SlotDevice`, so it runs as well against the fake device of the tests.

Requests are (prompt, sample) pairs, all n samples of a prompt in turn, prompts in the given
order. When slots are free, the next requests take them: prompts not yet in the store are
prefilled in batches of one bucket (spare rows of a prefill batch take the prompts that come
next), and each free slot starts one sample from its prompt's entry. Then a chunk of decode
steps runs until `refill_at` slots have finished (or every slot, once nothing waits), so the
host steps in once per refill, not once per token. While a chunk runs, the caller turns the
previous chunk's finished rows into results. Every host takes the same decisions from the
same replicated outputs.
"""
from __future__ import annotations

import collections
from typing import Iterator, Sequence

from tpt_jax.engine.contract import Chunk, Finished, Prompt, Request, SlotDevice, Start, Stats


class Scheduler:
    """One generate call over a device's slots: `run()` yields the finished samples, a list
    per host check."""

    def __init__(self, device: SlotDevice, prompts: Sequence[Prompt], n: int,
                 order: Sequence[int], refill_at: int, stats: Stats):
        self.device, self.prompts, self.n = device, list(prompts), n
        self.refill_at, self.stats = refill_at, stats
        self.queue = [Request(i, j) for i in order for j in range(n)]
        self.next = 0  # index of the next request to start
        self.held: list = [None] * device.slots  # the request each slot holds
        self.entry_of: dict[int, int] = {}  # prompt -> its store entry
        self.left = [0] * device.entries  # samples of an entry's prompt not yet started
        self.free_entries = collections.deque(range(device.entries))

    # -- the loop

    def run(self) -> Iterator[list[Finished]]:
        finished: list[Finished] = []
        while True:
            free = [r for r, h in enumerate(self.held) if h is None]
            while free and self.admit(free):
                pass
            if all(h is None for h in self.held):
                break
            handle = self.device.decode(self.min_exit())
            if finished:
                yield finished  # the caller works while the chunk runs
            finished = self.finished_rows(self.device.read(handle))
        if finished:
            yield finished
        if self.next < len(self.queue):  # the store always has room for the next prompt
            raise RuntimeError(f"sampler stalled with {len(self.queue) - self.next} requests "
                               "waiting")

    def min_exit(self) -> int:
        """Slots that must finish before the host steps in: `refill_at` while requests wait
        (fewer when fewer wait), else every slot (more than there are: run to the end)."""
        waiting = len(self.queue) - self.next
        return min(self.refill_at, waiting) if waiting else self.device.slots + 1

    def finished_rows(self, chunk: Chunk) -> list[Finished]:
        """Free the slots whose rows are done; returns those rows."""
        self.stats.decode_steps += chunk.steps
        self.stats.host_checks += 1
        rows = []
        for r, request in enumerate(self.held):
            if request is not None and chunk.done[r]:
                num = int(chunk.drawn[r])
                rows.append(Finished(request, chunk.tokens[r, :num], bool(chunk.stopped[r]),
                                     None if chunk.logits is None else chunk.logits[r, :num]))
                self.stats.tokens += num
                self.held[r] = None
        return rows

    # -- starting requests

    def admit(self, free: list) -> bool:
        """Start waiting requests in free slots (prefilling the prompts they need first);
        False when nothing could start."""
        starts, need = [], []
        while free and self.next < len(self.queue):
            request = self.queue[self.next]
            if request.prompt not in self.entry_of:
                if not self.free_entries:
                    break
                self.open_entry(request.prompt)
                need.append(request.prompt)
            starts.append(Start(free.pop(0), self.entry_of[request.prompt], request))
            self.left[self.entry_of[request.prompt]] -= 1
            self.next += 1
        if not starts:
            return False
        if need:
            need += self.spare_prefill_rows(need)
            for bucket in dict.fromkeys(self.prompts[i].bucket for i in need):
                group = [i for i in need if self.prompts[i].bucket == bucket]
                self.device.prefill([(self.entry_of[i], self.prompts[i]) for i in group])
                self.stats.prefills += 1
        self.device.insert(starts, self.prompts)
        for s in starts:
            self.held[s.slot] = s.request
            i = s.request.prompt  # an entry whose prompt has started all its samples is free
            if self.left[s.entry] == 0 and self.entry_of.get(i) == s.entry:
                del self.entry_of[i]
                self.free_entries.append(s.entry)
        self.stats.decode_steps += 1  # the step that drew the first tokens
        return True

    def open_entry(self, prompt: int) -> None:
        self.entry_of[prompt] = e = self.free_entries.popleft()
        self.left[e] = self.n

    def spare_prefill_rows(self, need: list) -> list:
        """Prompts that come next in the queue, of the last needed prompt's bucket, to fill
        the rows of its prefill batch that would otherwise run empty."""
        bucket = self.prompts[need[-1]].bucket
        count = sum(self.prompts[i].bucket == bucket for i in need)
        sizes = self.device.prefill_sizes
        size = next(s for s in sizes if s >= min(count, self.device.entries))
        extra, k = [], self.next
        while k < len(self.queue) and self.free_entries and count < size:
            i = self.queue[k].prompt
            k += 1
            if i in self.entry_of:
                continue
            if self.prompts[i].bucket != bucket:
                break
            self.open_entry(i)
            extra.append(i)
            count += 1
        return extra
