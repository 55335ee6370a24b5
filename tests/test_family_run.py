"""`tpt run` on a tiny Llama-family model, with a Qwen2-family model sampling beside it (pooled
Prune), and the prompts of another family's samples rewritten for the trained model."""
import json

from tpt_jax.config import SourcesConfig, load_run_config
from tpt_jax.gemma import weights
from tpt_jax.io import write_jsonl_atomic
from tpt_jax.loop import rounds
from tpt_jax.methods import multimodel as MM
from test_rounds import TINY


def test_run_a_llama_round_with_a_qwen_source(tmp_path):
    cfg = load_run_config(None, TINY + [
        "model=test-llama-tiny", "rounds=1", "eval.n=0", "eval.k=[1]", "think.n=1",
        "prune.strategy=all-correct", "sources.models=[{name: qwen, model: test-qwen-tiny}]"])
    out = tmp_path / "run"
    metrics = rounds.run(cfg, str(out))
    assert [m["round"] for m in metrics] == [0, 1] and 0.0 <= metrics[1]["pass@1"] <= 1.0
    assert metrics[0]["train_examples"] == 24
    dq = json.loads((out / "r01" / "data_quality.json").read_text())
    assert dq["by_source"]["qwen"]["samples"] > 0  # the Qwen model sampled every question
    saved = weights.read_model_json(str(out / "r01" / "params"))
    assert (saved.family, saved.tie_embeddings, saved.rope_scaling_factor) == ("llama", False, 8.0)


def test_another_familys_samples_get_the_trained_models_prompt(tmp_path):
    """A source with its own tokenizer wrote prompts with its chat markers; Prune and Train
    see the trained model's prompt for the same question, and the completion unchanged."""
    rec = {"id": "q1", "sample": 0, "source": "llama", "completion": " 5 #### 5",
           "prompt": "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"}
    for name in ("llama", "same"):
        write_jsonl_atomic(str(tmp_path / name / "samples-00000.jsonl"), [{**rec, "source": name}])
    rc = load_run_config(None, ["sources.models=[{name: llama, model: test-llama-tiny, "
                                "tokenizer: some/llama}, {name: same, model: test-tiny}]"])
    assert isinstance(rc.sources, SourcesConfig)
    got = MM.read_source_samples(rc, str(tmp_path), {"q1": "<start_of_turn>user\nQ"})
    assert [(r["source"], r["prompt"]) for r in got] == [
        ("llama", "<start_of_turn>user\nQ"), ("same", rec["prompt"])]
    assert all(r["completion"] == rec["completion"] for r in got)
