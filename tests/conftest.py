"""Test setup: 8 CPU devices so sharded code paths really run, shared tiny HF checkpoints."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


class ByteTokenizer:
    """Characters as ids (byte + 3); Gemma's pad/eos/bos = 0/1/2. A tokenizer test double."""

    vocab_size, pad_id, eos_id, bos_id = 256, 0, 1, 2

    def encode(self, text, add_bos=False):
        ids = [min(b, 252) + 3 for b in text.encode("ascii", "replace")]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def make_hf_checkpoint(path, seed=0, embed_std=0.5, **overrides):
    """Save a tiny random `Gemma2ForCausalLM` with `save_pretrained`; norms randomised too,
    so every weight matters in a parity check. Small `embed_std` makes greedy continuations
    vary (the layers, not the current token's embedding, pick the next token)."""
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
                p.normal_(0.0, embed_std)
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
