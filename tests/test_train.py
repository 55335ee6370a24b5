"""SFT: loss masking, chunked cross-entropy, packing, memorisation, sharded == single device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_helpers import CharTokenizer, make_examples, run_from_json, tiny_model
from tpt_jax.stages import sft_data
from tpt_jax.config import ConfigError, MeshConfig, RunConfig, TptError, TrainConfig, validate_run
from tpt_jax.stages.loss import chunked_cross_entropy, num_chunks, plain_cross_entropy
from tpt_jax.gemma.model import dense, init_params
from tpt_jax.gemma.sharding import TRAIN_RULES, make_mesh
from tpt_jax.stages.train_step import Stepper, check_batch, learning_rate, schedule_args

TOK = CharTokenizer()


def one_device_mesh():
    return make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def loss_of(stepper, params, batch):
    """Token-weighted mean loss of a numpy batch through the compiled eval step."""
    s, w = stepper.eval_sums(params, batch)
    return float(s) / float(w)


# ----------------------------------------------------------------------------- data


def test_encoding_trains_on_completion_and_eos_only():
    enc, truncated = sft_data.encode_example(TOK, "ab=", "xyz", max_length=64)
    assert not truncated
    assert enc.tokens.tolist() == [TOK.bos_id] + TOK.encode("ab=") + TOK.encode("xyz") + [TOK.eos_id]
    assert enc.trained.tolist() == [False] * 4 + [True] * 4
    b = sft_data.build_batch([[0]], [enc], rows=2, length=10)
    # targets[t] = token t+1; trained exactly where that token is completion or EOS
    assert b["targets"][0, :7].tolist() == enc.tokens[1:].tolist()
    assert b["weights"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert b["positions"][0].tolist() == list(range(8)) + [-1, -1]
    assert b["weights"][1].sum() == 0 and (b["positions"][1] == -1).all()
    c = sft_data.build_batch([[0]], [enc], rows=2, length=10, loss_bucket=3)
    assert c["loss_pos"].shape == (2, 6) and c["loss_pos"][0, :4].tolist() == [3, 4, 5, 6]
    assert c["targets"][0, :4].tolist() == enc.tokens[4:].tolist()
    assert c["weights"].tolist() == [[1, 1, 1, 1, 0, 0], [0] * 6]


def test_truncation_is_counted_and_prompt_only_examples_dropped():
    recs = [{"id": "a", "prompt": "p" * 5, "completion": "c" * 20},
            {"id": "b", "prompt": "p" * 30, "completion": "c"},
            {"id": "c", "prompt": "p", "completion": "c"}]
    enc, stats = sft_data.encode_examples(TOK, recs, max_length=12)
    assert (stats.examples, stats.truncated, stats.no_target) == (2, 2, 1)
    assert all(len(e.tokens) <= 12 for e in enc)
    with pytest.raises(TptError, match="prompt"):
        sft_data.encode_examples(TOK, [{"id": "x", "completion": "c"}], 12)


def test_packing_rows_and_segments():
    enc, _ = sft_data.encode_examples(TOK, make_examples(6), 32)
    lengths = sft_data.lengths_of(enc)
    rows = sft_data.rows_for(range(6), lengths, pack=True, max_length=32)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows) and len(rows) < 6
    b = sft_data.build_batch(rows, enc, len(rows), 32)
    for r, row in enumerate(rows):  # positions restart at each segment
        starts = np.flatnonzero(b["positions"][r] == 0)
        assert len(starts) == len(row) and (b["segments"][r][starts] == np.arange(1, len(row) + 1)).all()


def test_plan_covers_each_epoch_once_in_a_seeded_order():
    lengths = np.full(10, 5)
    orders = [sft_data.epoch_order(10, 3, e) for e in range(2)]
    plan = sft_data.make_plan(orders, lengths, 4, False, 16, 1.5)
    assert len(plan) == 3 + 2  # 3 batches (4, 4, 2 rows) + half of the second epoch's 3
    first = [i for b in plan[:3] for r in b for i in r]
    assert sorted(first) == list(range(10)) and first == orders[0].tolist()
    assert not np.array_equal(orders[0], orders[1])


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("vocab,chunk", [(96, 16), (97, 16)])  # divisible; prime (padded)
def test_chunked_cross_entropy_matches_plain(vocab, chunk):
    cfg = tiny_model().cfg
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (2, 5, 16)) * 3
    emb = jax.random.normal(k[1], (vocab, 16))
    targets = jax.random.randint(k[2], (2, 5), 0, vocab)
    w = jnp.arange(10.0).reshape(2, 5)
    assert num_chunks(vocab, chunk) > 1

    def total(fn):
        return jax.jit(lambda h, e: jnp.sum(fn(h, e) * w))

    chunked = total(lambda h, e: chunked_cross_entropy(h, e, targets, cfg, chunk))
    plain = total(lambda h, e: plain_cross_entropy(h, e, targets, cfg))
    np.testing.assert_allclose(chunked(hidden, emb), plain(hidden, emb), rtol=1e-6)
    gc = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, emb)
    gp = jax.jit(jax.grad(plain, argnums=(0, 1)))(hidden, emb)
    for a, b in zip(gc, gp):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    # and the reference is the textbook formula on the model's own logits
    from tpt_jax.gemma.model import logits_from_hidden
    logits = logits_from_hidden(emb, hidden, cfg)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(plain_cross_entropy(hidden, emb, targets, cfg), ref, rtol=1e-5)


def test_dense_gradient_is_autodiff_of_matmul():
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    w = jax.random.normal(jax.random.key(2), (8, 5))
    f = lambda fn: jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(f(dense), f(lambda x, w: x @ w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_setup():
    model = tiny_model()
    mesh = one_device_mesh()
    params = init_params(model, jax.random.key(0), mesh, TRAIN_RULES)
    enc, _ = sft_data.encode_examples(TOK, make_examples(8), 32)
    return model, mesh, params, enc


def test_prompt_targets_do_not_change_the_loss(tiny_setup):
    model, mesh, params, enc = tiny_setup
    stepper = Stepper.get(model, TrainConfig(batch_size=8, max_length=32), mesh)
    batch = sft_data.build_batch([[i] for i in range(8)], enc, 8, 32)
    base = loss_of(stepper, params, batch)
    prompt = np.argwhere((batch["weights"] == 0) & (batch["positions"] >= 0))
    changed = {k: v.copy() for k, v in batch.items()}
    for r, t in prompt:
        changed["targets"][r, t] = (changed["targets"][r, t] + 7) % 256
    assert loss_of(stepper, params, changed) == base
    r, t = np.argwhere(batch["weights"] > 0)[0]
    changed["targets"][r, t] = (changed["targets"][r, t] + 7) % 256
    assert loss_of(stepper, params, changed) != base
    # compacted targets (only trained positions reach the vocabulary projection): same loss
    compact = sft_data.build_batch([[i] for i in range(8)], enc, 8, 32, loss_bucket=4)
    assert compact["targets"].shape[1] < 32
    np.testing.assert_allclose(loss_of(stepper, params, compact), base, rtol=1e-6)


def test_packed_loss_equals_token_weighted_unpacked(tiny_setup):
    model, mesh, params, enc = tiny_setup
    rows = sft_data.rows_for(range(8), sft_data.lengths_of(enc), pack=True, max_length=32)
    assert len(rows) < 8
    packed = Stepper.get(model, TrainConfig(batch_size=8, max_length=32, pack=True), mesh)
    plain = Stepper.get(model, TrainConfig(batch_size=8, max_length=32), mesh)
    lp = loss_of(packed, params, sft_data.build_batch(rows, enc, 8, 32, loss_bucket=8))
    lu = loss_of(plain, params, sft_data.build_batch([[i] for i in range(8)], enc, 8, 32))
    np.testing.assert_allclose(lp, lu, rtol=2e-6)


# ----------------------------------------------------------------------------- optimizer


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    sched = schedule_args(TrainConfig(learning_rate=1e-3, warmup_ratio=0.1), 100)
    lr = [float(learning_rate(s, sched)) for s in (0, 5, 10, 55, 100)]
    np.testing.assert_allclose(lr, [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)


def test_batch_must_split_over_data_parallel_devices():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    with pytest.raises(TptError, match="data-parallel size"):
        check_batch(TrainConfig(batch_size=6), mesh)
    assert check_batch(TrainConfig(batch_size=8, grad_accum=2), mesh) == 4
    with pytest.raises(ConfigError, match="data-parallel"):
        validate_run(RunConfig(mesh=MeshConfig(2, 2, 2), train=TrainConfig(batch_size=6)))
    with pytest.raises(ConfigError, match="grad_accum"):
        validate_run(RunConfig(train=TrainConfig(batch_size=8, grad_accum=3)))


# ----------------------------------------------------------------------------- end to end


def test_tiny_model_memorises_32_examples(tmp_path):
    examples = make_examples(32, seed=5)
    cfg = dict(learning_rate=1e-2, warmup_ratio=0.05, epochs=50, batch_size=8, max_length=32,
               log_every=50)
    params, m = run_from_json({"train": cfg, "out": str(tmp_path), "examples": 32,
                               "data_seed": 5})
    assert m["steps"] == m["total_steps"] == 200
    # completion loss of the final params on the same examples, through the eval path
    model, mesh = tiny_model(), one_device_mesh()
    enc, _ = sft_data.encode_examples(TOK, examples, 32)
    stepper = Stepper.get(model, TrainConfig(**cfg), mesh)
    batches = [sft_data.build_batch([[i] for i in range(j, j + 8)], enc, 8, 32) for j in (0, 8, 16, 24)]
    sums = [stepper.eval_sums(params, b) for b in batches]
    loss = sum(float(s) for s, _ in sums) / sum(float(w) for _, w in sums)
    assert loss < 0.1, (loss, m["losses"][-5:])
    assert m["losses"][0] > 4.0


def _final(spec):
    params, m = run_from_json(spec)
    return jax.device_get(params), m


def test_sharded_training_matches_single_device(tmp_path):
    """Same data, same init: single device vs (2,2,2) with grad accumulation vs (1,4,2) with
    remat, packing off, a chunked loss."""
    base = {"train": dict(learning_rate=3e-3, warmup_ratio=0.25, epochs=2, batch_size=8,
                          max_length=32), "examples": 16}
    ref, m_ref = _final({**base, "out": str(tmp_path / "one")})
    runs = {
        "2x2x2 accum": {**base, "out": str(tmp_path / "a"), "devices": 8, "mesh": (2, 2, 2),
                        "train": {**base["train"], "grad_accum": 2}},
        "1x4x2 remat chunked": {**base, "out": str(tmp_path / "b"), "devices": 8,
                                "mesh": (1, 4, 2),
                                "train": {**base["train"], "remat": "full", "loss_chunk": 64}},
    }
    for name, spec in runs.items():
        got, m = _final(spec)
        np.testing.assert_allclose(m["losses"], m_ref["losses"], rtol=2e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=name)


def test_tpt_train_cli_exports_and_reloads(tmp_path, capsys):
    """`tpt train` end to end on 8 devices (random init, builtin tokenizer), then again from
    the exported HF checkpoint."""
    pytest.importorskip("tpt_jax.gemma.tokenizer")
    import json

    from tpt_jax import cli, io
    data = tmp_path / "train.jsonl"
    io.write_jsonl_atomic(data, make_examples(16))
    common = ["--examples", str(data), "--tokenizer", "builtin", "model=test-tiny",
              "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "grad_accum=2", "batch_size=8",
              "max_length=32", "learning_rate=3e-3", "warmup_ratio=0.25"]
    assert cli.main(["train", "--out", str(tmp_path / "a"), *common]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] == 2 and first["examples"]["examples"] == 16
    assert (tmp_path / "a" / "model" / "config.json").exists()
    assert (tmp_path / "a" / "train_log.jsonl").exists()
    args = ["train", "--out", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "a" / "model"),
            "--no-export", *common]
    assert cli.main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["steps"] == 2 and second["final_loss"] < first["final_loss"]
    assert cli.main(["train", "--out", str(tmp_path / "c"), "--examples", str(data),
                     "batch_size=7", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]) == 2
    assert "data-parallel" in capsys.readouterr().err
