"""Continuous batching's host side: which request each decode slot holds, which prompts sit in
the prompt store, and when to prefill, insert and decode. It speaks to the device only through
`contract.SlotDevice`, so it runs as well against the fake device of the tests.

Requests are (prompt, sample) pairs, all n samples of a prompt in turn, prompts in the given
order, which comes in groups: a group's requests wait behind the previous group's, so a group
starts in the slots the previous one frees as its last rows finish. When slots are free, the
next requests take them: prompts not yet in the store are prefilled in batches of one bucket
(spare rows of a prefill batch take the prompts that come next), and each free slot starts
one sample from its prompt's entry. Then a chunk of decode steps runs until `refill_at` slots
have finished (or every slot, once nothing waits), so the host steps in once per refill, not
once per token. While a chunk runs, the caller turns the previous chunk's finished rows into
results. Every host takes the same decisions from the same replicated outputs.

A device with a paged cache may refuse a request (`reserve`: its pages do not fit beside the
running rows'); it then waits, with those after it, until rows end. Before each chunk the
device may preempt running rows (`preempt`: the rows outgrew its pages); their requests go
back to the head of the queue and start again from scratch.

Early stop (`by_sample=True`): requests run sample-major within a group (every prompt's
sample 0 before any sample 1), and a prompt's next sample waits while an earlier one is
undecided (running, or finished but not yet seen by the caller) as long as another prompt's
request, of its group or a later one, can start instead; between yields the caller may
`cancel` a prompt's samples from some index on: waiting requests are dropped, running rows
are freed at the next host check (the device marks them done unless a new request takes the
slot). A prompt is prefilled once either way: its store entry is held until all its samples
have started or been cancelled (with early stop the store holds twice as many prompts as
there are slots, `device.Device.begin`).
"""
from __future__ import annotations

import collections
from typing import Iterator, Sequence

from tpt_jax.engine.contract import Chunk, Finished, Prompt, Request, SlotDevice, Start, Stats


class Scheduler:
    """One generate call over a device's slots: `run()` yields the finished samples, a list
    per host check."""

    def __init__(self, device: SlotDevice, prompts: Sequence[Prompt], n: int,
                 order: Sequence[Sequence[int]], refill_at: int, stats: Stats,
                 by_sample: bool = False):
        self.device, self.prompts, self.n = device, list(prompts), n
        self.refill_at, self.stats = refill_at, stats
        # the waiting requests, in order, group by group (cancelled ones are dropped at the
        # next admit)
        self.queue = [Request(i, j) for group in order for j in range(n) for i in group] \
            if by_sample else [Request(i, j) for group in order for i in group for j in range(n)]
        self.recut = False  # cancellations since the last admit
        self.by_sample = by_sample
        self.undecided = [0] * len(self.prompts)  # samples running or not yet seen by the caller
        self.held: list = [None] * device.slots  # the request each slot holds
        self.entry_of: dict[int, int] = {}  # prompt -> its store entry
        self.left = [0] * device.entries  # samples of an entry's prompt still waiting
        self.free_entries = collections.deque(range(device.entries))
        self.pending = [set(range(n)) for _ in self.prompts]  # samples waiting, per prompt
        self.cut = [n] * len(self.prompts)  # per prompt: samples from this index are cancelled
        self.waiting = len(self.queue)  # requests neither started nor cancelled
        self.dropping: set = set()  # slots whose running rows are cancelled
        self.stale: list = []  # freed slots whose rows the device still decodes

    def cancel(self, prompt: int, start: int) -> None:
        """Cancel samples `start`.. of `prompt` (between yields of `run`): waiting ones never
        start, running ones are freed at the next host check."""
        old = self.cut[prompt]
        if start >= old:
            return
        self.cut[prompt] = start
        self.recut = True
        dropped = {j for j in self.pending[prompt] if j >= start}
        self.pending[prompt] -= dropped
        self.waiting -= len(dropped)
        self.dropping.update(r for r, h in enumerate(self.held)
                             if h is not None and h.prompt == prompt and h.sample >= start)
        e = self.entry_of.get(prompt)
        if e is not None:
            self.left[e] = min(self.left[e], self.live(prompt))
            if not self.left[e]:
                self.close_entry(prompt)

    def live(self, prompt: int) -> int:
        """Waiting, uncancelled requests of `prompt`."""
        return len(self.pending[prompt])

    # -- the loop

    def run(self) -> Iterator[list[Finished]]:
        finished: list[Finished] = []
        while True:
            free = [r for r, h in enumerate(self.held) if h is None]
            while free and self.admit(free):
                pass
            stale = [r for r in self.stale if self.held[r] is None]
            if stale:
                self.device.release(stale)
            self.stale = []
            for slot, drawn in self.device.preempt().items():
                self.requeue(slot, drawn)
            if all(h is None for h in self.held):
                break
            handle = self.device.decode(self.min_exit())
            if finished:
                yield finished  # the caller works while the chunk runs
                for f in finished:
                    self.undecided[f.request.prompt] -= 1
            finished = self.finished_rows(self.device.read(handle))
        if finished:
            yield finished
        if self.waiting:  # the store always has room for the next prompt
            raise RuntimeError(f"sampler stalled with {self.waiting} requests waiting")

    def min_exit(self) -> int:
        """Slots that must finish before the host steps in: `refill_at` while requests wait
        (fewer when fewer wait), else every slot (more than there are: run to the end)."""
        return min(self.refill_at, self.waiting) if self.waiting else self.device.slots + 1

    def finished_rows(self, chunk: Chunk) -> list[Finished]:
        """Free the slots whose rows are done or cancelled; returns the done rows."""
        self.stats.decode_steps += chunk.steps
        self.stats.host_checks += 1
        rows = []
        for r in sorted(self.dropping):
            self.undecided[self.held[r].prompt] -= 1
            self.stats.drew(self.held[r].prompt, int(chunk.drawn[r]), "cancelled")
            self.held[r] = None
            if not chunk.done[r]:
                self.stale.append(r)
        self.dropping.clear()
        for r, request in enumerate(self.held):
            if request is not None and chunk.done[r]:
                num = int(chunk.drawn[r])
                rows.append(Finished(request, chunk.tokens[r, :num], bool(chunk.stopped[r]),
                                     None if chunk.logits is None else chunk.logits[r, :num]))
                self.stats.drew(request.prompt, num)
                self.held[r] = None
        return rows

    def requeue(self, slot: int, drawn: int) -> None:
        """Slot `slot`'s row was preempted: its request goes back to the head of the queue
        (its drawn tokens are thrown away)."""
        request, self.held[slot] = self.held[slot], None
        self.stats.drew(request.prompt, drawn, "preempted")
        self.undecided[request.prompt] -= 1
        if request.sample >= self.cut[request.prompt]:
            return  # cancelled meanwhile
        self.queue.insert(0, request)
        self.pending[request.prompt].add(request.sample)
        self.waiting += 1
        e = self.entry_of.get(request.prompt)
        if e is not None:
            self.left[e] += 1

    # -- starting requests

    def admit(self, free: list) -> bool:
        """Start waiting requests in free slots (prefilling the prompts they need first): the
        ready ones (`start_order`), or when none can start, the others; False when nothing
        could start."""
        if self.recut:
            self.queue = [r for r in self.queue if r.sample < self.cut[r.prompt]]
            self.recut = False
        ready, rest = self.start_order()
        return self.start(ready, free) or self.start(rest, free)

    def start(self, indices: list[int], free: list) -> bool:
        """Start the queue's requests at `indices`, in turn, while slots and entries last."""
        starts, need, taken = [], [], []
        for k in indices:
            if not free:
                break
            request = self.queue[k]
            opens = request.prompt not in self.entry_of
            if opens and not self.free_entries:
                continue  # (nor can its later samples: they need the same entry)
            slot = self.device.reserve(request.prompt, self.prompts[request.prompt], free)
            if slot is None:
                break  # no room (paged cache): it waits for running rows to end
            free.remove(slot)
            if opens:
                self.open_entry(request.prompt)
                need.append(request.prompt)
            starts.append(Start(slot, self.entry_of[request.prompt], request))
            self.left[self.entry_of[request.prompt]] -= 1
            self.pending[request.prompt].discard(request.sample)
            self.undecided[request.prompt] += 1
            self.waiting -= 1
            taken.append(k)
        if not starts:
            return False
        for k in sorted(taken, reverse=True):
            del self.queue[k]
        if need:
            need += self.spare_prefill_rows(need)
            for bucket in dict.fromkeys(self.prompts[i].bucket for i in need):
                group = [i for i in need if self.prompts[i].bucket == bucket]
                self.device.prefill([(self.entry_of[i], self.prompts[i]) for i in group])
                self.stats.prefills += 1
        self.device.insert(starts, self.prompts)
        for s in starts:
            self.held[s.slot] = s.request
            i = s.request.prompt  # an entry whose prompt has no sample waiting is free
            if self.left[s.entry] == 0 and self.entry_of.get(i) == s.entry:
                self.close_entry(i)
        self.stats.decode_steps += 1  # the step that drew the first tokens
        return True

    def start_order(self) -> tuple[list[int], list[int]]:
        """Queue indices of the requests ready to start, and of the rest: all are ready in
        prompt-major order; by sample, a prompt's lowest waiting sample is ready while none of
        its samples is undecided (the others start only so that slots do not idle)."""
        if not self.by_sample:
            return list(range(len(self.queue))), []
        ready, rest, seen = [], [], set()
        for k, r in enumerate(self.queue):
            (rest if self.undecided[r.prompt] or r.prompt in seen else ready).append(k)
            seen.add(r.prompt)
        return ready, rest

    def open_entry(self, prompt: int) -> None:
        self.entry_of[prompt] = e = self.free_entries.popleft()
        self.left[e] = self.live(prompt)

    def close_entry(self, prompt: int) -> None:
        self.free_entries.append(self.entry_of.pop(prompt))

    def spare_prefill_rows(self, need: list) -> list:
        """Prompts that come next in the queue, of the last needed prompt's bucket, to fill
        the rows of its prefill batch that would otherwise run empty."""
        bucket = self.prompts[need[-1]].bucket
        count = sum(self.prompts[i].bucket == bucket for i in need)
        sizes = self.device.prefill_sizes
        size = next(s for s in sizes if s >= min(count, self.device.entries))
        extra = []
        for request in self.queue:
            if not (self.free_entries and count < size):
                break
            i = request.prompt
            if i in self.entry_of:
                continue
            if self.prompts[i].bucket != bucket:
                break
            self.open_entry(i)
            extra.append(i)
            count += 1
        return extra
