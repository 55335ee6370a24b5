"""Shared by tests/test_train.py and tests/test_checkpoint.py: a trivial tokenizer, tiny SFT
data, and a `python tests/sft_helpers.py CONFIG.json` entry point that trains in a fresh
process (the resume tests)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CharTokenizer:
    """One id per character; Gemma's layout pad=0, eos=1, bos=2."""

    vocab_size, pad_id, eos_id, bos_id = 256, 0, 1, 2

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [3 + ord(c) % 253 for c in text]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) for i in ids if i >= 3)


def make_examples(n: int, seed: int = 0, prompt_len: int = 6, completion_len: int = 5) -> list[dict]:
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    out = []
    for i in range(n):
        plen = int(rng.integers(2, prompt_len + 1))
        clen = int(rng.integers(2, completion_len + 1))
        prompt = f"Q{i:02d}:" + "".join(rng.choice(letters, plen)) + "="
        completion = "".join(rng.choice(letters, clen))
        out.append({"id": f"q{i}", "sample": 0, "source": "test", "prompt": prompt,
                    "completion": completion})
    return out


def tiny_model(preset: str = "test-tiny", dtype: str = "float32"):
    from tpt_jax.gemma.config import model_preset
    from tpt_jax.gemma.model import make_model
    return make_model(model_preset(preset), dtype=dtype)


_INIT: dict = {}


def run_from_json(spec: dict):
    """Train as described by `spec` (train config overrides, out dir, mesh, stop_at)."""
    import jax

    from tpt_jax.config import MeshConfig, TrainConfig
    from tpt_jax.gemma.model import init_params
    from tpt_jax.gemma.sharding import TRAIN_RULES, make_mesh
    from tpt_jax.stages.train import train

    cfg = TrainConfig(**spec["train"])
    model = tiny_model()
    devices = jax.devices()[:spec.get("devices", 1)]
    mesh = make_mesh(MeshConfig(*spec.get("mesh", (1, 1, 1))), devices)
    key = (spec.get("init_seed", 0), mesh)
    if key not in _INIT:  # init compiles a new program per call; train copies, never donates these
        _INIT[key] = init_params(model, jax.random.key(key[0]), mesh, TRAIN_RULES)
    params = _INIT[key]
    examples = make_examples(spec.get("examples", 16), seed=spec.get("data_seed", 0))
    return train(params, model, CharTokenizer(), examples, cfg, spec["out"], mesh,
                 eval_examples=make_examples(4, seed=99) if spec.get("eval") else None,
                 stop_at=spec.get("stop_at"))


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    params, metrics = run_from_json(spec)
    import jax
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(jax.device_get(v))
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(spec["result"] + ".npz", **flat)
    with open(spec["result"] + ".json", "w") as f:
        json.dump({k: v for k, v in metrics.items() if k != "history"}, f)
