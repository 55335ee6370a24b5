"""The host side of the paged KV cache: which pool pages each decode slot holds.

A row commits, when it is admitted, the pages it could need at its own limit (prompt bucket +
max new tokens), so a row that has started never waits for a page mid-chunk and no row is ever
preempted; it takes those pages from the free list only as it grows (before each chunk, the
pages the chunk can fill) and returns all of them when it ends. Rows whose commitment does not
fit wait for others to end (`reserve` says no and the scheduler keeps them queued).
"""
from __future__ import annotations

import numpy as np


def pages_for(columns: int, page: int) -> int:
    return -(-columns // page)


class PageTable:
    """Free list, per-slot pages and commitments for `slots` slots over a pool of `pages`
    pages of `page` columns; `table` [slots, max_pages] holds page ids, `pages` (one past the
    last id) where a slot holds none (writes there are dropped)."""

    def __init__(self, pages: int, page: int, slots: int, max_pages: int):
        self.pages, self.page = pages, page
        self.free = list(range(pages - 1, -1, -1))  # pop() takes the lowest id first
        self.table = np.full((slots, max_pages), pages, np.int32)
        self.held = [0] * slots  # pages each slot holds (its first table entries)
        self.committed = [0] * slots  # pages each slot may grow to
        self.reserved = 0  # committed by rows admitted but not yet in a slot
        self.peak = 0  # most pages held at once

    def cost(self, columns: int) -> int:
        return pages_for(columns, self.page)

    def reserve(self, columns: int) -> bool:
        """Commit pages for a row that may reach `columns` columns; False when they do not
        fit beside the rows already committed."""
        need = self.cost(columns)
        if sum(self.committed) + self.reserved + need > self.pages:
            return False
        self.reserved += need
        return True

    def assign(self, slot: int, columns: int) -> None:
        """Slot `slot` takes a reserved row that may reach `columns` columns."""
        self.release(slot)
        need = self.cost(columns)
        self.reserved -= need
        self.committed[slot] = need

    def grow(self, slot: int, columns: int) -> None:
        """Give slot `slot` pages for its first `columns` columns (within its commitment)."""
        need = min(self.cost(columns), self.committed[slot])
        while self.held[slot] < need:
            self.table[slot, self.held[slot]] = self.free.pop()
            self.held[slot] += 1
        self.peak = max(self.peak, self.pages - len(self.free))

    def release(self, slot: int) -> None:
        """Return slot `slot`'s pages and commitment."""
        self.free.extend(int(p) for p in self.table[slot, :self.held[slot]][::-1])
        self.table[slot] = self.pages
        self.held[slot] = self.committed[slot] = 0
