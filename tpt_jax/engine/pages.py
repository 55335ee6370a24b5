"""The host side of the paged KV cache: which pool pages each decode slot holds.

Rows take pages as they grow and give them back when they end; nothing is set aside for a
row's limit, so a pool holds as many rows as their live lengths allow (`device.Device` admits a
row while its first pages and the running rows' next pages fit, and preempts the newest row
when the running ones outgrow the pool). A prompt's full pages are shared by its samples
(reference-counted, written once); each sample copies only the prompt's last partial page.
"""
from __future__ import annotations

import numpy as np


def pages_for(columns: int, page: int) -> int:
    return -(-columns // page)


class PageTable:
    """Free list, reference counts and per-slot pages for `slots` slots over a pool of
    `pages` pages of `page` columns; `table` [slots, max_pages] holds page ids, `pages` (one
    past the last id) where a slot holds none (writes there are dropped)."""

    def __init__(self, pages: int, page: int, slots: int, max_pages: int):
        self.pages, self.page = pages, page
        self.free = list(range(pages - 1, -1, -1))  # pop() takes the lowest id first
        self.refs = np.zeros(pages, np.int32)  # slots holding each page
        self.table = np.full((slots, max_pages), pages, np.int32)
        self.held = [0] * slots  # pages each slot holds (its first table entries)
        self.prompt_of: list = [None] * slots  # the prompt key whose pages a slot shares
        self.shared: dict = {}  # prompt key -> its full pages, while some slot holds them
        self.reserved = 0  # pages set aside for rows admitted but not yet started
        self.reserving: set = set()  # prompt keys whose full pages `reserved` counts
        self.peak = 0  # most pages in use at once

    @property
    def used(self) -> int:
        return self.pages - len(self.free)

    def cost(self, columns: int) -> int:
        return pages_for(columns, self.page)

    def reserve(self, key, prompt_len: int, columns: int, headroom: int) -> bool:
        """Set aside the pages a new row of prompt `key` takes for its first `columns`
        columns (its prompt's full pages only if no slot shares them yet), beside `headroom`
        pages the running rows need next; False when they do not fit."""
        need = self.cost(columns)
        if key in self.shared or key in self.reserving:
            need -= prompt_len // self.page
        if self.used + self.reserved + headroom + need > self.pages:
            return False
        self.reserved += need
        self.reserving.add(key)
        return True

    def start(self, slot: int, key, prompt_len: int) -> list[int]:
        """Slot `slot` starts a row of prompt `key`: it shares the prompt's full pages (taking
        them if no slot holds them) and takes its own for the rest of the prompt. Returns the
        page id to write each prompt page to (`pages`, i.e. dropped, for shared pages already
        written)."""
        self.release(slot)
        full = prompt_len // self.page
        own = self.shared.get(key) if full else None
        if own is not None:
            for p in own:
                self.refs[p] += 1
            write = [self.pages] * full
        else:
            own = [self._take() for _ in range(full)]
            write = list(own)
            if full:
                self.shared[key] = own
        self.table[slot, :full] = own
        self.held[slot], self.prompt_of[slot] = full, key
        self.grow(slot, prompt_len)
        return write + self.table[slot, full:self.held[slot]].tolist()

    def end_admission(self) -> None:
        """The admitted rows have started: their reservation is spent."""
        self.reserved = 0
        self.reserving.clear()

    def growth(self, slot: int, columns: int) -> int:
        """Pages slot `slot` lacks for its first `columns` columns."""
        return max(0, self.cost(columns) - self.held[slot])

    def grow(self, slot: int, columns: int) -> None:
        """Give slot `slot` pages for its first `columns` columns."""
        while self.held[slot] < self.cost(columns):
            self.table[slot, self.held[slot]] = self._take()
            self.held[slot] += 1
        self.peak = max(self.peak, self.used)

    def release(self, slot: int) -> None:
        """Slot `slot` gives back its pages (a shared page returns when no slot holds it)."""
        for p in self.table[slot, :self.held[slot]][::-1].tolist():
            self.refs[p] -= 1
            if not self.refs[p]:
                self.free.append(p)
        key = self.prompt_of[slot]
        if key in self.shared and not self.refs[self.shared[key][0]]:
            del self.shared[key]
        self.table[slot] = self.pages
        self.held[slot], self.prompt_of[slot] = 0, None

    def _take(self) -> int:
        if not self.free:
            raise RuntimeError("the page pool ran out (the device's plan should prevent this)")
        p = self.free.pop()
        self.refs[p] = 1
        return p
