"""Multi-model rounds: compute-matched sample counts, pooled dedup across sources keeps each
example's provenance, separate pruning, the data-quality report and its plot, config checks."""
import pytest

from tpt_jax.methods import multimodel as MM
from tpt_jax.config import ConfigError, PruneConfig, load_run_config
from tpt_jax.gemma.config import model_preset

DATASET = [{"id": "q1", "question": "1+1?", "answer": "2"},
           {"id": "q2", "question": "2+2?", "answer": "4"}]


def rec(qid, j, source, text):
    return {"id": qid, "sample": j, "source": source, "prompt": f"{qid}:", "completion": text}


SAMPLES = [
    rec("q1", 0, "wc", "1+1=<<1+1=2>>2 #### 2"),
    rec("q1", 1, "wc", "1+1=<<1+1=2>>2 #### 2"),  # duplicate within wc
    rec("q1", 2, "wc", "one and one #### 2"),
    rec("q1", 0, "se", "1+1=<<1+1=2>>2 #### 2"),  # duplicate of wc's across sources
    rec("q1", 1, "se", "add them: two #### 2"),
    rec("q2", 0, "se", "2+2=<<2+2=5>>4 #### 4"),  # right answer, wrong annotation
    rec("q2", 1, "wc", "#### 5"),
]


def test_compute_matched_counts_from_the_planner():
    big, small = model_preset("gemma2-27b"), model_preset("gemma2-9b")
    ratio = big.param_count() / small.param_count()
    assert MM.matched_samples(10, big, small) == int(10 * ratio)
    assert 2.8 < ratio < 3.2  # the 9B gets ~3x the 27B's samples at equal compute
    assert MM.matched_samples(10, small, big) == 3  # and the other way round, floored


def test_pooled_dedup_keeps_provenance():
    cfg = PruneConfig(strategy="all-correct+dedup-text", max_examples=None)
    kept, stats = MM.prune_sources(DATASET, SAMPLES, cfg, "pooled")
    got = sorted((k["id"], k["source"], k["sample"], k["completion"]) for k in kept)
    assert got == [("q1", "se", 1, "add them: two #### 2"),
                   ("q1", "wc", 0, "1+1=<<1+1=2>>2 #### 2"),  # sample 0 of wc (rank 0) wins
                   ("q1", "wc", 2, "one and one #### 2"),
                   ("q2", "se", 0, "2+2=<<2+2=5>>4 #### 4")]
    assert stats["counts"]["dropped"]["duplicate text"] == 2
    dq = MM.data_quality(stats, {"wc": 3, "se": 1})
    wc, se = dq["by_source"]["wc"], dq["by_source"]["se"]
    assert (wc["samples"], wc["correct"], wc["kept"], wc["duplicates"]) == (4, 3, 2, 1)
    assert (se["samples"], se["correct"], se["kept"], se["duplicates"]) == (3, 3, 2, 0)
    assert se["false_positive"] == pytest.approx(1 / 3) and wc["false_positive"] == 0
    assert wc["coverage@k"]["1"] == pytest.approx(0.5)  # q1: 3 of 3 right, q2: 0 of 1
    assert wc["diversity@k"]["1"] == pytest.approx(0.5)
    assert wc["samples_per_question"] == 3 and dq["pooled"]["kept"] == 4
    # separate: each source deduplicated on its own, so se keeps its copy of wc's text
    kept, stats = MM.prune_sources(DATASET, SAMPLES, cfg, "separate")
    assert sorted((k["source"], k["sample"]) for k in kept if k["id"] == "q1") == \
        [("se", 0), ("se", 1), ("wc", 0), ("wc", 2)]
    assert stats["by_source"]["se"]["kept"] == 3 and stats["counts"]["kept"] == 5


def test_plot_and_config(tmp_path):
    dq = MM.data_quality(MM.prune_sources(DATASET, SAMPLES, PruneConfig(max_examples=None),
                                          "pooled")[1])
    out = MM.plot_data_quality([{"round": 1, "data_quality": dq}, {"round": 2, "data_quality": dq}],
                               str(tmp_path / "dq.png"))
    assert (tmp_path / "dq.png").stat().st_size > 1000 and out.endswith("dq.png")
    cfg = load_run_config("wc_vs_se_gsm8k")
    assert [m.name for m in cfg.sources.models] == ["gemma2-27b"]
    assert cfg.sources.models[0].n is None and cfg.sources.pool == "separate"
    cfg.sources.models[0].checkpoint = None  # (gs:// here) its preset gives the size
    counts = MM.samples_per_source(cfg, model_preset(cfg.model))
    assert counts == {"self": 30, "gemma2-27b": 10}
    with pytest.raises(ConfigError, match="nobody samples"):
        load_run_config(None, ["sources.self=false"])
    with pytest.raises(ConfigError, match="unique"):
        load_run_config(None, ["sources.models=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="pool"):
        load_run_config(None, ["sources.pool=mixed"])


def test_a_fixed_source_draws_new_samples_each_round():
    """Another model's weights do not change between rounds, so its Think seed must: round 1
    keeps think.seed, later rounds get seeds of their own."""
    cfg = load_run_config("wc_vs_se_gsm8k", ["think.seed=5"])
    tcfgs = [MM.source_think_config(cfg, 10, r) for r in (1, 2, 3)]
    assert tcfgs[0].seed == 5 and len({t.seed for t in tcfgs}) == 3
    assert {t.n for t in tcfgs} == {10} and tcfgs[0].temperature == cfg.think.temperature


def test_weak_to_strong_cpu_config():
    """configs/weak_to_strong_cpu.yaml: the CPU default's strong model trained only on a fixed
    weak source, 9 compute-matched samples for the strong model's 4, new samples each round."""
    cfg = load_run_config("weak_to_strong_cpu")
    default = load_run_config("tiny_cpu")
    assert (cfg.model, cfg.think, cfg.train, cfg.prune, cfg.eval, cfg.data, cfg.per_round) == (
        default.model, default.think, default.train, default.prune, default.eval, default.data,
        default.per_round)  # round 0 is the self-improvement arm's
    assert not cfg.sources.self and cfg.sources.pool == "separate"
    (weak,) = cfg.sources.models
    assert (weak.model, weak.n) == ("cpu-tiny-weak", None)
    weak.checkpoint = None  # (written by the weak run) its preset gives the size
    assert MM.samples_per_source(cfg, model_preset(cfg.model)) == {"weak": 9}


def test_round_with_synthesis_influence_and_a_second_model(tmp_path):
    """One round of `tpt run` with every extra stage on: synthesize (before Think), a second
    (random tiny) model sampling next to the trained one, pooled Prune, the influence step,
    and the data-quality report; the artifacts have the right format."""
    import json

    from test_rounds import TINY
    from tpt_jax.loop import rounds

    cfg = load_run_config(None, TINY + [
        "rounds=1", "eval.n=0", "eval.k=[1]", "think.n=1",
        "synthesize.enabled=true", "synthesize.per_round=3", "synthesize.n_votes=2",
        "synthesize.threshold=0.5", "synthesize.max_new_tokens=16",
        "sources.models=[{name: other, model: test-tiny}]",
        "prune.strategy=all-correct+influence", "prune.influence_targets=4",
        "prune.influence_dim=32", "prune.influence_fraction=0.5",
        "prune.influence_params=[layers/global/mlp]"])
    out = tmp_path / "run"
    metrics = rounds.run(cfg, str(out))
    r1 = out / "r01"
    stats = json.loads((r1 / "prune_stats.json").read_text())
    dq = json.loads((r1 / "data_quality.json").read_text())
    assert set(dq["by_source"]) <= {"test-tiny@r0", "other"} and "other" in dq["by_source"]
    assert dq["by_source"]["other"]["samples_per_question"] == 1  # same size: matched n = 1
    assert metrics[1]["data_quality"] == dq and (out / "data_quality.png").exists()
    synth = [json.loads(x) for x in (r1 / "synthetic.jsonl").read_text().splitlines()]
    assert all(x["synthetic"] and x["id"].startswith("syn-r01-") for x in synth)
    assert json.loads((r1 / "synthesize_stats.json").read_text())["seeds"] == 3
    if stats["counts"].get("kept_before_influence"):
        assert stats["influence"]["kept"] == stats["counts"]["kept"]
        assert (r1 / "influence.jsonl").exists()
    assert "synthesize" in metrics[1]["wall_s"]
