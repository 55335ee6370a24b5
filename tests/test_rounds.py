"""The TPT loop end to end: artifacts, metrics.json schema, resume, and a GSM8K smoke round."""
import json
import logging

import pytest

from tpt_jax.loop import rounds
from tpt_jax.config import load_run_config
from conftest import GSM8K_DIR

TINY = ["per_round={}", "model=test-tiny", "data.source=synthetic", "data.synthetic_train=24",
        "data.synthetic_test=12", "data.seed_size=24", "think.n=2", "think.max_new_tokens=24",
        "think.batch_size=16", "eval.n=2", "eval.k=[1, 2]", "eval.max_new_tokens=24",
        "train.batch_size=8", "train.max_length=96", "train.learning_rate=1e-3",
        "train.eval_fraction=0.0", "prune.max_examples=null"]


def strip_wall(metrics):
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in metrics]


def copies_line(caplog) -> str:
    return [r.getMessage() for r in caplog.records if "sampling layout" in r.getMessage()][-1]


def test_two_rounds_artifacts_schema_and_resume(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = load_run_config(None, TINY + ["rounds=2"])
    caplog.set_level(logging.INFO, logger="tpt_jax.loop.rounds")
    metrics = rounds.run(cfg, str(out))
    # one sampler for the run: each round's new weights are copied into it once (Eval of round
    # r and Think of round r + 1 sample the same weights; a round that kept no examples
    # carries its weights over unchanged)
    trained = 1 + sum(m["train_examples"] > 0 for m in metrics[1:])
    assert f"{trained} weight copies into the sampling layout" in copies_line(caplog)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert [m["round"] for m in saved] == [0, 1, 2]
    for m in saved:
        assert 0.0 <= m["pass@1"] <= 1.0
        assert set(m["pass@k"]) == {"1", "2"} and all(0 <= v <= 1 for v in m["pass@k"].values())
        assert isinstance(m["train_examples"], int)
        assert "eval" in m["wall_s"]
    assert saved[0]["train_examples"] == 24  # round 0 trains on the seed solutions
    for m in saved[1:]:
        assert set(m["wall_s"]) == {"think", "prune", "train", "eval"}
        assert 0 <= m["coverage"] <= 1
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for tag in ("r01", "r02"):
        samples = [json.loads(line) for f in sorted((out / tag / "samples").glob("samples-*.jsonl"))
                   for line in f.read_text().splitlines()]
        # early stop (first-correct): each question has samples 0..m-1, m <= 2
        per_q = {i: max(s["sample"] for s in samples if s["id"] == i) + 1
                 for i in {s["id"] for s in samples}}
        assert {(s["id"], s["sample"]) for s in samples} == {
            (f"synthetic-train-{i:05d}", j) for i in range(24)
            for j in range(per_q[f"synthetic-train-{i:05d}"])}
        assert len(samples) == sum(per_q.values())
        assert set(samples[0]) >= {"id", "sample", "source", "prompt", "completion", "finish",
                                   "tokens"}
        stats = json.loads((out / tag / "prune_stats.json").read_text())
        assert stats["early_stop"]["samples_not_drawn"] == 24 * 2 - len(samples)
        assert saved[int(tag[1:])]["think_tokens"] >= sum(s["tokens"] for s in samples) > 0
        kept = [json.loads(line) for line in (out / tag / "train.jsonl").read_text().splitlines()]
        assert stats["counts"]["kept"] == len(kept) == saved[int(tag[1:])]["train_examples"]
        assert saved[int(tag[1:])]["coverage"] == stats["metrics"]["coverage"]
        assert all(k["correct"] for k in kept)
        assert (out / tag / "params").is_dir() and (out / tag / "eval.json").is_file()
    state = json.loads((out / "state.json").read_text())
    assert "r02/eval" in state["done"] and state["done"][-1] == "export"

    # the run ends with the last round's model as an HF checkpoint transformers loads whole
    from transformers import AutoTokenizer
    from tpt_jax.data.builtin_tokenizer import load_tokenizer
    assert json.loads((out / "hf" / "generation_config.json").read_text())["eos_token_id"]
    text = "Tom has 3 apples."
    hf_ids = AutoTokenizer.from_pretrained(str(out / "hf"))(text)["input_ids"]
    assert hf_ids == load_tokenizer(cfg.tokenizer).encode(text, add_bos=True)

    # Running the same command again resumes: nothing is recomputed, same metrics.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    again = rounds.run(cfg, str(out))
    assert strip_wall(again) == strip_wall(saved)
    assert "0 weight copies" in copies_line(caplog)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == before


@pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").exists(), reason="no ../shared/data/gsm8k")
def test_gsm8k_smoke_round(tmp_path):
    """One round over 16 real GSM8K training questions with a tiny random model: prompt
    formatting, real gold parsing, pruning and training run without error."""
    seed = tmp_path / "seed.jsonl"
    lines = (GSM8K_DIR / "train.jsonl").read_text().splitlines()[:16]
    seed.write_text("\n".join(lines) + "\n")
    cfg = load_run_config(None, [
        "model=test-tiny", "rounds=1", "prompt=zero-shot", "data.source=gsm8k",
        f"data.train_path={GSM8K_DIR / 'train.jsonl'}", f"data.test_path={GSM8K_DIR / 'test.jsonl'}",
        "data.train_limit=16", "data.test_limit=8", f"data.seed_path={seed}",
        "think.n=2", "think.max_new_tokens=16", "think.max_prompt_tokens=256", "think.batch_size=16",
        "eval.n=0", "eval.max_new_tokens=16", "train.batch_size=8", "train.max_length=256",
        "train.eval_fraction=0.0"])
    metrics = rounds.run(cfg, str(tmp_path / "run"))
    assert [m["round"] for m in metrics] == [0, 1]
    assert metrics[0]["train_examples"] == 16  # round 0 trained on real GSM8K solutions
    stats = json.loads((tmp_path / "run" / "r01" / "prune_stats.json").read_text())
    assert stats["counts"]["questions"] == 16 and stats["counts"]["samples"] == 32
    assert "dataset without gold" not in json.dumps(stats["counts"])  # every gold answer parsed
    eval_result = json.loads((tmp_path / "run" / "r01" / "eval.json").read_text())
    assert eval_result["questions"] == 8 and "questions_without_gold" not in eval_result
