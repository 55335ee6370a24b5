"""Architecture hyperparameters of the supported families (Gemma2, Llama 3.x, Qwen2/2.5) and
the named presets (published sizes, peer benchmark shapes, the CPU default's tiny models).

One `ModelConfig` drives one model definition: the defaults are Gemma2's, and the fields below
`family` switch off what Llama and Qwen2 do not have (soft-caps, local layers, tied output)
or add what they do (q/k/v biases, Llama 3's RoPE frequency scaling)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from tpt_jax.errors import ConfigError


FAMILIES = ("gemma2", "llama", "qwen2")  # HF model_type values this project loads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (names follow the Gemma2 paper / HF config); defaults are
    Gemma2 2B's."""

    vocab_size: int = 256000
    embed_dim: int = 2304
    hidden_dim: int = 9216  # MLP intermediate size
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0
    sliding_window: Optional[int] = 4096  # even layers local, odd global; None: all global
    attn_logit_softcap: Optional[float] = 50.0
    final_logit_softcap: Optional[float] = 30.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # Gemma2 scales embeddings by sqrt(embed_dim), norms by (1 + w), has post-norms around
    # attention and MLP and GeGLU (tanh GELU); llama and qwen2 do none of that and use SwiGLU.
    family: str = "gemma2"
    attention_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    tie_embeddings: bool = True  # False: a separate output projection `lm_head` [vocab, embed]
    # Llama 3's "llama3" RoPE frequency scaling (None: plain RoPE).
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192

    @property
    def gemma(self) -> bool:
        """Gemma2's numerics (embedding scale, 1 + w norms, post-norms, GeGLU)."""
        return self.family == "gemma2"

    def local_layer(self, layer: int) -> bool:
        """Whether layer `layer` attends within the sliding window."""
        return self.sliding_window is not None and layer % 2 == 0

    def validate(self, where: str = "model") -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"{where}.family must be one of {', '.join(FAMILIES)}, "
                              f"got {self.family!r}")
        for f in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "sliding_window", "rope_original_max_position"):
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ConfigError(f"{where}.{f} must be positive, got {getattr(self, f)}")
        if self.num_layers % 2:
            raise ConfigError(f"{where}.num_layers must be even (layers are stacked in pairs, "
                              f"as Gemma2 alternates local/global ones), got {self.num_layers}")
        if self.rope_scaling_factor is not None and not (
                self.rope_scaling_factor > 0
                and self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
            raise ConfigError(f"{where}: llama3 RoPE scaling needs factor > 0 and "
                              f"high_freq_factor > low_freq_factor > 0")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{where}.num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{where}.head_dim must be even for RoPE, got {self.head_dim}")

    def param_count(self) -> int:
        """Exact parameter count (a tied embedding counted once)."""
        d, f, h = self.embed_dim, self.hidden_dim, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + (4 if self.gemma else 2) * d
        embeddings = (1 if self.tie_embeddings else 2) * self.vocab_size * d
        return embeddings + self.num_layers * per_layer + d


# Published Llama 3.1 8B and Qwen2.5 1.5B (their HF config.json); the larger sizes replace widths.
LLAMA31 = ModelConfig(vocab_size=128256, embed_dim=4096, hidden_dim=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, query_pre_attn_scalar=128.0,
                      sliding_window=None, attn_logit_softcap=None, final_logit_softcap=None,
                      rope_theta=500000.0, rms_norm_eps=1e-5, family="llama",
                      tie_embeddings=False, rope_scaling_factor=8.0)
QWEN25 = ModelConfig(vocab_size=151936, embed_dim=1536, hidden_dim=8960, num_layers=28,
                     num_heads=12, num_kv_heads=2, head_dim=128, query_pre_attn_scalar=128.0,
                     sliding_window=None, attn_logit_softcap=None, final_logit_softcap=None,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, family="qwen2",
                     attention_bias=True)

MODEL_PRESETS: dict[str, ModelConfig] = {
    "gemma2-2b": ModelConfig(),
    "gemma2-9b": ModelConfig(embed_dim=3584, hidden_dim=14336, num_layers=42, num_heads=16,
                             num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256.0),
    "gemma2-27b": ModelConfig(embed_dim=4608, hidden_dim=36864, num_layers=46, num_heads=32,
                              num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144.0),
    "llama3.1-8b": LLAMA31,
    "llama3.1-70b": dataclasses.replace(LLAMA31, embed_dim=8192, hidden_dim=28672, num_layers=80,
                                        num_heads=64),
    "qwen2.5-1.5b": QWEN25,
    "qwen2.5-7b": dataclasses.replace(QWEN25, vocab_size=152064, embed_dim=3584,
                                      hidden_dim=18944, num_heads=28, num_kv_heads=4,
                                      tie_embeddings=False),
    # Peer benchmark shapes (../shared/peers/configs.py).
    "tiny": ModelConfig(vocab_size=512, embed_dim=128, hidden_dim=512, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32.0),
    "small": ModelConfig(vocab_size=8192, embed_dim=512, hidden_dim=2048, num_layers=4, num_heads=8,
                         num_kv_heads=4, head_dim=64, query_pre_attn_scalar=64.0),
    # `small` as a Llama 3 (SwiGLU, no soft-caps or window, llama3 RoPE; tied, so the same
    # size): `tpt bench sample` compares the two families' sampler speed.
    "small-llama": dataclasses.replace(LLAMA31, vocab_size=8192, embed_dim=512, hidden_dim=2048,
                                       num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64,
                                       query_pre_attn_scalar=64.0, tie_embeddings=True),
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
    "test-llama-tiny": dataclasses.replace(LLAMA31, vocab_size=256, embed_dim=64, hidden_dim=128,
                                           num_layers=4, num_heads=4, num_kv_heads=2,
                                           head_dim=16, query_pre_attn_scalar=16.0),
    "test-qwen-tiny": dataclasses.replace(QWEN25, vocab_size=256, embed_dim=64, hidden_dim=128,
                                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                          query_pre_attn_scalar=16.0),
    "test-27b-like": ModelConfig(vocab_size=256, embed_dim=64, hidden_dim=128, num_layers=2,
                                 num_heads=8, num_kv_heads=4, head_dim=8,
                                 query_pre_attn_scalar=12.0, sliding_window=6),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]
