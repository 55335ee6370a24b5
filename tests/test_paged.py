"""The paged KV cache (attention='paged'): the dense cache is the reference. Tokens, finish
reasons and counts are identical on ragged work (per-prompt limits, EOS and stop sequences at
different steps), through a pool too small for every slot (rows wait, or are preempted and
start again), with a prompt's pages shared by its samples, on 8 devices, with
early stop and new weights; a corrupted page table is caught; bad settings are one-line
errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpt_jax.config import ConfigError, MeshConfig
from tpt_jax.engine import paged
from tpt_jax.engine import sampler as S
from tpt_jax.engine.pages import PageTable
from tpt_jax.engine.sampling import SamplingConfig
from tpt_jax.gemma import model as M
from tpt_jax.gemma.config import model_preset
from tpt_jax.gemma.sharding import make_mesh

SAMPLED = SamplingConfig(temperature=1.0, top_k=30, top_p=0.95, max_new_tokens=20)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=20)


@pytest.fixture(scope="module")
def tiny():
    """test-tiny (window 8) with random weights large enough that outputs vary."""
    model = M.make_model(model_preset("test-tiny"))
    params = M.init_params(model, jax.random.key(3))
    return model, jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)


def sampler(tiny, attention, rows=5, mesh=None, **kw):
    """An EOS and a 2-token stop sequence that the tiny model's rows do produce; prompt
    buckets 8/16/32, pages of 4 columns."""
    model, params = tiny
    if attention != "dense":
        kw.setdefault("page_size", 4)
    return S.Sampler(model, params, mesh, rows=rows, buckets=(8, 16, 32), eos_id=(17, 201),
                     stop_tokens=[[40, 41], [99]], attention=attention, **kw)


@pytest.fixture(scope="module")
def work(tiny):
    """12 prompts over three buckets with ragged limits (1..20), n=3."""
    rng = np.random.RandomState(11)
    lengths = [3, 30, 9, 17, 5, 12, 25, 8, 2, 14, 31, 6]
    prompts = [[2] + rng.randint(3, tiny[0].cfg.vocab_size, size=n - 1).tolist()
               for n in lengths]
    ids = [f"q{i}" for i in range(len(prompts))]
    return prompts, ids, rng.randint(1, 21, size=len(prompts)).tolist()


def run(s, work, sampling, **kw):
    prompts, ids, limits = work
    return s.generate(prompts, sampling, n=3, ids=ids, seed=2, max_new_tokens=limits, **kw)


def tokens(res):
    return [[(g.tokens, g.finish, g.num_tokens) for g in r] for r in res]


@pytest.fixture(scope="module")
def dense(tiny, work):
    return {name: run(sampler(tiny, "dense"), work, sc, return_logits=True)
            for name, sc in (("sampled", SAMPLED), ("greedy", GREEDY))}


def test_reference_is_ragged(dense):
    gens = [g for r in dense["sampled"] for g in r]
    assert {g.finish for g in gens} == {"stop", "length"}
    assert len({g.num_tokens for g in gens}) > 5


@pytest.mark.parametrize("name", ["sampled", "greedy"])
def test_paged_equals_dense(tiny, work, dense, name):
    """Same tokens; the logits of every step equal up to float rounding."""
    s = sampler(tiny, "paged")
    got = run(s, work, SAMPLED if name == "sampled" else GREEDY, return_logits=True)
    assert tokens(got) == tokens(dense[name])
    for r, w in zip(got, dense[name]):
        for a, b in zip(r, w):
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    assert s.device.kv_bytes() > 0 and s.device.table is None  # the pool is held, pages freed


def check_pages(table: PageTable) -> None:
    """In each group of slots: every page of its pool is free or held, never both; its count
    of holders is right; slots share a page only with slots of the same prompt."""
    for g in range(table.shards):
        holders: dict = {}
        for r in range(g * table.per, (g + 1) * table.per):
            for p in table.table[r, :table.held[r]].tolist():
                holders.setdefault(p, []).append(table.prompt_of[r])
        assert not set(table.free[g]) & set(holders)
        assert sorted(table.free[g] + list(holders)) == list(range(table.pages))
        for p, keys in holders.items():
            assert table.refs[g, p] == len(keys) and len(set(keys)) == 1


def run_spied(s, work, sampling, **kw):
    """`run`, checking the page table whenever a row grows; -> (results, pages in use,
    most slots holding one page)."""
    used, shared = [], []
    grow = PageTable.grow

    def spy(table, slot, columns):
        grow(table, slot, columns)
        check_pages(table)
        used.append(table.used)
        shared.append(int(table.refs.max()))

    mp = pytest.MonkeyPatch()
    mp.setattr(PageTable, "grow", spy)
    try:
        return run(s, work, sampling, **kw), used, shared
    finally:
        mp.undo()


def test_tight_pool_rows_wait(tiny, work, dense):
    """A pool of 30 pages (two rows at their longest, not five slots): rows wait for pages,
    the pages in use never exceed the pool, a prompt's samples share its full pages, and the
    tokens stay."""
    s = sampler(tiny, "paged")
    s.device.pages = 30
    got, used, shared = run_spied(s, work, SAMPLED)
    assert tokens(got) == tokens(dense["sampled"])
    assert 0 < max(used) <= 30 and max(shared) > 1
    roomy = sampler(tiny, "paged")
    run(roomy, work, SAMPLED)
    assert s.stats.decode_steps > roomy.stats.decode_steps  # rows waited


@pytest.mark.parametrize("name", ["sampled", "greedy"])
def test_preempted_rows_give_the_same_tokens(tiny, work, dense, name, monkeypatch):
    """Rows admitted with room for 4 more steps only, in a pool of 16 pages: running rows
    outgrow it, the newest are preempted and start again from scratch, and every sample's
    tokens are still the dense cache's."""
    from tpt_jax.engine import device as D
    monkeypatch.setattr(D, "MIN_STEPS", 4)
    monkeypatch.setattr(D, "PREEMPT_BELOW", 4)
    s = sampler(tiny, "paged")
    s.device.pages = 16
    got, used, _ = run_spied(s, work, SAMPLED if name == "sampled" else GREEDY)
    assert tokens(got) == tokens(dense[name])
    assert s.stats.preempted > 0 and s.stats.preempted_tokens > 0 and max(used) <= 16
    assert s.stats.tokens == (sum(g.num_tokens for r in got for g in r)
                              + s.stats.preempted_tokens)


def test_broken_page_table_is_caught(tiny, work, dense, monkeypatch):
    """Live rows of different prompts sharing pages on the device must change tokens: the
    comparison can fail."""
    from tpt_jax.engine.device import Device
    make = Device._chunk_cache

    def shared(device, cut=None):
        cache, steps = make(device, cut)
        t = cache.table
        return cache.replace(table=jnp.where(t < device.table.pages, jnp.minimum(t, 3), t)), steps

    monkeypatch.setattr(Device, "_chunk_cache", shared)
    assert tokens(run(sampler(tiny, "paged"), work, SAMPLED)) != tokens(dense["sampled"])


@pytest.mark.parametrize("shape,shards", [((8, 1, 1), 8), ((2, 1, 4), 2), ((2, 2, 2), 4)])
def test_paged_sharded(tiny, work, dense, shape, shards):
    """8 CPU devices, the slots split over the data axes (heads over tensor): the pool's
    pages are split with them (each device holds only its slots' pages, page ids within
    it), a prompt's samples share its pages on one device, and the tokens are the
    single-device dense cache's."""
    s = sampler(tiny, "paged", rows=8, mesh=make_mesh(MeshConfig(*shape)))
    assert s.shards == shards
    got, used, shared = run_spied(s, work, SAMPLED)
    assert tokens(got) == tokens(dense["sampled"])
    # a prompt's samples start where its pages are, and share them (not with one slot a group)
    assert max(shared) > 1 or shards == 8
    pool = s.device._bufs["pool"][1][0][0]  # layer 0's keys [K, pages, page, H]
    assert {x.data.shape[1] for x in pool.addressable_shards} == {pool.shape[1] // shards}
    assert s.device.kv_bytes(("pool",), one_device=True) * shards <= s.device.kv_bytes(("pool",))


def test_kernel_on_a_split_pool(tiny, work, dense):
    """The Pallas GPU kernel (interpreted) on each device's own pages, the pool split 2 ways
    and heads 4 ways: the dense greedy tokens. (The TPU kernel's interpreter takes minutes
    here; it passed the same check on a smaller workload by hand.)"""
    s = sampler(tiny, "pallas", rows=8, mesh=make_mesh(MeshConfig(2, 1, 4)), interpret="gpu")
    assert tokens(run(s, work, GREEDY)) == tokens(dense["greedy"])


def test_tight_sharded_pool(tiny, work, dense, monkeypatch):
    """A pool split over 4 devices, each group of 2 slots with 16 pages (one row at its
    longest and a little more), rows admitted with room for 4 more steps only: rows wait for
    their group's pages or are preempted, no group ever holds more than its pages, and the
    tokens stay."""
    from tpt_jax.engine import device as D
    monkeypatch.setattr(D, "MIN_STEPS", 4)
    monkeypatch.setattr(D, "PREEMPT_BELOW", 4)
    s = sampler(tiny, "paged", rows=8, mesh=make_mesh(MeshConfig(4, 1, 2)))
    s.device.pages = 64
    groups = []
    grow = PageTable.grow

    def spy(table, slot, columns):
        grow(table, slot, columns)
        check_pages(table)
        groups.append([table.pages - len(f) for f in table.free])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PageTable, "grow", spy)
        got = run(s, work, SAMPLED)
    assert tokens(got) == tokens(dense["sampled"])
    assert max(max(g) for g in groups) <= 16 and len(groups[0]) == 4
    assert s.stats.preempted > 0


def test_auto_is_paged_on_accelerators(monkeypatch):
    """'auto': paged on an accelerator (the pool split like the slots), dense on CPU; the
    slots split over the data axes where they divide."""
    assert S.row_shards(None, 8) == 1
    assert S.row_shards(make_mesh(MeshConfig(8, 1, 1)), 8) == 8
    assert S.row_shards(make_mesh(MeshConfig(2, 1, 4)), 8) == 2
    assert S.row_shards(make_mesh(MeshConfig(1, 8, 1)), 8) == 8  # fsdp splits rows too
    assert S.row_shards(make_mesh(MeshConfig(8, 1, 1)), 5) == 1  # 5 rows do not split
    assert S.resolve_attention("auto") == "dense"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert S.resolve_attention("auto") == "paged"
    assert S.resolve_attention("paged") == "paged"


def test_paged_early_stop_and_new_weights(tiny, work):
    """Early stop (samples cancelled while running) and update_params: as the dense cache."""
    model, params = tiny
    other = jax.tree.map(lambda x: x * 1.1, params)
    out = []
    for attention in ("dense", "paged"):
        seen: dict = {}

        def need(i, j, g):  # enough once a stopped sample is among the finished first ones
            seen.setdefault(i, {})[j] = g.finish
            m = 0
            while m in seen[i]:
                m += 1
            return m if "stop" in [seen[i][k] for k in range(m)] else None

        s = sampler(tiny, attention, rows=16)  # more slots than prompts: running rows cancelled
        first, cancelled = tokens(run(s, work, SAMPLED, samples_needed=need)), s.stats.cancelled
        s.update_params(other)
        out.append((first, cancelled, tokens(run(s, work, SAMPLED))))
    assert out[0][0] == out[1][0] and out[0][1] == out[1][1] > 0
    assert out[0][2] == out[1][2]


def test_long_rows_cross_page_buckets(tiny):
    """Rows of 300 and 170 tokens: the longer is read at the whole width (80 pages), the
    other through page tables cut to 32 then 48 pages as it grows (the dense cache scores
    its 320 columns in blocks, short cuts in one matmul): the tokens stay."""
    model, params = tiny
    prompts = [[2, 5, 9], [2] + list(range(3, 14))]
    sc = SamplingConfig(temperature=1.0, max_new_tokens=300)
    kw = dict(rows=2, buckets=(16,), eos_id=None)
    want = S.Sampler(model, params, **kw).generate(prompts, sc, n=1, max_new_tokens=[300, 170])
    s = S.Sampler(model, params, attention="paged", page_size=4, **kw)
    cuts = []
    make = type(s.device)._chunk_cache

    def spy(device, cut=None):
        c = make(device, cut)
        cuts.append((c[0].short, tuple(c[0].long_rows.tolist())))
        return c

    mp = pytest.MonkeyPatch()
    mp.setattr(type(s.device), "_chunk_cache", spy)
    try:
        got = s.generate(prompts, sc, n=1, max_new_tokens=[300, 170])
    finally:
        mp.undo()
    assert tokens(got) == tokens(want)
    assert s.device.page_buckets(80) == (16, 32, 48, 80)
    # the longer row is read at the whole width; the other's pages grow through the buckets
    assert {32, 48} <= {c for c, _ in cuts} and (48, (0,)) in cuts


def test_bad_settings(tiny):
    with pytest.raises(ConfigError, match="page size 24 does not divide the cache's blocks"):
        sampler(tiny, "paged", page_size=24)
    with pytest.raises(ConfigError, match="attention 'pallas' runs JAX's Pallas paged-attention "
                                          "kernel .GPU or TPU., and this backend is cpu"):
        sampler(tiny, "pallas")
    with pytest.raises(ConfigError, match="interpret must be one of gpu, tpu, got 'cuda'"):
        sampler(tiny, "pallas", interpret="cuda")
    with pytest.raises(ConfigError, match="attention must be one of"):
        sampler(tiny, "flash")
    with pytest.raises(ConfigError, match="kv_cache_gb sizes the paged cache"):
        sampler(tiny, "dense", kv_cache_gb=1.0)
    s = sampler(tiny, "paged", kv_cache_gb=1e-5)
    with pytest.raises(ConfigError, match="holds 2 pages of 4 tokens, but one row at its "
                                          "longest .32 prompt \\+ 20 new tokens. needs 13"):
        s.generate([[2, 3]], SAMPLED)


def test_pool_from_a_share_of_free_memory(tiny, work, dense, monkeypatch):
    """kv_cache_share sizes the pool from the devices' free memory when the sampler first
    samples, keeps it for later calls, and gives the dense tokens; too small a share, a dense
    cache, both budgets and a backend that does not report memory are one-line errors."""
    with pytest.raises(ConfigError, match="needs a backend that reports its free memory .* cpu"):
        sampler(tiny, "paged", kv_cache_share=0.5)
    free = [0.00024]  # GB: 240,000 bytes; half of it holds 14 pages, one row at its longest 13
    monkeypatch.setattr(S, "free_memory_gb", lambda mesh=None: free[0])
    s = sampler(tiny, "paged", kv_cache_share=0.5)
    assert s.device.pages is None  # not measured before the first call
    got = run(s, work, SAMPLED)
    page = paged.pool_bytes(tiny[0].cfg, 1, 4, tiny[0].dtype)
    assert s.device.pages == int(0.5 * 240_000 // page) < 5 * 13
    assert tokens(got) == tokens(dense["sampled"])
    free[0] = 1.0  # freed memory later does not resize the pool
    run(s, work, SAMPLED)
    assert s.device.pages == int(0.5 * 240_000 // page)
    free[0] = 0.00024
    with pytest.raises(ConfigError, match="kv_cache_share=0.01 of 0.00 GB free holds 0 pages"):
        sampler(tiny, "paged", kv_cache_share=0.01).generate([[2, 3]], SAMPLED)
    for kw, match in ((dict(kv_cache_share=1.0), r"must be in \(0, 1\), got 1.0"),
                      (dict(kv_cache_share=0.5, kv_cache_gb=1.0), "set one")):
        with pytest.raises(ConfigError, match=match):
            sampler(tiny, "paged", **kw)
    with pytest.raises(ConfigError, match="the cache here is dense"):
        sampler(tiny, "dense", kv_cache_share=0.5)


def test_pallas_gpu_kernel_interpreted(tiny, work, dense, monkeypatch):
    """JAX's Pallas GPU paged-attention kernel, interpreted on CPU, on the global layers (the
    window of 8 bites on local ones, which take the plain path): f32 throughout, so the dense
    tokens, logits within float rounding."""
    got, calls = kernel_run(tiny, work, SAMPLED, "gpu", monkeypatch)
    assert tokens(got) == tokens(dense["sampled"])
    for r, w in zip(got, dense["sampled"]):
        for a, b in zip(r, w):
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    assert calls and set(calls) == {"gpu-interpret"}  # traced, interpreted


def test_pallas_tpu_kernel_interpreted(tiny, work, dense, monkeypatch):
    """JAX's Pallas TPU paged-attention kernel, interpreted on CPU: the interpreter rounds
    matmul operands to bf16 as the TPU's matrix unit does, so the check is bf16's: every
    sampled step up to a sample's first different token has logits within 1% of the step's
    largest (a length off by one moves them by up to 15-32%), and most samples are the dense
    ones."""
    got, calls = kernel_run(tiny, work, SAMPLED, "tpu", monkeypatch)
    assert calls and set(calls) == {"tpu-interpret"}
    same = 0
    for r, w in zip(got, dense["sampled"]):
        for a, b in zip(r, w):
            same += a.tokens == b.tokens
            first = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y),
                         len(b.tokens) - 1)
            want = np.asarray(b.logits)[:first + 1]
            err = np.abs(np.asarray(a.logits)[:first + 1] - want).max(axis=-1)
            assert (err <= 0.01 * np.abs(want).max(axis=-1)).all()
    assert same >= 0.8 * len(work[0]) * 3  # most samples never meet a near-tie


def kernel_run(tiny, work, sampling, platform, monkeypatch):
    """The work sampled with `platform`'s kernel interpreted, and the kernels traced."""
    calls = []
    kernel = paged.kernel_attention
    monkeypatch.setattr(paged, "kernel_attention",
                        lambda *a: calls.append(a[-1]) or kernel(*a))
    got = run(sampler(tiny, "pallas", interpret=platform), work, sampling, return_logits=True)
    return got, calls


@pytest.mark.parametrize("preset", ["test-llama-tiny", "test-qwen-tiny"])
def test_paged_equals_dense_for_other_families(work, preset):
    """Llama (untied head, no window: every layer global) and Qwen2 (q/k/v biases) read the
    same tokens out of pages as out of the dense cache."""
    model = M.make_model(model_preset(preset))
    params = M.init_params(model, jax.random.key(5))
    fam = (model, jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params))
    prompts, ids, limits = work
    prompts = [[t % model.cfg.vocab_size for t in p] for p in prompts]
    got = {a: run(sampler(fam, a), (prompts, ids, limits), SAMPLED) for a in ("dense", "paged")}
    assert tokens(got["paged"]) == tokens(got["dense"])
    assert len({g.num_tokens for r in got["dense"] for g in r}) > 3
