"""Budget mode: Think's later waves go to the questions Prune has not settled, within a token
budget; the engine's first_sample, determinism, resume, the budget cap, bad input."""
import collections
import dataclasses

import jax
import pytest

from tpt_jax import io as tio
from tpt_jax.cli import main
from tpt_jax.config import ConfigError, PruneConfig, ThinkConfig, TptError, load_run_config
from tpt_jax.engine import Sampler, SamplingConfig
from tpt_jax.gemma import model as M
from tpt_jax.gemma.config import model_preset
from tpt_jax.stages import answers, budget, prune
from tpt_jax.stages import think as T
from conftest import ByteTokenizer

# n=1, then up to 6 a question; 24 tokens a question on average (two samples at
# max_new_tokens), so the budget runs out before every unsettled question reaches n_max
CFG = ThinkConfig(n=1, n_max=6, budget_tokens=12 * 24, temperature=1.0, max_new_tokens=12,
                  max_prompt_tokens=64, batch_size=3, shard_size=5, seed=3,
                  stop=[chr(c) for c in range(0, 256, 8)])
PRUNE = PruneConfig(max_examples=None)


@pytest.fixture(scope="module")
def setup():
    model = M.make_model(model_preset("test-tiny"))
    params = M.init_params(model, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
    qs = [{"id": f"q{i}", "question": f"Sum {i} and {2 * i}.", "answer": str(i % 3)}
          for i in range(12)]
    return model, params, qs


@pytest.fixture
def verdicts(monkeypatch):
    """A random model: one byte in eight ends a completion, whose "answer" is its length mod
    3, so about a third of the samples are correct."""
    monkeypatch.setattr(answers, "extract_answer", lambda text, fallback=False:
                        str(len(text) % 3))


def run(setup, cfg=CFG, out=None, **kw):
    model, params, qs = setup
    return T.think(params, model, ByteTokenizer(), qs, cfg, out, template="plain",
                   progress=False, prune=PRUNE, **kw)


def test_first_sample_continues_a_prompts_samples(setup):
    """Samples 2..3 drawn on their own (first_sample=2) are samples 2..3 of a call that draws
    0..3, in continuous and static batches."""
    model, params, _ = setup
    sampler = Sampler(model, params, rows=3, max_prompt_tokens=16, eos_id=None)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=5)
    prompts, ids = [[2, 5, 9], [2, 7]], ["a", "b"]
    for static in (False, True):
        whole = sampler.generate(prompts, sampling, n=4, ids=ids, seed=1, static=static)
        tail = sampler.generate(prompts, sampling, n=2, ids=ids, seed=1, static=static,
                                first_sample=[2, 2])
        assert [[g.tokens for g in row[2:]] for row in whole] == \
            [[g.tokens for g in row] for row in tail]
        assert whole[0][0].tokens != whole[0][2].tokens
        one = sampler.generate(prompts[1:], sampling, n=1, ids=ids[1:], seed=1, static=static,
                               first_sample=[3])
        assert one[0][0].tokens == whole[1][3].tokens


def test_waves_go_to_unsettled_questions_within_the_budget(setup, verdicts, tmp_path):
    """Each question's samples are the uniform run's first m; a question stops at its first
    correct sample, the others go on to n_max while the budget lasts; decoded tokens never
    exceed the budget, per shard nor in all; the same settings give the same samples."""
    qs = setup[2]
    recs = run(setup, out=str(tmp_path))
    full = {(r["id"], r["sample"]): r for r in run(setup, dataclasses.replace(
        CFG, n=CFG.n_max, n_max=None, budget_tokens=None, stop_when_selected=False))}
    assert all(full[(r["id"], r["sample"])] == r for r in recs)
    by_q = collections.defaultdict(list)
    for r in recs:
        by_q[r["id"]].append(r)
    rule = prune.StopRule(PRUNE, 1, [q["answer"] for q in qs])
    solved = {q: [rule.candidate(r, qs[int(q[1:])]["answer"]) for r in rs]
              for q, rs in by_q.items()}
    for q, flags in solved.items():
        assert [r["sample"] for r in by_q[q]] == list(range(len(flags)))
        assert not any(flags) or flags.index(True) == len(flags) - 1  # stops at its first
    unsolved = [len(f) for f in solved.values() if not any(f)]
    first_try = [len(f) for f in solved.values() if f[0]]
    assert first_try and unsolved and min(unsolved) > max(first_try) == 1
    assert max(len(f) for f in solved.values()) > CFG.n
    # the budget binds: some unsettled question is short of n_max, and it is never exceeded
    assert min(unsolved) < CFG.n_max
    drawn = tio.read_json(tmp_path / T.DECODED)
    shares = budget.shares(CFG.budget_tokens, [5, 5, 2])
    assert all(drawn[T.shard_name(k)]["tokens"] <= shares[k] for k in range(3))
    assert T.decoded_tokens(str(tmp_path)) <= CFG.budget_tokens
    assert run(setup) == recs  # deterministic, with or without files
    # Prune: coverage exact, estimates from n samples withheld
    _, stats = prune.prune_records(qs, recs, PRUNE)
    prune.note_early_stop(stats, [dict(r, source="samples") for r in recs], {"samples": 1})
    assert stats["counts"]["questions_kept"] == sum(any(f) for f in solved.values())
    withheld = stats["metrics"]["pass@k"]
    assert withheld and all(v is None for v in withheld.values())
    assert stats["budget"]["questions_extended"] == sum(len(f) > 1 for f in solved.values())


def test_a_pool_that_preempts_spends_the_budget_as_the_dense_cache(setup, verdicts, tmp_path,
                                                                    monkeypatch):
    """A paged pool of 5 pages for 3 slots preempts rows and draws them again; the tokens
    thrown away are recorded but not spent from the budget, so the samples are the dense
    cache's (the same settings give the same data whatever think.kv_cache_gb is)."""
    from tpt_jax.engine import device as D
    from tpt_jax.engine.paged import pool_bytes
    monkeypatch.setattr(D, "MIN_STEPS", 1)
    monkeypatch.setattr(D, "PREEMPT_BELOW", 1)
    dense_dir, paged_dir = tmp_path / "dense", tmp_path / "paged"
    dense = run(setup, dataclasses.replace(CFG, attention="dense"), out=str(dense_dir))
    gb = pool_bytes(setup[0].cfg, 5.5, 16, setup[0].dtype) / 1e9
    paged = run(setup, dataclasses.replace(CFG, attention="paged", kv_cache_gb=gb),
                out=str(paged_dir))
    drawn = tio.read_json(paged_dir / T.DECODED)
    thrown = sum(d["preempted_tokens"] for d in drawn.values())
    assert thrown > 0 and sum(d["preempted"] for d in drawn.values()) > 0
    assert paged == dense
    assert T.decoded_tokens(str(paged_dir)) == T.decoded_tokens(str(dense_dir)) <= \
        CFG.budget_tokens < T.decoded_tokens(str(dense_dir)) + thrown


def test_resume_after_interruption_gives_the_same_samples(setup, verdicts, tmp_path,
                                                          monkeypatch):
    """Killed while writing its second shard, then run again: the first shard is reused and
    the records equal an uninterrupted run's; other budget settings are refused."""
    whole = run(setup)
    real_write, writes = tio.write_jsonl_atomic, []

    def dying_write(path, recs):
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        return real_write(path, recs)

    monkeypatch.setattr(tio, "write_jsonl_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(setup, out=str(tmp_path))
    monkeypatch.setattr(tio, "write_jsonl_atomic", real_write)
    assert sorted(p.name for p in tmp_path.glob("samples-*")) == ["samples-00000.jsonl"]
    assert run(setup, out=str(tmp_path)) == whole == T.read_samples(str(tmp_path))
    with pytest.raises(TptError, match="budget_tokens"):
        run(setup, dataclasses.replace(CFG, budget_tokens=CFG.budget_tokens * 2),
            out=str(tmp_path))


@pytest.mark.parametrize("override,match", [
    (["think.n=4", "think.n_max=2", "think.budget_tokens=100000"],
     r"^think\.n_max must be >= think\.n \(4\), got 2$"),
    (["think.n_max=8"], r"^think\.n_max and think\.budget_tokens go together"),
    (["think.n=1", "think.n_max=8", "think.budget_tokens=50"],
     r"^think\.budget_tokens must cover think\.n samples of a question at "
     r"think\.max_new_tokens \(72\), got 50$"),
    (["think.n=1", "think.n_max=4", "think.budget_tokens=1000000",
      "per_round={2: {think: {n: 8}}}"], r"think\.n_max must be >= think\.n \(8\), got 4$"),
])
def test_bad_config_is_one_line_naming_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("tiny_cpu", override)


def test_budget_check_needs_the_questions_and_a_settling_strategy():
    cfg = dataclasses.replace(CFG, budget_tokens=12 * 10)
    assert budget.check(cfg, PRUNE, 10) == 1
    assert budget.check(cfg, PruneConfig(strategy="max-k", max_per_question=2), 10) == 2
    assert budget.check(dataclasses.replace(CFG, n_max=None, budget_tokens=None), None, 10) is None
    with pytest.raises(ConfigError, match=r"^think\.budget_tokens must cover think\.n=1 samples "
                                          r"of each of 11 questions .*\(132\), got 120$"):
        budget.check(cfg, PRUNE, 11)
    with pytest.raises(ConfigError, match=r"^think\.budget_tokens: prune\.strategy rft cannot "
                                          r"settle a question"):
        budget.check(cfg, PruneConfig(strategy="rft"), 10)
    assert budget.check(cfg, None, 10) is None  # Eval and synthesis settle nothing
    with pytest.raises(ConfigError, match=r"^--n-max must be >= --n \(2\), got 1$"):
        budget.check(dataclasses.replace(cfg, n=2, n_max=1), PRUNE, 10, "--")


def test_a_wave_goes_to_the_questions_that_cost_fewest_tokens():
    """Later waves equalize tokens, not samples: the unsettled question whose samples were
    short gets its next ones first; one more than a sample's max_new_tokens above the cheapest
    waits; settled questions and those at n_max get none; the budget caps the wave."""
    rule = prune.StopRule(PRUNE, 1, ["1", "1", "1", "1", "1"])

    def rec(answer, tokens):
        return {"completion": f"#### {answer}", "tokens": tokens}

    waves = budget.Waves(rule, n_max=3, share=10_000, max_new_tokens=10)
    waves.add(range(5), [[rec(0, 9)], [rec(0, 2)], [rec(1, 1)], [rec(0, 13)], [rec(0, 3)]], 28)
    assert waves.next() == [1, 4, 0]  # q2 is settled; q3 (13) > 2 + 10
    waves.add([1, 4, 0], [[rec(0, 2)], [rec(0, 10)], [rec(0, 10)]], 22)
    assert waves.next() == [1, 3, 4]  # q1 at 4, q3 and q4 at 13; q0 at 19 waits
    waves.add([1], [[rec(0, 2)]], 2)
    assert waves.next() == [3, 4, 0]  # q1 has n_max samples
    waves.share = waves.tokens + 25  # pays for two samples at max_new_tokens
    assert waves.next() == [3, 4]


def test_shares_add_up_to_the_budget():
    assert budget.shares(1000, [3, 3, 2]) == [375, 375, 250]
    assert budget.shares(7, [1, 1, 1]) == [2, 2, 3]
    assert sum(budget.shares(12345, [7, 0, 5, 3])) == 12345


def test_commands_refuse_before_any_work(tmp_path, capsys):
    """`tpt run` checks the budget against the training questions before round 0 trains;
    `tpt think` names its flags. Nothing is written."""
    tiny = ["per_round={}", "model=test-tiny", "rounds=1", "data.synthetic_train=8",
            "data.synthetic_test=8", "data.seed_size=8", "think.n=1", "train.batch_size=8"]
    assert main(["run", *tiny, "think.n_max=4", "think.budget_tokens=300", "-o",
                 str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "think.budget_tokens must cover think.n=1 samples of each of 8 questions at "
        "think.max_new_tokens=72 (576), got 300")
    data = tmp_path / "q.jsonl"
    data.write_text('{"id": "a", "question": "1 + 1?", "answer": "2"}\n')
    assert main(["think", "--dataset", str(data), "--model", "test-tiny", "--out",
                 str(tmp_path / "s"), "--n", "4", "--n-max", "2", "--budget-tokens", "9000"]) == 2
    assert capsys.readouterr().err.strip().endswith("--n-max must be >= --n (4), got 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]
