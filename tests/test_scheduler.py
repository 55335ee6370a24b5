"""The host scheduler against a fake device (no JAX): every request runs exactly once, in queue
order, only in a free slot, from a store entry that holds its prompt; results come back as
they finish. The fake checks the contract on every call."""
import numpy as np
from hypothesis import given, settings, strategies as st

from tpt_jax.engine.contract import DRAWN, Chunk, Prompt, Request, Stats
from tpt_jax.engine.device import prefill_sizes
from tpt_jax.engine.scheduler import Scheduler


def length_of(prompt: int, sample: int, limit: int) -> int:
    """The fake's trace length: ragged, deterministic, at most the prompt's limit."""
    return 1 + (prompt * 7 + sample * 3) % limit


class FakeDevice:
    """A `SlotDevice` that decodes one token a step per live slot, checking what it is told."""

    def __init__(self, slots: int, n: int, max_new: int, to_limit: bool = False,
                 preempting=None):
        self.slots, self.n, self.max_new, self.to_limit = slots, n, max_new, to_limit
        self.preempting = preempting  # None, or a list of bools: preempt at each call?
        self.preempted: list = []  # requests preempted, in turn
        self.entries = max(1, slots // min(n, slots))
        self.prefill_sizes = prefill_sizes(self.entries)
        self.store: dict[int, int] = {}  # entry -> prompt it holds
        self.rows: list = [None] * slots  # (request, length, drawn) per slot
        self.start_order: list = []  # requests by their last start
        self.first_starts: list = []  # requests by their first start
        self.prefill_calls = 0
        self.prefilled: list = []  # prompts, once per prefill
        self.cancelled: set = set()  # requests the test cancelled
        self.freed: set = set()  # slots of cancelled rows the last read freed

    def reserve(self, index, prompt, free):
        """A free slot, not always the first (a paged device picks the group with room)."""
        assert free
        return free[len(free) // 2]

    def preempt(self):
        """While `preempting` says so, the newest running row gives its slot back."""
        running = [k for k, r in enumerate(self.rows) if r is not None and r[2] < r[1]]
        if not (self.preempting and self.preempting.pop() and len(running) > 1):
            return {}
        k = max(running, key=lambda k: self.start_order.index(self.rows[k][0]))
        self.preempted.append(self.rows[k][0])
        drawn, self.rows[k] = self.rows[k][2], None
        return {k: drawn}

    def prefill(self, batch):
        assert 1 <= len(batch) <= self.entries and len({p.bucket for _, p in batch}) == 1
        for entry, prompt in batch:
            self.store[entry] = prompt.id_hash
            self.prefilled.append(prompt.id_hash)
        self.prefill_calls += 1

    def insert(self, starts, prompts):
        assert len({s.slot for s in starts}) == len(starts)
        for s in starts:
            assert self.rows[s.slot] is None or s.slot in self.freed, f"slot {s.slot} is busy"
            self.freed.discard(s.slot)
            assert s.request not in self.cancelled, "a cancelled request started"
            p = prompts[s.request.prompt]
            assert self.store.get(s.entry) == p.id_hash, "entry does not hold the prompt"
            length = p.limit if self.to_limit else length_of(s.request.prompt,
                                                              s.request.sample, p.limit)
            self.rows[s.slot] = [s.request, length, 1]  # the first token drawn
            if s.request in self.start_order:
                self.start_order.remove(s.request)  # started again after a preemption
            else:
                self.first_starts.append(s.request)
            self.start_order.append(s.request)

    def release(self, slots):
        for k in slots:
            assert k in self.freed, f"slot {k} released but not cancelled"
            self.freed.discard(k)
            self.rows[k] = None

    def decode(self, min_exit):
        assert not self.freed, "a cancelled row is still decoded after the host check"
        steps, finished = 0, 0
        live = lambda: [r for r in self.rows if r is not None and r[2] < r[1]]
        while live() and finished < min_exit and steps < 256:
            for r in live():
                r[2] += 1
                finished += r[2] == r[1]
            steps += 1
        return steps

    def read(self, steps):
        done = np.array([r is not None and r[2] >= r[1] for r in self.rows])
        drawn = np.array([0 if r is None else r[2] for r in self.rows])
        tokens = np.zeros((self.slots, self.max_new), np.int32)
        for k, r in enumerate(self.rows):
            if r is not None:
                tokens[k, :r[2]] = 1000 * r[0].prompt + r[0].sample
        for k in np.flatnonzero(done):
            self.rows[k] = None
        self.freed = {k for k, r in enumerate(self.rows) if r is not None and
                      r[0] in self.cancelled}
        return Chunk(steps, done, drawn, np.zeros(self.slots, bool), tokens)


def run(slots, n, limits, buckets, refill_at, order=None, to_limit=False, preempting=None):
    prompts = [Prompt((2, 3), b, i, lim) for i, (b, lim) in enumerate(zip(buckets, limits))]
    device = FakeDevice(slots, n, max(limits), to_limit, preempting)
    order = [list(range(len(prompts)))] if order is None else order
    stats = Stats(slots=slots)
    batches = list(Scheduler(device, prompts, n, order, refill_at, stats).run())
    return device, stats, batches


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 9), n=st.integers(1, 5), refill_at=st.integers(1, 9),
       rows=st.lists(st.tuples(st.sampled_from([8, 16, 32]), st.integers(1, 12)), min_size=1,
                     max_size=14))
def test_every_request_once_in_order(slots, n, refill_at, rows):
    buckets, limits = zip(*rows)
    device, stats, batches = run(slots, n, limits, buckets, refill_at)
    got = [f for batch in batches for f in batch]
    want = {(i, j) for i in range(len(rows)) for j in range(n)}
    assert sorted((f.request.prompt, f.request.sample) for f in got) == sorted(want)
    for f in got:  # each result is its own request's tokens, as many as the fake drew
        assert len(f.tokens) == length_of(f.request.prompt, f.request.sample,
                                          limits[f.request.prompt])
        assert set(f.tokens.tolist()) == {1000 * f.request.prompt + f.request.sample}
    queue = [(i, j) for i in range(len(rows)) for j in range(n)]
    assert [(r.prompt, r.sample) for r in device.start_order] == queue  # queue order
    assert stats.tokens == sum(len(f.tokens) for f in got)
    assert stats.prefills == device.prefill_calls <= len(rows)
    assert 0 < stats.slot_utilization <= 1 and all(batches)


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(2, 9), n=st.integers(1, 5), refill_at=st.integers(1, 9),
       rows=st.lists(st.tuples(st.sampled_from([8, 16, 32]), st.integers(1, 12)), min_size=1,
                     max_size=14),
       preempting=st.lists(st.booleans(), min_size=1, max_size=60))
def test_preempted_rows_start_again(slots, n, refill_at, rows, preempting):
    """Rows the device preempts go back to the queue and start again from scratch: every
    request still finishes exactly once with all its tokens (none from before it was
    preempted), from an entry holding its prompt, and the thrown-away tokens are counted."""
    buckets, limits = zip(*rows)
    device, stats, batches = run(slots, n, limits, buckets, refill_at, preempting=preempting)
    got = [f for batch in batches for f in batch]
    assert sorted((f.request.prompt, f.request.sample) for f in got) == sorted(
        (i, j) for i in range(len(rows)) for j in range(n))
    for f in got:
        assert len(f.tokens) == length_of(f.request.prompt, f.request.sample,
                                          limits[f.request.prompt])
    assert stats.preempted == len(device.preempted)
    assert stats.tokens == sum(len(f.tokens) for f in got) + stats.preempted_tokens


def cut_into_groups(count: int, cuts: list) -> list:
    """Prompts 0..count-1 in consecutive groups, cut at `cuts` (empty groups included)."""
    bounds = [0, *sorted(min(c, count) for c in cuts), count]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(2, 9), n=st.integers(1, 4), refill_at=st.integers(1, 9),
       rows=st.lists(st.tuples(st.sampled_from([8, 16, 32]), st.integers(1, 12)), min_size=1,
                     max_size=14),
       cuts=st.lists(st.integers(0, 14), max_size=4),
       preempting=st.one_of(st.none(), st.lists(st.booleans(), max_size=40)))
def test_groups_start_in_turn(slots, n, refill_at, rows, cuts, preempting):
    """Prompts in groups: every request of a group first starts before any of the next
    group's, the next group fills slots while the previous one's rows still run, and the
    per-prompt counts (`Stats.drawn`) split the call's: a group's tokens are its results'
    plus its preempted rows'."""
    buckets, limits = zip(*rows)
    groups = cut_into_groups(len(rows), cuts)
    device, stats, batches = run(slots, n, limits, buckets, refill_at, order=groups,
                                 preempting=preempting)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    firsts = [group_of[r.prompt] for r in device.first_starts]
    assert firsts == sorted(firsts) and len(firsts) == len(rows) * n
    got = [f for batch in batches for f in batch]
    for members in groups:
        drawn = stats.drawn(members)
        assert drawn["tokens"] == drawn["preempted_tokens"] + sum(
            len(f.tokens) for f in got if f.request.prompt in members)
    assert stats.drawn(range(len(rows))) == {k: getattr(stats, k) for k in DRAWN}


def test_the_next_group_fills_the_slots_a_group_leaves():
    """One long row and three short ones a group, two slots: the second group starts while
    the first group's long row runs, so the call takes fewer steps than a call a group."""
    limits, cut = [12, 2, 2, 2] * 2, [4]
    _, together, _ = run(2, 1, limits, [8] * 8, 1, order=cut_into_groups(8, cut),
                         to_limit=True)
    apart = [run(2, 1, limits[:4], [8] * 4, 1, to_limit=True)[1] for _ in range(2)]
    assert together.decode_steps < sum(s.decode_steps for s in apart)
    assert together.tokens == sum(s.tokens for s in apart)


def test_a_preempted_row_waits_at_the_head():
    """A preempted request starts again before the requests that never started."""
    device, stats, _ = run(2, 1, [12] * 4, [8] * 4, refill_at=1, to_limit=True,
                           preempting=[False, True])
    assert device.preempted == [Request(1, 0)] and stats.preempted == 1
    assert stats.preempted_tokens == 1
    assert [r.prompt for r in device.start_order] == [0, 1, 2, 3]


def test_slots_refill_before_all_finish():
    """With refill_at=1 a slot whose row ends takes the next request while its neighbour
    still runs: fewer decode steps than running the rows two by two."""
    limits = [2, 12, 2, 12, 2, 12]
    _, eager, batches = run(2, 1, limits, [8] * 6, refill_at=1, to_limit=True)
    _, lazy, _ = run(2, 1, limits, [8] * 6, refill_at=2, to_limit=True)
    assert eager.decode_steps < lazy.decode_steps
    assert eager.host_checks > lazy.host_checks
    assert len(batches) > 1


def test_given_order_is_the_start_order():
    device, _, _ = run(3, 2, [5, 5, 5, 5], [8, 16, 8, 32], refill_at=1, order=[[3, 1, 0, 2]])
    assert [r.prompt for r in device.start_order] == [3, 3, 1, 1, 0, 0, 2, 2]



def run_cancelling(slots, n, limits, refill_at, needed, preempting=None, groups=None):
    """Sample-major with early stop: prompt i needs needed[i] samples; like the Sampler, the
    caller cancels the rest once samples 0..needed[i]-1 have all finished. `groups`: the
    order's groups (default: one)."""
    prompts = [Prompt((2, 3), 8, i, lim) for i, lim in enumerate(limits)]
    device = FakeDevice(slots, n, max(limits), preempting=preempting)
    device.entries, device.prefill_sizes = 2 * slots, prefill_sizes(2 * slots)  # Device.begin
    stats = Stats(slots=slots)
    groups = [list(range(len(prompts)))] if groups is None else groups
    scheduler = Scheduler(device, prompts, n, groups, refill_at, stats, by_sample=True)
    have, got = [set() for _ in prompts], []
    for batch in scheduler.run():
        for f in batch:
            i, j = f.request.prompt, f.request.sample
            got.append((i, j))
            have[i].add(j)
            if j < needed[i] and have[i] >= set(range(needed[i])):
                device.cancelled |= {Request(i, k) for k in range(needed[i], n)}
                scheduler.cancel(i, needed[i])
    return device, stats, got


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 9), n=st.integers(1, 5), refill_at=st.integers(1, 9),
       limits=st.lists(st.integers(1, 12), min_size=1, max_size=14), data=st.data())
def test_cancelled_samples_stop(slots, n, refill_at, limits, data):
    """Every needed sample finishes once; a cancelled one never starts after its cancellation
    and its running row stops at the next host check (the fake checks both); starts are
    sample-major; every token drawn is counted; the same with rows preempted at random."""
    needed = data.draw(st.lists(st.integers(1, n), min_size=len(limits), max_size=len(limits)))
    preempting = data.draw(st.one_of(st.none(), st.lists(st.booleans(), max_size=40)))
    groups = cut_into_groups(len(limits), data.draw(st.lists(st.integers(0, 14), max_size=3)))
    device, stats, got = run_cancelling(slots, n, limits, refill_at, needed, preempting,
                                        groups)
    kept = [(i, j) for i, j in got if j < needed[i]]
    assert sorted(kept) == sorted((i, j) for i in range(len(limits)) for j in range(needed[i]))
    for i in range(len(limits)):  # a prompt's samples start in order (first starts)
        started = [r.sample for r in device.first_starts if r.prompt == i]
        assert started == list(range(len(started)))
    drawn = sum(length_of(i, j, limits[i]) for i, j in got)
    assert stats.tokens == drawn + stats.cancelled_tokens + stats.preempted_tokens
    for members in groups:  # and group by group
        part = stats.drawn(members)
        assert part["tokens"] == part["cancelled_tokens"] + part["preempted_tokens"] + sum(
            length_of(i, j, limits[i]) for i, j in got if i in members)


def test_early_stop_runs_sample_major_within_a_group():
    """Four groups of two prompts, two samples each, one slot: a group's samples all start
    before the next group's (sample-major over every prompt would start every first sample
    before most second ones)."""
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    device, _, got = run_cancelling(1, 2, [4] * 8, 1, [2] * 8, groups=groups)
    assert len(got) == 16
    assert [r.prompt // 2 for r in device.first_starts] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_early_stop_draws_only_what_is_needed():
    """Half the prompts need only their first sample: sample-major order, with a prompt's
    next sample waiting until its earlier ones are decided while other prompts can start,
    draws exactly the needed samples here, and prefills each prompt once."""
    limits, n = [12] * 16, 4
    needed = [1 if i % 2 else n for i in range(16)]
    device, stopped, got = run_cancelling(4, n, limits, 2, needed)
    _, full, _ = run(4, n, limits, [8] * 16, 2)
    assert sorted(device.prefilled) == list(range(16))
    assert len(got) == sum(needed) and stopped.cancelled == 0
    assert stopped.tokens == sum(length_of(i, j, 12) for i, j in got) < 0.7 * full.tokens
