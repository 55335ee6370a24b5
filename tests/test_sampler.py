"""Sampler: KV-cache decoding = full forward, greedy = HF generate, sampling distributions,
sharded = single device, batch-composition independence, bounded compilation, stops."""
import math

import jax
import numpy as np
import pytest

from tpt_jax.gemma import model as M
from tpt_jax.stages import sampler as S
from tpt_jax.gemma import weights
from tpt_jax.config import MeshConfig
from tpt_jax.gemma.config import model_preset
from tpt_jax.gemma.sharding import make_mesh
from conftest import make_hf_checkpoint

GREEDY = S.SamplingConfig(temperature=0.0, max_new_tokens=14)


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
    sampling = S.SamplingConfig(temperature=1.0, max_new_tokens=14)
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
    ours = sampler.generate(prompts, S.SamplingConfig(max_new_tokens=16))
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
    keys = S.row_keys(jax.numpy.int32(7), np.zeros(draws, np.int32), np.arange(draws, dtype=np.int32))
    cfg = S.SamplingConfig(temperature=t, top_k=top_k, top_p=top_p)
    toks = np.asarray(jax.jit(lambda k: S.sample_logits(
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
    keys = S.row_keys(jax.numpy.int32(0), np.zeros(5, np.int32), np.arange(5, dtype=np.int32))
    got = S.sample_logits(logits, keys, S.SamplingConfig(temperature=0.0))
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
    assert len(sharded.params["blocks"][0]["attn"]["q"].sharding.device_set) == 8
    got = [[g.tokens for g in r] for r in sharded.generate(prompts, GREEDY, n=1)]
    assert got == want


# ----------------------------------------------------------------------------- determinism


def test_same_samples_regardless_of_batch(tiny):
    """(seed, id, sample) decides a sample: other rows, row counts, order and how n is split
    into batches do not matter."""
    model, params = tiny
    prompts = prompts_of([6, 10, 14, 8], model.cfg.vocab_size, seed=4)
    ids = ["a", "b", "c", "d"]
    sampling = S.SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=10)
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
    """A dataset with many prompt lengths compiles one program per bucket, not per batch."""
    model, params = tiny
    sampler = S.Sampler(model, params, rows=4, buckets=(8, 16), eos_id=None)
    sampling = S.SamplingConfig(temperature=0.8, max_new_tokens=4)
    before = S.TRACE_COUNT["generate"]
    lengths = [3, 5, 8, 9, 12, 16, 4, 7, 15, 2, 11]
    sampler.generate(prompts_of(lengths, model.cfg.vocab_size), sampling, n=2)
    assert S.TRACE_COUNT["generate"] - before == 2
    sampler.generate(prompts_of(lengths[::-1] + [6, 13], model.cfg.vocab_size, seed=9), sampling, n=2)
    assert S.TRACE_COUNT["generate"] - before == 2


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
    assert math.isclose(S.SamplingConfig(top_p=0.5).top_p, 0.5)
