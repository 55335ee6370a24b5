"""Experiment tracking: train writes TensorBoard events equal to its metrics; a resume
neither duplicates nor loses steps; round records; W&B through a stand-in module."""
import sys
import types

import jax
import numpy as np
import pytest

from sft_helpers import CharTokenizer, make_examples, tiny_model
from tpt_jax.config import ConfigError, MeshConfig, TrackingConfig, TrainConfig, load_run_config
from tpt_jax.gemma.model import init_params
from tpt_jax.gemma.sharding import TRAIN_RULES, make_mesh
from tpt_jax.loop.tracking import Tracker, TrainTracker
from tpt_jax.stages.train import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
CFG = TrainConfig(batch_size=4, max_length=32, epochs=2, learning_rate=3e-3, log_every=3,
                  async_checkpoint=False)


def scalars(logdir, tag):
    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_train_events_equal_metrics_and_resume_purges(tmp_path):
    model = tiny_model()
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params = init_params(model, jax.random.key(0), mesh, TRAIN_RULES)
    examples, out = make_examples(16), str(tmp_path / "r01" / "train")
    tracker = Tracker(str(tmp_path), TrackingConfig())
    _, first = train(params, model, CharTokenizer(), examples, CFG, out, mesh, stop_at=5,
                     tracker=tracker.train(1), progress=False)
    assert first["steps"] == 5
    stale = TrainTracker(str(tmp_path / "tb" / "r01"))  # a run killed before its step 8
    stale.begin(5, 8)                                    # checkpoint logged steps 6 and 7
    for step in (6, 7):
        stale.step(step, {"loss": 99.0})
    stale.close()
    _, metrics = train(params, model, CharTokenizer(), examples, CFG, out, mesh,
                       tracker=tracker.train(1), progress=False)
    assert metrics["resumed_from"] == 5 and metrics["steps"] == 8
    got = scalars(tmp_path / "tb" / "r01", "train/loss")
    assert [s for s, _ in got] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in got], metrics["losses"], rtol=1e-6)
    lr = scalars(tmp_path / "tb" / "r01", "train/lr")
    np.testing.assert_allclose([v for _, v in lr], [h["lr"] for h in metrics["history"]], rtol=1e-6)
    for tag in ("train/grad_norm", "train/tokens_per_s", "train/tokens"):
        assert len(scalars(tmp_path / "tb" / "r01", tag)) == 8

    tracker.round_end({"round": 0, "pass@1": 20.0, "wall_s": {"eval": 1.5}})
    tracker.round_end({"round": 1, "pass@1": 30.0, "coverage": 40.0, "train_examples": 12,
                       "pass@k": {"4": 50.0}, "note": "text is skipped"})
    tracker.close()
    rounds = tmp_path / "tb" / "rounds"
    assert scalars(rounds, "round/pass_at_k/4") == [(1, 50.0)]
    assert scalars(rounds, "round/train_examples") == [(1, 12.0)]
    rerun = Tracker(str(tmp_path), TrackingConfig())  # a resumed run records round 1 again
    rerun.round_end({"round": 1, "pass@1": 31.0})
    rerun.close()
    assert scalars(rounds, "round/pass_at_1") == [(0, 20.0), (1, 31.0)]
    assert scalars(rounds, "round/pass_at_k/4") == []  # round 1 as the rerun recorded it
    assert scalars(rounds, "round/wall_s/eval") == [(0, 1.5)]


def test_disabled_tracking_writes_nothing_and_wandb_gets_the_values(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    run = types.SimpleNamespace(log=lambda d: calls.append(("log", d)),
                                define_metric=lambda *a, **k: calls.append(("define", a)),
                                finish=lambda: calls.append(("finish",)))
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    t = Tracker(str(tmp_path), TrackingConfig(tensorboard=False, wandb_project="tpt"))
    stage = t.train(2)
    stage.begin(0, 1)
    stage.step(1, {"loss": 2.5, "lr": 0.1, "history_only": 3})
    t.round_end({"round": 2, "pass@1": 40.0})
    t.close()
    assert not (tmp_path / "tb").exists()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "tpt" and calls[0][1]["id"] == "abc123"
    assert ("log", {"r02/train/loss": 2.5, "r02/train/lr": 0.1, "r02/train/step": 1}) in calls
    assert ("log", {"round/pass@1": 40.0, "round": 2}) in calls and calls[-1] == ("finish",)
    assert (tmp_path / "wandb_id").read_text() == "abc123"  # a resumed run reuses the W&B run


def test_tracking_config():
    cfg = load_run_config("tiny_cpu", ["tracking.wandb_project=tpt"])
    assert cfg.tracking.wandb_project == "tpt" and cfg.tracking.tensorboard
    with pytest.raises(ConfigError, match="tracking.wandb_project"):
        load_run_config("tiny_cpu", ["tracking.wandb_project=' '"])
    from tpt_jax.config_io import fingerprint
    assert fingerprint(cfg) == fingerprint(load_run_config("tiny_cpu"))  # a resume may change it
