"""Gemma2 architecture hyperparameters and the named presets (published sizes, peer
benchmark shapes, the CPU default's tiny models)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from tpt_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Gemma2 architecture hyperparameters (names follow the Gemma2 paper / HF config)."""

    vocab_size: int = 256000
    embed_dim: int = 2304
    hidden_dim: int = 9216  # MLP intermediate size
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 4096  # even layers (0, 2, ...) are local, odd layers global
    attn_logit_softcap: Optional[float] = 50.0
    final_logit_softcap: Optional[float] = 30.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def validate(self, where: str = "model") -> None:
        for f in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "sliding_window"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{where}.{f} must be positive, got {getattr(self, f)}")
        if self.num_layers % 2:
            raise ConfigError(f"{where}.num_layers must be even (Gemma2 alternates local/global "
                              f"layers in pairs), got {self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{where}.num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{where}.head_dim must be even for RoPE, got {self.head_dim}")

    def param_count(self) -> int:
        """Exact parameter count (tied embedding counted once)."""
        d, f, h = self.embed_dim, self.hidden_dim, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 4 * d
        return self.vocab_size * d + self.num_layers * per_layer + d


MODEL_PRESETS: dict[str, ModelConfig] = {
    "gemma2-2b": ModelConfig(),
    "gemma2-9b": ModelConfig(embed_dim=3584, hidden_dim=14336, num_layers=42, num_heads=16,
                             num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256.0),
    "gemma2-27b": ModelConfig(embed_dim=4608, hidden_dim=36864, num_layers=46, num_heads=32,
                              num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144.0),
    # Peer benchmark shapes (../shared/peers/configs.py).
    "tiny": ModelConfig(vocab_size=512, embed_dim=128, hidden_dim=512, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32.0),
    "small": ModelConfig(vocab_size=8192, embed_dim=512, hidden_dim=2048, num_layers=4, num_heads=8,
                         num_kv_heads=4, head_dim=64, query_pre_attn_scalar=64.0),
    # The built-in CPU default's model (configs/tiny_cpu.yaml): 0.16M parameters, 4 layers.
    "cpu-tiny": ModelConfig(vocab_size=256, embed_dim=64, hidden_dim=128, num_layers=4, num_heads=4,
                            num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16.0,
                            sliding_window=8),
    # Its weaker, cheaper sibling (configs/weak_to_strong_cpu.yaml): same tokenizer and width, 2
    # layers, MLP 64; 66K parameters (0.40x), so compute-matching gives it 9 samples per 4.
    "cpu-tiny-weak": ModelConfig(vocab_size=256, embed_dim=64, hidden_dim=64, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=16,
                                 query_pre_attn_scalar=16.0, sliding_window=8),
    # CPU test shapes: every sharded dimension divides by 8.
    "test-tiny": ModelConfig(vocab_size=256, embed_dim=64, hidden_dim=128, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16.0,
                             sliding_window=8),
    "test-27b-like": ModelConfig(vocab_size=256, embed_dim=64, hidden_dim=128, num_layers=2,
                                 num_heads=8, num_kv_heads=4, head_dim=8,
                                 query_pre_attn_scalar=12.0, sliding_window=6),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]
