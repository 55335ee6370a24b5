"""Majority-vote labels on hand-made votes, and the synthesize stage end to end on a tiny
random model (record format only; quality is irrelevant)."""
import dataclasses

import jax
import pytest

from sft_helpers import CharTokenizer, tiny_model
from tpt_jax.methods import synthesize as S
from tpt_jax.config import ConfigError, MeshConfig, SynthesizeConfig, ThinkConfig, \
    validate_synthesize
from tpt_jax.gemma.model import init_params
from tpt_jax.gemma.sharding import TRAIN_RULES, make_mesh


def test_majority_vote_cases():
    ans = lambda x: f"work\n#### {x}"
    v = S.majority_vote([ans(3), ans(3), ans(3), ans(5)], threshold=0.5)
    assert v["status"] == "labelled" and v["answer"] == "3" and v["agreement"] == 0.75
    v = S.majority_vote([ans(3), ans(3), ans(5), ans(5)], threshold=0.25)
    assert v["status"] == "tie" and v["answer"] is None
    v = S.majority_vote([ans(3), ans(3), ans(5), ans(7), "no answer", None], threshold=0.5)
    assert v["status"] == "below threshold" and v["agreement"] == pytest.approx(2 / 6)
    assert S.majority_vote(["nothing", None], 0.5)["status"] == "no answer"
    # equal values in different spellings are one vote
    v = S.majority_vote([ans("1,000"), ans("1000"), ans("999")], threshold=0.6)
    assert v["status"] == "labelled" and v["votes"] == 2
    # exactly at the threshold counts
    assert S.majority_vote([ans(1), ans(1), ans(2), ans(3)], 0.5)["status"] == "labelled"


def test_label_by_vote_from_sample_records():
    problems = [{"id": f"p{i}", "question": f"q{i}"} for i in range(4)]
    rec = lambda i, j, a, finish="stop": {"id": f"p{i}", "sample": j, "completion": f"#### {a}",
                                         "finish": finish}
    samples = ([rec(0, j, 4) for j in range(4)]  # unanimous
               + [rec(1, 0, 1), rec(1, 1, 2), rec(1, 2, 1), rec(1, 3, 2)]  # tie
               + [rec(2, 0, 9), rec(2, 1, 9), rec(2, 2, 9, "length"), rec(2, 3, 9, "length")])
    labelled, stats = S.label_by_vote(problems, samples, threshold=0.6)
    assert [p["id"] for p in labelled] == ["p0"]
    assert labelled[0]["answer"] == "4" and labelled[0]["agreement"] == 1.0
    assert stats["status"] == {"labelled": 1, "tie": 1, "below threshold": 1, "no samples": 1}


def test_stage_end_to_end_on_a_tiny_random_model():
    model = tiny_model()
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = init_params(model, jax.random.key(3), mesh, TRAIN_RULES)
    seeds = [{"id": f"s{i}", "text": f"Mia has {i} apples."} for i in range(3)]
    cfg = SynthesizeConfig(enabled=True, per_round=4, stage="mixed", n_votes=3, threshold=0.1,
                           max_new_tokens=8)
    tcfg = ThinkConfig(n=2, temperature=1.0, max_new_tokens=8, max_prompt_tokens=256,
                       batch_size=8)
    recs, stats = S.synthesize(params, model, CharTokenizer(), seeds, cfg, tcfg, mesh,
                               template="plain", round_=2)
    assert stats["seeds"] == 4 and stats["written"] + stats["empty"] == 4
    assert sum(stats["status"].values()) == stats["written"]
    assert set(stats["stages"]) == {"grade-school", "middle-school", "high-school", "competition"}
    for r in recs:  # a random model rarely writes '#### N': format checks only
        assert r["id"].startswith("syn-r02-") and r["synthetic"] is True
        assert {"question", "answer", "stage", "seed_id", "agreement", "votes"} <= set(r)
    # and the voting path on the same problems, with answers planted
    probs = [{"id": "syn-r02-00000", "question": "x", "synthetic": True}]
    samples = [{"id": "syn-r02-00000", "sample": j, "completion": "#### 7"} for j in range(3)]
    labelled, _ = S.label_by_vote(probs, samples, cfg.threshold)
    assert labelled[0]["answer"] == "7" and labelled[0]["synthetic"] is True


def test_prompts_and_config():
    p = S.synthesis_prompt("competition", "A seed text.", "zero-shot")
    assert "competition" in p and p.endswith("Problem:") and "A seed text." in p
    assert S.stage_for(SynthesizeConfig(stage="mixed"), 5) == "middle-school"
    for bad in (dict(stage="college"), dict(threshold=0.0), dict(n_votes=0)):
        with pytest.raises(ConfigError):
            validate_synthesize(dataclasses.replace(SynthesizeConfig(), **bad))
