"""A quiet start: no backend-probe noise on CPU, a description of what runs where, and
train's progress bar (on a terminal only)."""
import io
import os
import subprocess
import sys
import types

import jax

from tpt_jax.config import MeshConfig, load_run_config
from tpt_jax.gemma.config import model_preset
from tpt_jax.gemma.model import make_model
from tpt_jax.gemma.sharding import make_mesh
from tpt_jax.loop.report import describe_start
from tpt_jax.stages import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tpt_stderr_has_no_backend_probe_noise(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "question": "q"}\n')
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = ROOT
    # JAX starts (the backends are probed), then a mesh that does not fit is a one-line error.
    proc = subprocess.run([sys.executable, "-m", "tpt_jax.cli", "think", "--dataset", str(data),
                           "--model", "test-tiny", "--out", str(tmp_path / "o"), "--mesh", "3,1,1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Unable to initialize backend" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"tpt think: error: mesh data=3 fsdp=1 tensor=1 needs 3 devices, but "
        f"{jax.device_count()} are available"]


def test_describe_start():
    cfg = load_run_config("tiny_cpu", ["mesh.fsdp=-1"])
    s = types.SimpleNamespace(cfg=cfg, mesh=make_mesh(MeshConfig(1, -1, 1)),
                              model=make_model(model_preset(cfg.model)),
                              tokenizer=types.SimpleNamespace(name="builtin", vocab_size=256),
                              train_questions=[{}] * 7, eval_questions=[{}] * 3)
    text = describe_start(s)
    assert f"devices: {jax.device_count()} x cpu" in text
    assert f"mesh data=1 fsdp={jax.device_count()} tensor=1" in text
    assert "model: 0.2M parameters (4 layers, width 64) from random init of preset cpu-tiny" in text
    assert "tokenizer: builtin (256 tokens)" in text
    assert "7 training questions, 3 test questions; 3 rounds" in text


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_train_progress_bar(monkeypatch):
    assert T.progress_bar("train", 0, 8, show=False).disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert T.progress_bar("train", 0, 8).disable  # not a terminal: log lines instead
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = T.progress_bar("round 1 train", 2, 8)
    assert not bar.disable
    bar.update(1)
    T._report(bar, {"step": 3, "loss": 1.25, "lr": 0.1, "grad_norm": 1.0}, 8, 1234.0)
    bar.close()
    out = term.getvalue()
    assert "round 1 train" in out and "3/8" in out and "loss=1.2500" in out and "tok_s=1234" in out
