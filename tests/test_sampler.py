"""Sampler: KV-cache decoding = full forward, greedy = HF generate, sampling distributions,
sharded = single device, batch-composition independence, bounded compilation, stops."""
import math

import jax
import numpy as np
import pytest

from tpt_jax.gemma import attention as A, model as M
from tpt_jax.engine import sampler as S
from tpt_jax.engine.device import prefill_sizes
from tpt_jax.engine.programs import TRACE_COUNT
from tpt_jax.engine.sampling import SamplingConfig, row_keys, sample_logits
from tpt_jax.gemma import weights
from tpt_jax.config import ConfigError, MeshConfig
from tpt_jax.gemma.config import model_preset
from tpt_jax.gemma.sharding import make_mesh
from conftest import make_hf_checkpoint

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=14)


@pytest.fixture(scope="module")
def tiny():
    """test-tiny (window 8) with random weights, big enough init that outputs vary."""
    cfg = model_preset("test-tiny")
    model = M.make_model(cfg)
    params = M.init_params(model, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
    return model, params


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.RandomState(seed)
    return [[2] + rng.randint(3, vocab, size=n - 1).tolist() for n in lengths]


def test_cache_decoding_matches_full_forward(tiny):
    """Every step's logits (prefill, shared over n=2 rows, then cached decode) equal a full
    forward over prompt + generated tokens; lengths run well past the window of 8."""
    model, params = tiny
    assert model.cfg.sliding_window == 8
    prompts = prompts_of([5, 11, 16], model.cfg.vocab_size)
    sampler = S.Sampler(model, params, rows=6, buckets=(16,), eos_id=None)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=14)
    res = sampler.generate(prompts, sampling, n=2, return_logits=True)
    seqs = [(p, g) for p, gens in zip(prompts, res) for g in gens]
    width = max(len(p) + len(g.tokens) for p, g in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros_like(tokens)
    for r, (p, g) in enumerate(seqs):  # right-padded: one full forward for every row
        tokens[r, :len(p) + len(g.tokens)] = p + g.tokens
        mask[r, :len(p) + len(g.tokens)] = 1
    full = np.asarray(M.forward(model, params, tokens, mask))
    for r, (p, g) in enumerate(seqs):
        want = full[r, len(p) - 1:len(p) - 1 + len(g.tokens)]
        assert g.logits.shape == want.shape and len(g.tokens) == 14
        np.testing.assert_allclose(g.logits, want, atol=2e-4, rtol=0)
    assert np.abs(res[2][0].logits).max() > 1.0
    # n samples of one prompt share the prefill: identical first-step logits, different tokens
    np.testing.assert_array_equal(res[0][0].logits[0], res[0][1].logits[0])
    assert res[0][0].tokens != res[0][1].tokens


@pytest.fixture(scope="module")
def hf_varied(tmp_path_factory):
    """A tiny random HF Gemma2 whose greedy continuations vary; window 6."""
    path = tmp_path_factory.mktemp("hf_varied")
    return str(path), make_hf_checkpoint(path, seed=0, embed_std=0.02)


def test_greedy_matches_hf_generate(hf_varied):
    """Token-for-token equality with transformers' greedy generate, 16 new tokens after
    prompts of 4-13 tokens: past the window of 6, through left padding in a shared batch."""
    import torch
    path, hf_model = hf_varied
    cfg = weights.read_hf_config(path)
    model = M.make_model(cfg)
    params = weights.load_hf(path, model)
    prompts = prompts_of([4, 9, 13], cfg.vocab_size, seed=1)
    sampler = S.Sampler(model, params, rows=4, max_prompt_tokens=16, eos_id=None)
    ours = sampler.generate(prompts, SamplingConfig(max_new_tokens=16))
    for p, gens in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16,
                                    do_sample=False, pad_token_id=0)
        ref = ref[0, len(p):].tolist()
        assert len(set(ref)) > 4, "degenerate reference output"
        assert gens[0].tokens == ref


# ----------------------------------------------------------------------------- distributions

CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
            9: 27.88, 10: 29.59, 11: 31.26}


def expected_probs(logits, t, top_k, top_p):
    z = logits / t
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, bool)
    keep[order[:top_k] if top_k else order] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        ps = p[order]
        before = np.cumsum(ps) - ps
        drop = order[before >= top_p]
        p[drop] = 0.0
        p /= p.sum()
    return p


@pytest.mark.parametrize("t,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.8),
                                           (0.8, 6, 0.9)])
def test_sampling_distribution(t, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.4, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 1.1], np.float32)
    draws = 40000
    keys = row_keys(jax.numpy.int32(7), np.zeros(draws, np.int32), np.arange(draws, dtype=np.int32))
    cfg = SamplingConfig(temperature=t, top_k=top_k, top_p=top_p)
    toks = np.asarray(jax.jit(lambda k: sample_logits(
        jax.numpy.broadcast_to(logits, (draws, logits.size)), k, cfg))(keys))
    counts = np.bincount(toks, minlength=logits.size)
    p = expected_probs(logits.astype(np.float64), t, top_k, top_p)
    support = p > 0
    assert counts[~support].sum() == 0, "sampled a token outside top-k/top-p"
    exp = p[support] * draws
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    assert chi2 < CHI2_999[int(support.sum()) - 1], (chi2, counts, exp)


def test_greedy_is_argmax():
    logits = np.random.RandomState(0).randn(5, 50).astype(np.float32)
    keys = row_keys(jax.numpy.int32(0), np.zeros(5, np.int32), np.arange(5, dtype=np.int32))
    got = sample_logits(logits, keys, SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


# ----------------------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def single_device_greedy(tiny):
    model, params = tiny
    prompts = prompts_of([3, 7, 12, 16, 9], model.cfg.vocab_size, seed=2)
    single = S.Sampler(model, params, rows=8, buckets=(16,), eos_id=None)
    return prompts, [[g.tokens for g in r] for r in single.generate(prompts, GREEDY, n=1)]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 1, 4)])
def test_sharded_greedy_equals_single_device(tiny, single_device_greedy, shape):
    model, params = tiny
    prompts, want = single_device_greedy
    mesh = make_mesh(MeshConfig(*shape))
    sharded = S.Sampler(model, params, mesh, rows=8, buckets=(16,), eos_id=None)
    assert len(sharded.device.params["blocks"][0]["attn"]["q"].sharding.device_set) == 8
    got = [[g.tokens for g in r] for r in sharded.generate(prompts, GREEDY, n=1)]
    assert got == want


# ----------------------------------------------------------------------------- determinism


def test_same_samples_regardless_of_batch(tiny):
    """(seed, id, sample) decides a sample: other rows, row counts, order and how n is split
    into batches do not matter."""
    model, params = tiny
    prompts = prompts_of([6, 10, 14, 8], model.cfg.vocab_size, seed=4)
    ids = ["a", "b", "c", "d"]
    sampling = SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=10)
    big = S.Sampler(model, params, rows=8, buckets=(16,), eos_id=None)
    small = S.Sampler(model, params, rows=2, buckets=(16,), eos_id=None)
    a = big.generate(prompts, sampling, n=4, ids=ids, seed=5)
    b = small.generate(prompts[::-1][:3], sampling, n=4, ids=ids[::-1][:3], seed=5)
    for i, j in [(3, 0), (2, 1), (1, 2)]:
        assert [g.tokens for g in a[i]] == [g.tokens for g in b[j]]
    assert len({tuple(g.tokens) for g in a[0]}) == 4  # the n samples differ
    c = big.generate(prompts, sampling, n=4, ids=ids, seed=6)
    assert [g.tokens for g in c[0]] != [g.tokens for g in a[0]]


def test_compilations_bounded(tiny):
    """A dataset with many prompt lengths compiles one decode program and one insert program,
    and per bucket at most one prefill per prefill size; never one per batch or per call."""
    model, params = tiny
    sampler = S.Sampler(model, params, rows=4, buckets=(8, 16), eos_id=None)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=4)
    before = dict(TRACE_COUNT)
    lengths = [3, 5, 8, 9, 12, 16, 4, 7, 15, 2, 11]
    sampler.generate(prompts_of(lengths, model.cfg.vocab_size), sampling, n=2)
    new = lambda: {k: v - before.get(k, 0) for k, v in TRACE_COUNT.items()}
    first = new()
    assert first["chunk"] == 1 and first["insert"] == 1
    assert 1 <= first["prefill"] <= 2 * len(prefill_sizes(4 // 2))
    sampler.generate(prompts_of(lengths[::-1] + [6, 13], model.cfg.vocab_size, seed=9), sampling,
                     n=2, max_new_tokens=[1, 2, 3, 4] * 3 + [2])
    assert new()["chunk"] == 1 and new()["insert"] == 1
    assert new()["prefill"] <= 2 * len(prefill_sizes(2))


def test_long_prompt_keeps_last_tokens(tiny):
    model, params = tiny
    sampler = S.Sampler(model, params, rows=2, buckets=(16,), eos_id=None)
    long, = prompts_of([30], model.cfg.vocab_size)
    a = sampler.generate([long], GREEDY)[0][0].tokens
    b = sampler.generate([long[-16:]], GREEDY)[0][0].tokens
    assert a == b


# ----------------------------------------------------------------------------- stops


def test_stops_at_eos_and_stop_sequences(tiny):
    """EOS ends a row before the EOS token (counted as drawn, not returned); a stop token
    sequence ends it after the sequence (kept: the host cuts stop strings)."""
    model, params = tiny
    prompts = prompts_of([6, 12], model.cfg.vocab_size, seed=3)
    free = S.Sampler(model, params, rows=2, buckets=(16,), eos_id=None)
    ref = [r[0].tokens for r in free.generate(prompts, GREEDY)]
    assert all(len(t) == GREEDY.max_new_tokens for t in ref)
    eos, seq = ref[0][4], ref[1][6:8]
    stopping = S.Sampler(model, params, rows=2, buckets=(16,), eos_id=eos, stop_tokens=[seq])
    res = [r[0] for r in stopping.generate(prompts, GREEDY)]

    def expected(toks):  # (returned tokens, tokens drawn) at the first EOS or stop sequence
        for i, t in enumerate(toks):
            if t == eos:
                return toks[:i], i + 1
            if i >= 1 and toks[i - 1:i + 1] == seq:
                return toks[:i + 1], i + 1
        raise AssertionError("no stop in the reference")

    for toks, r in zip(ref, res):
        want, drawn = expected(toks)
        assert (r.tokens, r.num_tokens, r.finish) == (want, drawn, "stop")
    assert res[0].tokens == ref[0][:ref[0].index(eos)]


def test_bucket_helpers():
    assert S.prompt_buckets(512) == (32, 64, 128, 256, 512)
    assert S.prompt_buckets(100) == (32, 64, 100)
    assert S.bucket_for(33, (32, 64)) == 64 and S.bucket_for(99, (32, 64)) == 64
    assert S.stable_hash("q1") == S.stable_hash("q1") != S.stable_hash("q2")
    assert math.isclose(SamplingConfig(top_p=0.5).top_p, 0.5)


# ----------------------------------------------------------------------------- continuous batching


def same(a, b):
    """Token-for-token equality of two [prompt][sample] Generation lists."""
    return [[(g.tokens, g.finish, g.num_tokens) for g in r] for r in a] == \
        [[(g.tokens, g.finish, g.num_tokens) for g in r] for r in b]


def stopping_sampler(tiny, rows, **kw):
    """test-tiny with an EOS and a 2-token stop sequence that its sampled rows do produce."""
    model, params = tiny
    return S.Sampler(model, params, rows=rows, buckets=(8, 16, 32), eos_id=(17, 201),
                     stop_tokens=[[40, 41], [99]], **kw)


@pytest.fixture(scope="module")
def ragged_reference(tiny):
    """Prompts of three buckets, ragged per-prompt limits, n=3 sampled; the static path."""
    model, _ = tiny
    rng = np.random.RandomState(11)
    lengths = [3, 30, 9, 17, 5, 12, 25, 8, 2, 14, 31, 6]
    prompts = prompts_of(lengths, model.cfg.vocab_size, seed=5)
    ids = [f"q{i}" for i in range(len(prompts))]
    limits = rng.randint(1, 21, size=len(prompts)).tolist()
    sampling = SamplingConfig(temperature=1.0, top_k=30, top_p=0.95, max_new_tokens=20)
    ref = stopping_sampler(tiny, 6).generate(prompts, sampling, n=3, ids=ids, seed=2,
                                             max_new_tokens=limits, static=True)
    return prompts, ids, limits, sampling, ref


def test_reference_covers_stops_and_limits(ragged_reference):
    *_, limits, _, ref = ragged_reference
    gens = [g for r in ref for g in r]
    assert any(g.finish == "stop" for g in gens) and any(g.finish == "length" for g in gens)
    assert any(g.finish == "stop" and g.num_tokens > len(g.tokens) for g in gens)  # EOS dropped
    assert all(g.num_tokens <= lim for r, lim in zip(ref, limits) for g in r)
    assert all(g.num_tokens == lim for r, lim in zip(ref, limits) for g in r if g.finish == "length")


@pytest.mark.parametrize("rows,refill_at", [(1, None), (5, 1), (7, 3), (40, None)])
def test_continuous_equals_static(tiny, ragged_reference, rows, refill_at):
    """Whatever the slot count (fewer than n, more than all rows), refill policy, bucket mix:
    the same tokens, finish reasons and token counts as the static path."""
    prompts, ids, limits, sampling, ref = ragged_reference
    sampler = stopping_sampler(tiny, rows, refill_at=refill_at)
    got = sampler.generate(prompts, sampling, n=3, ids=ids, seed=2, max_new_tokens=limits)
    assert same(got, ref)
    st = sampler.stats
    assert st.tokens == sum(g.num_tokens for r in ref for g in r) and st.prefills >= 1
    assert 0 < st.slot_utilization <= 1


def test_continuous_order_and_company_do_not_matter(tiny, ragged_reference):
    """Shuffled requests, a subset, and other prompts running alongside: same samples."""
    prompts, ids, limits, sampling, ref = ragged_reference
    order = np.random.RandomState(3).permutation(len(prompts))[:8]
    extra = prompts_of([7, 19], tiny[0].cfg.vocab_size, seed=8)
    got = stopping_sampler(tiny, 4).generate(
        [prompts[i] for i in order] + extra, sampling, n=3, ids=[ids[i] for i in order] + ["x", "y"],
        seed=2, max_new_tokens=[limits[i] for i in order] + [20, 20])
    assert same(got[:8], [ref[i] for i in order])


def test_continuous_greedy_and_n_above_slots(tiny):
    """Greedy, n=5 samples on 2 slots (one prompt entry refilled across waves): static tokens."""
    model, params = tiny
    prompts = prompts_of([4, 13, 9], model.cfg.vocab_size, seed=6)
    for sampling, n in [(GREEDY, 1), (SamplingConfig(temperature=0.9, max_new_tokens=9), 5)]:
        ref = stopping_sampler(tiny, 4).generate(prompts, sampling, n=n, seed=1, static=True)
        got = stopping_sampler(tiny, 2).generate(prompts, sampling, n=n, seed=1)
        assert same(got, ref)


def test_continuous_sharded(tiny, ragged_reference):
    """8 CPU devices (slots over data, heads over tensor): the single-device static tokens."""
    prompts, ids, limits, sampling, ref = ragged_reference
    model, params = tiny
    for shape in [(8, 1, 1), (2, 1, 4)]:
        mesh = make_mesh(MeshConfig(*shape))
        sampler = S.Sampler(model, params, mesh, rows=8, buckets=(8, 16, 32), eos_id=(17, 201),
                            stop_tokens=[[40, 41], [99]])
        got = sampler.generate(prompts, sampling, n=3, ids=ids, seed=2, max_new_tokens=limits)
        assert same(got, ref)


def test_long_cache_decoding_matches_full_forward(tiny):
    """A cache past model.LONG_CACHE (scored in blocks): continuous logits still equal a full
    forward, through many refills, and match the static path's tokens."""
    model, params = tiny
    new = A.LONG_CACHE + 20
    prompts = prompts_of([5, 12, 9], model.cfg.vocab_size, seed=7)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new)
    limits = [new, 37, new - 100]
    sampler = S.Sampler(model, params, rows=2, buckets=(16,), eos_id=None)
    assert sampler.cache_length(new) % A.CACHE_BLOCK == 0
    res = sampler.generate(prompts, sampling, n=1, max_new_tokens=limits, return_logits=True)
    ref = sampler.generate(prompts, sampling, n=1, max_new_tokens=limits, static=True)
    assert same(res, ref)
    for p, (g,), lim in zip(prompts, res, limits):
        assert g.num_tokens == lim and g.logits.shape == (lim, model.cfg.vocab_size)
        seq = np.asarray([p + g.tokens], np.int32)
        full = np.asarray(M.forward(model, params, seq))[0, len(p) - 1:len(p) - 1 + lim]
        np.testing.assert_allclose(g.logits, full, atol=3e-4, rtol=0)


def test_progress_counts_samples_as_they_finish(tiny):
    model, params = tiny
    calls = []
    sampler = S.Sampler(model, params, rows=4, buckets=(16,), eos_id=None, refill_at=1)
    prompts = prompts_of([5, 6, 7, 8, 9, 10], model.cfg.vocab_size)
    sampler.generate(prompts, SamplingConfig(max_new_tokens=12), n=2, progress=calls.append,
                     max_new_tokens=[2, 12, 3, 12, 4, 12])
    assert sum(calls) == 12 and len(calls) > 2


def test_bad_requests(tiny):
    model, params = tiny
    sampler = S.Sampler(model, params, rows=2, buckets=(16,), eos_id=None)
    assert sampler.generate([], GREEDY, n=3) == []
    assert sampler.generate([], GREEDY, static=True) == []
    with pytest.raises(ConfigError, match="max_new_tokens"):
        sampler.generate([[2, 5]], GREEDY, max_new_tokens=[GREEDY.max_new_tokens + 1])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        sampler.generate([[2, 5]], GREEDY, max_new_tokens=[0])
    with pytest.raises(ValueError, match="differ"):
        sampler.generate([[2, 5]], GREEDY, max_new_tokens=[1, 2])


@pytest.mark.parametrize("mesh_shape", [None, (2, 1, 4)])
def test_update_params_reuses_programs_and_buffers(tiny, mesh_shape):
    """One sampler, new weights: the same samples as a fresh sampler made with them, nothing
    compiled again, and no copy when the weights given are the ones already held."""
    model, params = tiny
    other = jax.tree.map(lambda x: x[::-1] if x.ndim > 1 else x, params)  # rows permuted
    mesh = None if mesh_shape is None else make_mesh(MeshConfig(*mesh_shape))
    prompts = prompts_of([5, 9, 12], model.cfg.vocab_size, seed=4)
    sampling = SamplingConfig(temperature=1.0, top_k=40, max_new_tokens=8)
    make = lambda p: S.Sampler(model, p, mesh, rows=4, buckets=(16,), eos_id=None)
    sampler = make(params)
    first = sampler.generate(prompts, sampling, n=2, seed=1)
    traces = dict(TRACE_COUNT)
    assert sampler.update_params(other) and sampler.layout_copies == 2
    swapped = sampler.generate(prompts, sampling, n=2, seed=1)
    assert dict(TRACE_COUNT) == traces  # the compiled programs serve the new weights
    assert same(swapped, make(other).generate(prompts, sampling, n=2, seed=1))
    assert not same(swapped, first)
    assert not sampler.update_params(other) and sampler.layout_copies == 2  # held: no copy
    assert sampler.update_params(params)
    assert same(sampler.generate(prompts, sampling, n=2, seed=1), first)


def test_sampler_without_weights_says_so(tiny):
    model, _ = tiny
    with pytest.raises(RuntimeError, match="update_params"):
        S.Sampler(model, rows=2, buckets=(16,)).generate([[2, 5]], GREEDY)
