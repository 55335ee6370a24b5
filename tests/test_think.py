"""Think: sample records, JSONL shards, resume after an interruption, stop strings, CLI."""
import json

import jax
import pytest

from tpt_jax import io as tio
from tpt_jax.gemma import model as M
from tpt_jax.stages import think as T
from tpt_jax.config import ThinkConfig, TptError
from tpt_jax.gemma.config import model_preset
from conftest import ByteTokenizer


@pytest.fixture(scope="module")
def setup():
    model = M.make_model(model_preset("test-tiny"))
    params = M.init_params(model, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
    questions = [{"id": f"q{i}", "question": f"What is {i} + {i * 3}?", "answer": str(4 * i)}
                 for i in range(5)]
    return model, params, questions


CFG = ThinkConfig(n=2, temperature=1.0, max_new_tokens=6, max_prompt_tokens=64, batch_size=4,
                  shard_size=2, seed=3)


def test_records_and_shards(setup, tmp_path):
    model, params, questions = setup
    recs = T.think(params, model, ByteTokenizer(), questions, CFG, str(tmp_path), template="plain",
                   source="tiny", progress=False)
    assert [(r["id"], r["sample"]) for r in recs] == [(q["id"], j) for q in questions for j in range(2)]
    for r in recs:
        assert set(r) == {"id", "sample", "source", "prompt", "completion", "finish", "tokens"}
        assert r["source"] == "tiny" and r["prompt"].startswith("Question: What is")
        assert r["finish"] in ("stop", "length") and 1 <= r["tokens"] <= 6
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["decoded.json", "samples-00000.jsonl", "samples-00001.jsonl",
                     "samples-00002.jsonl", "think.json"]
    assert T.decoded_tokens(str(tmp_path)) == sum(r["tokens"] for r in recs)
    assert T.read_samples(str(tmp_path)) == recs
    # no files: same records (the evaluation path)
    assert T.think(params, model, ByteTokenizer(), questions, CFG, None, template="plain",
                   source="tiny", progress=False) == recs


def test_resume_after_interruption(setup, tmp_path, monkeypatch):
    """Killed after 2 of 3 shards: the rerun writes only the last shard, every (id, sample)
    appears once, and the result equals an uninterrupted run."""
    model, params, questions = setup
    tok = ByteTokenizer()
    full = T.think(params, model, tok, questions, CFG, None, template="plain", progress=False)
    real_write, writes = tio.write_jsonl_atomic, []

    def dying_write(path, recs):
        if len(writes) == 2:
            raise KeyboardInterrupt  # killed while working on the third shard
        writes.append(str(path))
        return real_write(path, recs)

    monkeypatch.setattr(tio, "write_jsonl_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        T.think(params, model, tok, questions, CFG, str(tmp_path), template="plain", progress=False)
    assert sorted(p.name for p in tmp_path.glob("samples-*")) == ["samples-00000.jsonl",
                                                                  "samples-00001.jsonl"]
    writes.clear()
    monkeypatch.setattr(tio, "write_jsonl_atomic", lambda p, r: (writes.append(str(p)), real_write(p, r))[1])
    again = T.think(params, model, tok, questions, CFG, str(tmp_path), template="plain",
                    progress=False)
    assert [w.rsplit("/", 1)[-1] for w in writes] == ["samples-00002.jsonl"]
    keys = [(r["id"], r["sample"]) for r in T.read_samples(str(tmp_path))]
    assert len(keys) == len(set(keys)) == 10
    assert again == full
    # a different batch size changes nothing; a different seed is refused
    import dataclasses
    assert T.think(params, model, tok, questions, dataclasses.replace(CFG, batch_size=2),
                   None, template="plain", progress=False) == full
    with pytest.raises(TptError, match="seed"):
        T.think(params, model, tok, questions, dataclasses.replace(CFG, seed=4), str(tmp_path),
                template="plain", progress=False)


def test_stop_strings_cut_on_host(setup):
    """A stop string found in the decoded text ends the completion there (finish = stop)."""
    model, params, questions = setup
    tok = ByteTokenizer()
    cfg = ThinkConfig(n=1, temperature=0.0, max_new_tokens=8, max_prompt_tokens=64, batch_size=2,
                      shard_size=8)
    plain = T.think(params, model, tok, questions[:2], cfg, None, template="plain", progress=False)
    text = plain[0]["completion"]
    assert len(text) >= 4
    stop = text[2:4]
    cut = T.think(params, model, tok, questions[:2], ThinkConfig(**{**cfg.__dict__, "stop": [stop]}),
                  None, template="plain", progress=False)
    assert cut[0]["completion"] == text[:text.index(stop)] and cut[0]["finish"] == "stop"
    assert cut[0]["tokens"] <= plain[0]["tokens"]


def test_duplicate_ids_rejected(setup):
    model, params, questions = setup
    with pytest.raises(TptError, match="twice"):
        T.think(params, model, ByteTokenizer(), [questions[0], questions[0]], CFG, None,
                template="plain", progress=False)


def test_cli(tmp_path, capsys):
    """tpt think on an HF checkpoint with the builtin tokenizer; then resumes as a no-op."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from tpt_jax.cli import main
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8))
    hf.save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"x{i}", "question": f"Tom has {i} apples.",
                                        "answer": str(i)}) + "\n" for i in range(3)))
    args = ["think", "--dataset", str(data), "--checkpoint", str(tmp_path / "ckpt"),
            "--tokenizer", "builtin", "--n", "2", "--max-new-tokens", "5", "--batch-size", "4",
            "--shard-size", "2", "--template", "plain", "--out", str(tmp_path / "out"),
            "--no-progress", "--mesh", "1,-1,1"]
    assert main(args) == 0
    recs = T.read_samples(str(tmp_path / "out"))
    assert len(recs) == 6 and recs[0]["source"] == "ckpt"
    assert main(args) == 0  # everything exists: reads the shards back
    assert "6 samples for 3 questions" in capsys.readouterr().out
    assert main(args + ["--seed", "9"]) == 2
    assert "seed" in capsys.readouterr().err


def test_same_records_as_static_batches(setup, monkeypatch):
    """Think runs continuous batching; forcing the static path gives the same records, with
    greedy and sampled settings and stop strings that end rows on device."""
    import dataclasses
    from tpt_jax.engine import Sampler
    model, params, questions = setup
    tok = ByteTokenizer()
    cfgs = [CFG, dataclasses.replace(CFG, n=3, temperature=0.0, batch_size=2, stop=["e", "7"]),
            dataclasses.replace(CFG, n=5, batch_size=3, max_new_tokens=9, stop=["a "])]
    runs = lambda c: T.think(params, model, tok, questions, c, None, template="plain",
                             progress=False)
    cont = [runs(c) for c in cfgs]
    real, static = Sampler.stream, []

    def stream_static(self, *a, **k):
        static.append(True)
        return real(self, *a, **k, static=True)

    monkeypatch.setattr(Sampler, "stream", stream_static)
    assert [runs(c) for c in cfgs] == cont and len(static) == len(cfgs)
    assert any(r["finish"] == "stop" for r in cont[1] + cont[2])


@pytest.mark.parametrize("strategy,k", [("first-correct", None), ("max-k", 2)])
def test_early_stop_keeps_what_prune_keeps(setup, tmp_path, monkeypatch, strategy, k):
    """With Prune's rule, Think stops a question once its selection is settled: fewer samples,
    each question a prefix of the full run's, the same training examples, and a run killed
    after its first shard resumes to the same records."""
    import dataclasses
    from tpt_jax.config import PruneConfig
    from tpt_jax.stages import prune
    from tpt_jax.stages import answers
    model, params, _ = setup
    tok = ByteTokenizer()
    # a random model: one byte in eight ends a completion, whose "answer" is its length mod 3
    cfg = dataclasses.replace(CFG, n=4, max_new_tokens=12, batch_size=3,
                              stop=[chr(c) for c in range(0, 256, 8)])
    monkeypatch.setattr(answers, "extract_answer", lambda text, fallback=False:
                        str(len(text) % 3))
    qs = [{"id": f"q{i}", "question": f"Sum {i} and {2 * i}.", "answer": str(i % 3)}
          for i in range(8)]
    full = T.think(params, model, tok, qs, cfg, None, template="plain", progress=False)
    pcfg = PruneConfig(strategy=strategy, max_per_question=k, max_examples=None)
    real_write, writes = tio.write_jsonl_atomic, []

    def dying_write(path, recs):
        if writes:
            raise KeyboardInterrupt  # killed while working on the second shard
        writes.append(path)
        return real_write(path, recs)

    monkeypatch.setattr(tio, "write_jsonl_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        T.think(params, model, tok, qs, cfg, str(tmp_path), template="plain", progress=False,
                prune=pcfg)
    monkeypatch.setattr(tio, "write_jsonl_atomic", real_write)
    early = T.think(params, model, tok, qs, cfg, str(tmp_path), template="plain",
                    progress=False, prune=pcfg)
    assert T.read_samples(str(tmp_path)) == early
    assert early == T.think(params, model, tok, qs, cfg, None, template="plain",
                            progress=False, prune=pcfg)
    from tpt_jax.engine import Sampler
    real, static = Sampler.stream, []  # static batches draw every sample, cut the same records

    def stream_static(self, *a, **k):
        static.append(True)
        return real(self, *a, **k, static=True)

    monkeypatch.setattr(Sampler, "stream", stream_static)
    assert early == T.think(params, model, tok, qs, cfg, None, template="plain",
                            progress=False, prune=pcfg) and static
    assert len(early) < len(full)
    assert all(r in full for r in early)
    assert prune.prune_records(qs, early, pcfg)[0] == prune.prune_records(qs, full, pcfg)[0]
    assert T.decoded_tokens(str(tmp_path)) < sum(r["tokens"] for r in full)
    for name, drawn in json.loads((tmp_path / T.DECODED).read_text()).items():
        kept = sum(r["tokens"] for _, r in tio.read_jsonl(tmp_path / name))
        assert drawn["tokens"] == kept + drawn["cancelled_tokens"], name
    # a resume with other Prune settings is refused: its shards may lack samples it needs
    with pytest.raises(TptError, match="stop_when_selected"):
        T.think(params, model, tok, qs, cfg, str(tmp_path), template="plain", progress=False,
                prune=dataclasses.replace(pcfg, strategy="max-k", max_per_question=3))


def test_shards_share_one_generate_call(setup, tmp_path):
    """Think samples its shards in one generate call, so the next shard fills the slots while
    one shard's longest rows finish: the records of one shard a call, in fewer decode steps,
    each shard's tokens in decoded.json."""
    import dataclasses
    model, params, _ = setup
    questions = [{"id": f"q{i}", "question": f"What is {i} + {i * 3}?", "answer": str(4 * i)}
                 for i in range(12)]
    cfg = dataclasses.replace(CFG, n=2, max_new_tokens=24, shard_size=3, stop=["e", "7"])
    sampler = T.make_sampler(model, ByteTokenizer(), cfg)
    run = lambda qs, out=None: T.think(params, model, ByteTokenizer(), qs, cfg, out,
                                       template="plain", progress=False, sampler=sampler)
    together = run(questions, str(tmp_path))
    steps = sampler.stats.decode_steps
    apart, apart_steps = [], 0
    for a in range(0, 12, 3):
        apart += run(questions[a:a + 3])
        apart_steps += sampler.stats.decode_steps
    assert together == apart and steps < apart_steps
    drawn = json.loads((tmp_path / T.DECODED).read_text())
    assert [drawn[T.shard_name(k)]["tokens"] for k in range(4)] == [
        sum(r["tokens"] for r in together[6 * k:6 * k + 6]) for k in range(4)]


def test_early_stop_off_for_strategies_needing_every_sample(caplog):
    import logging
    from tpt_jax.config import PruneConfig
    caplog.set_level(logging.INFO, logger="tpt_jax.stages.think")
    assert T.early_stop(CFG, PruneConfig(strategy="rft")) is None
    assert "early stop is off: prune.strategy rft needs every sample" in caplog.text
    assert T.early_stop(CFG, PruneConfig(strategy="max-k", max_per_question=3)) == 3
    import dataclasses
    assert T.early_stop(dataclasses.replace(CFG, stop_when_selected=False), PruneConfig()) is None


def test_paged_pool_that_preempts_gives_the_dense_records(setup, tmp_path, monkeypatch, caplog):
    """think.attention=paged with a pool of 12 pages for 4 slots (rows admitted with room for
    4 more steps only): rows are preempted and started again, and Think writes the records
    of the dense cache; the log and decoded.json say what was drawn again."""
    import dataclasses
    import logging
    from tpt_jax.engine import device as D
    from tpt_jax.engine.paged import pool_bytes
    model, params, questions = setup
    monkeypatch.setattr(D, "MIN_STEPS", 4)
    monkeypatch.setattr(D, "PREEMPT_BELOW", 4)
    cfg = dataclasses.replace(CFG, n=3, max_new_tokens=40, shard_size=5)
    gb = pool_bytes(model.cfg, 12.5, 16, model.dtype) / 1e9
    run = lambda c, out: T.think(params, model, ByteTokenizer(), questions, c, out,
                                 template="plain", progress=False)
    dense = run(dataclasses.replace(cfg, attention="dense"), None)
    with caplog.at_level(logging.INFO, logger="tpt_jax"):
        paged = run(dataclasses.replace(cfg, attention="paged", kv_cache_gb=gb), str(tmp_path))
    assert paged == dense
    drawn = json.loads((tmp_path / "decoded.json").read_text())["samples-00000.jsonl"]
    assert drawn["preempted"] > 0 and drawn["preempted_tokens"] > 0
    assert drawn["tokens"] == sum(r["tokens"] for r in paged) + drawn["preempted_tokens"]
    assert "the KV page pool ran out" in caplog.text
