"""Influence selection: per-example gradients (vmap) equal a brute-force loop, the chunked
random projection equals its materialised matrix, and a planted helpful example outranks
planted harmful ones (sharded over 8 CPU devices)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_helpers import CharTokenizer, tiny_model
from tpt_jax.methods import influence as I
from tpt_jax.stages import sft_data
from tpt_jax.config import ConfigError, MeshConfig, PruneConfig, validate_prune
from tpt_jax.gemma.model import init_params
from tpt_jax.gemma.sharding import TRAIN_RULES, make_mesh

CFG = PruneConfig(strategy="first-correct+influence", influence_dim=64, influence_batch=8,
                  influence_fraction=0.25)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = init_params(model, jax.random.key(0), mesh, TRAIN_RULES)
    return model, params, mesh


def _batch(records, length=32):
    tok = CharTokenizer()
    enc = [sft_data.encode_example(tok, r["prompt"], r["completion"], 64)[0] for r in records]
    b = sft_data.build_batch([[i] for i in range(len(enc))], enc, len(enc), length)
    return {k: jnp.asarray(b[k]) for k in ("tokens", "positions", "targets", "weights")}


def test_subset_paths(tiny):
    model, params, _ = tiny
    params = jax.device_get(params)
    paths = I.chosen_paths(params, ["layers/*/mlp", "layers/global/attn/o"])
    assert paths == ["layers/global/attn/o", "layers/global/mlp/down", "layers/global/mlp/gate",
                     "layers/global/mlp/up", "layers/local/mlp/down", "layers/local/mlp/gate",
                     "layers/local/mlp/up"]
    sub = I.take_subset(params, paths, -1)
    assert sub["layers/global/mlp/up"].shape == (64, 128)  # one pair, not the stack
    merged = I.merge_subset(params, sub, -1)
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    with pytest.raises(Exception, match="selects no parameter"):
        I.chosen_paths(params, ["nope"])


def test_per_example_grads_match_a_loop(tiny):
    """vmap(grad) rows == jax.grad of each example alone (and of the whole-model grad's last
    pair, so the subset really is the last pair)."""
    model, params, _ = tiny
    params = jax.device_get(params)
    recs = [{"prompt": f"Q{i}:abc=", "completion": "xyz"[: i + 1]} for i in range(3)]
    batch = _batch(recs)
    paths = I.chosen_paths(params, ["layers/global/mlp", "layers/local/attn/q"])
    got = jax.jit(lambda p, b: I.per_example_grads(model, p, b, paths, -1))(params, batch)
    full_grad = jax.jit(jax.grad(lambda p, ex: I.example_loss(model, p, ex)))
    for i in range(3):
        flat = I.leaf_paths(full_grad(params, {k: v[i] for k, v in batch.items()}))
        for p in paths:
            np.testing.assert_allclose(got[p][i], flat[p][-1], rtol=2e-4, atol=1e-6)
    # the projection is the materialised Rademacher matrix
    g = np.asarray(got[paths[0]]).reshape(3, -1)
    R = I.projection_matrix(g.shape[1], 0, 16, seed=5)
    assert set(np.unique(np.abs(R * 4))) == {1.0}
    project = jax.jit(I.project_leaf, static_argnums=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(project(jnp.asarray(g), 0, 16, 5)), g @ R,
                               rtol=1e-4, atol=1e-6)
    big = np.random.default_rng(0).normal(size=(2, 3 * I._CHUNK + 5)).astype(np.float32)
    R = I.projection_matrix(big.shape[1], 2, 8, seed=1)  # several generated blocks
    np.testing.assert_allclose(np.asarray(project(jnp.asarray(big), 2, 8, 1)), big @ R,
                               rtol=1e-4, atol=1e-4)


def test_planted_helpful_example_ranks_first(tiny):
    """Targets teach 'A -> B'. The helpful candidate is the same mapping in another prompt;
    harmful ones map A to contradicting answers; the scores must put helpful first, and the
    sharded (8-device) embedding must equal the single-device one."""
    model, params, mesh = tiny
    targets = [{"id": f"t{i}", "prompt": p, "completion": "B"}
               for i, p in enumerate(["A->", "A=>", "A:", "A ->"])]
    cands = [{"id": "harm1", "prompt": "A=", "completion": "C"},
             {"id": "help", "prompt": "A=", "completion": "B"},
             {"id": "harm2", "prompt": "A=", "completion": "Z"},
             {"id": "harm3", "prompt": "A=", "completion": "q"}]
    kept, scores = I.select_by_influence(params, model, CharTokenizer(), cands, targets, CFG, mesh,
                                         max_length=32)
    assert [r["id"] for r in kept] == ["help"]  # 25% of 4
    assert scores[1] > max(scores[0], scores[2], scores[3]) + 0.1, scores
    single = I.embed_examples(jax.device_get(params), model, CharTokenizer(), cands, CFG, None,
                              max_length=32)
    sharded = I.embed_examples(params, model, CharTokenizer(), cands, CFG, mesh, max_length=32)
    np.testing.assert_allclose(sharded, single, rtol=1e-3, atol=1e-5)


def test_round_step_updates_stats(tiny):
    model, params, mesh = tiny
    kept = [{"id": f"q{i}", "sample": 0, "source": "m", "prompt": "A=", "completion": c}
            for i, c in enumerate("BCDE")]
    stats = {"counts": {"kept": 4, "dropped": {}}, "by_source": {"m": {"kept": 4}}}
    pool = [{"id": "s0", "prompt": "A->", "completion": "B"}]
    sel, stats, rows = I.apply_to_round(params, model, CharTokenizer(), kept, stats, pool,
                                        dataclasses.replace(CFG, influence_fraction=0.5), mesh,
                                        max_length=32)
    assert len(sel) == 2 and stats["counts"]["kept"] == 2
    assert stats["counts"]["dropped"]["influence"] == 2 and stats["by_source"]["m"]["kept"] == 2
    assert [r["kept"] for r in rows].count(True) == 2 and rows[0]["kept"]  # 'B' is among them
    assert I.top_fraction(np.array([0.1, 0.9, 0.9, 0.2]), 0.5) == [1, 2]


def test_config_checks():
    validate_prune(CFG)
    for bad in (dict(influence_fraction=0.0), dict(influence_dim=0), dict(influence_params=[])):
        with pytest.raises(ConfigError):
            validate_prune(dataclasses.replace(CFG, **bad))
