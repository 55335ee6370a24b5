"""What the host scheduler and the device side say to each other: plain, typed values.

The scheduler (`scheduler.Scheduler`) decides which request each decode slot holds and when to
prefill, insert and decode; the device side (`device.Device`, or a fake in the tests) owns the
weights, caches and compiled programs and implements `SlotDevice`. Nothing else passes
between them, so a paged cache or a kernel changes the device side alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt of a generate call: its ids (already cut to `bucket`), the prompt bucket it
    is compiled for, the hash of its question id (its randomness), its token limit and the
    index of its first sample (a later call continues a question's samples from there)."""

    tokens: tuple
    bucket: int
    id_hash: int
    limit: int
    first_sample: int = 0


@dataclasses.dataclass(frozen=True)
class Request:
    """Sample `sample` of prompt `prompt` (an index into the call's prompts)."""

    prompt: int
    sample: int


@dataclasses.dataclass(frozen=True)
class Start:
    """Slot `slot` starts `request` from prompt-store entry `entry`."""

    slot: int
    entry: int
    request: Request


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What the host reads after a chunk of decode steps (every array has one row per slot):
    steps run, which slots are done, tokens drawn so far (EOS included), which stopped (EOS or
    a stop sequence, not the limit), the drawn ids [slots, max_new] and, for tests, every
    step's logits [slots, max_new, V]."""

    steps: int
    done: np.ndarray
    drawn: np.ndarray
    stopped: np.ndarray
    tokens: np.ndarray
    logits: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """One finished sample: the ids drawn (EOS included) and whether it stopped on its own."""

    request: Request
    tokens: np.ndarray
    stopped: bool
    logits: Optional[np.ndarray] = None


DRAWN = ("tokens", "cancelled", "cancelled_tokens", "preempted", "preempted_tokens")


@dataclasses.dataclass
class Stats:
    """One generate call: decode slots, decode steps (each steps every slot), tokens drawn
    (cancelled and discarded samples' included: the compute spent), prefill calls, host checks
    (a round trip each), samples cancelled after they started or discarded after they
    finished, and rows preempted (paged cache full; started again), with the tokens they
    drew. The `DRAWN` counts are also kept per prompt (`drawn`), for a caller that writes
    groups of prompts apart."""

    slots: int
    static: bool = False
    decode_steps: int = 0
    tokens: int = 0
    prefills: int = 0
    host_checks: int = 0
    cancelled: int = 0
    cancelled_tokens: int = 0
    preempted: int = 0
    preempted_tokens: int = 0
    by_prompt: dict = dataclasses.field(default_factory=dict, repr=False)

    def drew(self, prompt: int, tokens: int, dropped: str = "") -> None:
        """A row of `prompt` ended having drawn `tokens`; `dropped` ("cancelled" or
        "preempted") when they were thrown away."""
        self._count(prompt, "tokens", tokens)
        if dropped:
            self.drop(prompt, tokens, dropped)

    def drop(self, prompt: int, tokens: int, why: str) -> None:
        """`tokens` already counted as drawn were thrown away: `why` is "cancelled" or
        "preempted"."""
        self._count(prompt, why, 1)
        self._count(prompt, why + "_tokens", tokens)

    def _count(self, prompt: int, key: str, value: int) -> None:
        setattr(self, key, getattr(self, key) + value)
        per = self.by_prompt.setdefault(prompt, dict.fromkeys(DRAWN, 0))
        per[key] += value

    def drawn(self, prompts=None) -> dict:
        """The `DRAWN` counts of these prompts' rows (None: all of them)."""
        if prompts is None:
            return {key: getattr(self, key) for key in DRAWN}
        per = [self.by_prompt[i] for i in prompts if i in self.by_prompt]
        return {key: sum(p[key] for p in per) for key in DRAWN}

    @property
    def slot_utilization(self) -> float:
        """The share of slot-steps that drew a token."""
        return round(self.tokens / max(self.slots * self.decode_steps, 1), 4)

    @property
    def sampled_tokens(self) -> int:
        """Tokens drawn less those preempted rows threw away: what budget mode spends and a
        round's Think tokens count, so they do not depend on the KV pool's size."""
        return self.tokens - self.preempted_tokens


class SlotDevice(Protocol):
    """The device side of continuous batching, as the scheduler sees it."""

    slots: int  # decode slots
    entries: int  # prompt-store entries
    prefill_sizes: tuple  # prompt counts a prefill is compiled for, ascending (last = entries)

    def reserve(self, index: int, prompt: Prompt, free: list[int]) -> Optional[int]:
        """The slot, one of the `free` ones, a row of prompt `index` may start in now (its
        cache room is then set aside for the `insert` that follows); None: it waits for
        running rows to end."""

    def preempt(self) -> dict[int, int]:
        """Running rows that must give their cache room back for the others to go on (they
        are marked done): {slot: tokens it had drawn}. The scheduler starts them again from
        scratch (a row's tokens depend only on its seed, question and sample)."""

    def prefill(self, batch: list[tuple[int, Prompt]]) -> None:
        """Prefill prompts of one bucket into their store entries: (entry, prompt) pairs."""

    def insert(self, starts: list[Start], prompts: list[Prompt]) -> None:
        """Start requests in free slots from their prompts' entries (draws their first token)."""

    def decode(self, min_exit: int) -> Any:
        """Dispatch decode steps until `min_exit` slots have finished (or all are done, or a
        step cap); returns a handle for `read`, so the host can work while it runs."""

    def read(self, handle: Any) -> Chunk:
        """Wait for a dispatched chunk and read it back."""

    def release(self, slots: list[int]) -> None:
        """Mark running rows done (their samples were cancelled), so a chunk stops decoding
        them."""
