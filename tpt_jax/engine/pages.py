"""The host side of the paged KV cache: which pool pages each decode slot holds.

Rows take pages as they grow and give them back when they end; nothing is set aside for a
row's limit, so a pool holds as many rows as their live lengths allow (`device.Device` admits a
row while its first pages and the running rows' next pages fit, and preempts the newest row
when the running ones outgrow the pool). A prompt's full pages are shared by its samples
(reference-counted, written once); each sample copies only the prompt's last partial page.

Where the decode slots are split over several devices (`shards`), so is the pool: the slots
form `shards` equal groups in order, each group has its own pool of `pages` pages on its own
device, and a slot's page ids are ids within its group's pool (its device reads them without
asking the others). A prompt's pages are shared within a group.
"""
from __future__ import annotations

import numpy as np


def pages_for(columns: int, page: int) -> int:
    return -(-columns // page)


class PageTable:
    """Free lists, reference counts and per-slot pages for `slots` slots in `shards` groups,
    each group over its own pool of `pages` pages of `page` columns; `table` [slots,
    max_pages] holds page ids within the slot's group, `pages` (one past the last id) where a
    slot holds none (writes there are dropped)."""

    def __init__(self, pages: int, page: int, slots: int, max_pages: int, shards: int = 1):
        if slots % shards:
            raise ValueError(f"{slots} slots do not split into {shards} groups")
        self.pages, self.page, self.shards = pages, page, shards
        self.per = slots // shards  # slots a group
        # pop() takes the lowest id first
        self.free = [list(range(pages - 1, -1, -1)) for _ in range(shards)]
        self.refs = np.zeros((shards, pages), np.int32)  # slots holding each page
        self.table = np.full((slots, max_pages), pages, np.int32)
        self.held = [0] * slots  # pages each slot holds (its first table entries)
        self.prompt_of: list = [None] * slots  # the prompt key whose pages a slot shares
        self.shared: dict = {}  # (group, prompt key) -> its full pages, while a slot holds them
        self.reserved = [0] * shards  # pages set aside for rows admitted but not yet started
        self.reserving: set = set()  # (group, prompt key) whose full pages `reserved` counts
        self.peak = 0  # most pages in use at once, all groups together

    def shard(self, slot: int) -> int:
        return slot // self.per

    @property
    def used(self) -> int:
        return self.shards * self.pages - sum(map(len, self.free))

    def room(self, shard: int) -> int:
        """Pages of group `shard` neither in use nor set aside."""
        return len(self.free[shard]) - self.reserved[shard]

    def cost(self, columns: int) -> int:
        return pages_for(columns, self.page)

    def reserve(self, key, prompt_len: int, columns: int, headroom: int, shard: int = 0) -> bool:
        """Set aside in group `shard` the pages a new row of prompt `key` takes for its first
        `columns` columns (its prompt's full pages only if no slot of the group shares them
        yet), beside `headroom` pages the group's running rows need next; False when they do
        not fit."""
        need = self.cost(columns)
        if self.holds(key, shard):
            need -= prompt_len // self.page
        if headroom + need > self.room(shard):
            return False
        self.reserved[shard] += need
        self.reserving.add((shard, key))
        return True

    def holds(self, key, shard: int) -> bool:
        """Whether group `shard` has (or has set aside) prompt `key`'s full pages."""
        return (shard, key) in self.shared or (shard, key) in self.reserving

    def start(self, slot: int, key, prompt_len: int) -> list[int]:
        """Slot `slot` starts a row of prompt `key`: it shares the prompt's full pages (taking
        them if no slot of its group holds them) and takes its own for the rest of the prompt.
        Returns the page id to write each prompt page to (`pages`, i.e. dropped, for shared
        pages already written)."""
        self.release(slot)
        g = self.shard(slot)
        full = prompt_len // self.page
        own = self.shared.get((g, key)) if full else None
        if own is not None:
            for p in own:
                self.refs[g, p] += 1
            write = [self.pages] * full
        else:
            own = [self._take(g) for _ in range(full)]
            write = list(own)
            if full:
                self.shared[g, key] = own
        self.table[slot, :full] = own
        self.held[slot], self.prompt_of[slot] = full, key
        self.grow(slot, prompt_len)
        return write + self.table[slot, full:self.held[slot]].tolist()

    def end_admission(self) -> None:
        """The admitted rows have started: their reservation is spent."""
        self.reserved = [0] * self.shards
        self.reserving.clear()

    def growth(self, slot: int, columns: int) -> int:
        """Pages slot `slot` lacks for its first `columns` columns."""
        return max(0, self.cost(columns) - self.held[slot])

    def grow(self, slot: int, columns: int) -> None:
        """Give slot `slot` pages for its first `columns` columns."""
        while self.held[slot] < self.cost(columns):
            self.table[slot, self.held[slot]] = self._take(self.shard(slot))
            self.held[slot] += 1
        self.peak = max(self.peak, self.used)

    def release(self, slot: int) -> None:
        """Slot `slot` gives back its pages (a shared page returns when no slot holds it)."""
        g = self.shard(slot)
        for p in self.table[slot, :self.held[slot]][::-1].tolist():
            self.refs[g, p] -= 1
            if not self.refs[g, p]:
                self.free[g].append(p)
        key = (g, self.prompt_of[slot])
        if key in self.shared and not self.refs[g, self.shared[key][0]]:
            del self.shared[key]
        self.table[slot] = self.pages
        self.held[slot], self.prompt_of[slot] = 0, None

    def _take(self, shard: int) -> int:
        if not self.free[shard]:
            raise RuntimeError("the page pool ran out (the device's plan should prevent this)")
        p = self.free[shard].pop()
        self.refs[shard, p] = 1
        return p
