"""Test setup: 8 CPU devices so sharded code paths really run, shared tiny HF checkpoints."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def make_hf_checkpoint(path, seed=0, **overrides):
    """Save a tiny random `Gemma2ForCausalLM` with `save_pretrained`; norms randomised too,
    so every weight matters in a parity check."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=16, sliding_window=6)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(Gemma2Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            elif "embed" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(directory, torch model): head_dim == query_pre_attn_scalar, window 6."""
    path = tmp_path_factory.mktemp("hf_tiny")
    return str(path), make_hf_checkpoint(path)


@pytest.fixture(scope="session")
def hf_27b_like(tmp_path_factory):
    """query_pre_attn_scalar != head_dim (as in 27B), 8 heads / 4 kv heads, window 5."""
    path = tmp_path_factory.mktemp("hf_27b_like")
    return str(path), make_hf_checkpoint(path, seed=1, num_attention_heads=8,
                                         num_key_value_heads=4, head_dim=8,
                                         query_pre_attn_scalar=12, sliding_window=5,
                                         num_hidden_layers=2)
