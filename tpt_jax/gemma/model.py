"""Gemma2, Llama 3.x and Qwen2 in Flax: one definition of the layers for training and sampling,
driven by `ModelConfig`.

Gemma2 numerics follow the Gemma2 paper and HF `modeling_gemma2.py`: embeddings scaled by
sqrt(embed_dim); RMSNorm x * (1 + w) in f32; norms before and after both attention and MLP;
GeGLU with tanh-approximate GELU; RoPE; queries scaled by query_pre_attn_scalar**-0.5;
attention and final logits soft-capped; tied output embedding; sliding-window attention on
even layers, global on odd ones. Llama and Qwen2 (HF `modeling_llama.py` / `modeling_qwen2.py`)
are the same stack without the embedding scale, post-norms, soft-caps or local layers: RMSNorm
x * w, SwiGLU, optional q/k/v biases (Qwen2), Llama 3's RoPE frequency scaling, and an untied
output projection `lm_head` where the checkpoint has one. Those families still stack layers in
(local, global) pairs, both global, so every family has the same parameter tree shape.

Training scans the layers in (local, global) pairs so compile time does not grow with depth;
the sampler (`tpt_jax.engine`) calls the same `Block` one layer at a time with its KV cache,
and `attention.attend` picks the attention by the cache it is given. Positions carry the
padding: a token with position < 0 is padding and never attended to.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpt_jax.gemma import attention as A
from tpt_jax.gemma.config import ModelConfig
from tpt_jax.gemma.sharding import constrain

Array = jax.Array
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def as_dtype(name_or_dtype: Any) -> Any:
    return _DTYPES.get(name_or_dtype, name_or_dtype)


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init=None) -> Array:
    init = init or nn.initializers.normal(stddev=0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


def rope_frequencies(head_dim: int, cfg: ModelConfig) -> Array:
    """Inverse frequencies [head_dim / 2] (f32); with Llama 3's scaling, wavelengths past the
    original context are slowed by `factor` and those between the two thresholds blended
    (HF `_compute_llama3_parameters`)."""
    half = head_dim // 2
    freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / head_dim)
    if cfg.rope_scaling_factor is None:
        return freq
    factor, low, high = (cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                         cfg.rope_high_freq_factor)
    old = cfg.rope_original_max_position
    wavelen = 2 * math.pi / freq
    scaled = jnp.where(wavelen > old / low, freq / factor, freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return jnp.where(medium, blended, scaled)


def rope(x: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Rotary embedding, HF `rotate_half` convention; x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    freq = rope_frequencies(x.shape[-1], cfg)
    angle = jnp.maximum(positions, 0)[..., None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@jax.custom_vjp
def dense(x: Array, w: Array) -> Array:
    """`x [..., K] @ w [K, N]`, with the backward spelled out as 2-D matmuls. Left to autodiff,
    XLA:CPU fuses the gradient's producer into a strided transpose for the weight gradient
    that costs more than the matmul itself (the small bench shape's gradient took 1.5x the
    CPU time). Values are those of `x @ w`."""
    return x @ w


def _dense_fwd(x, w):
    return x @ w, (x, w)


def _dense_bwd(res, g):
    x, w = res
    dw = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    return g @ w.T, dw


dense.defvjp(_dense_fwd, _dense_bwd)


def output_embedding(params: Any, cfg: ModelConfig) -> Array:
    """The [V, D] output projection: the input embedding when tied, else `lm_head`."""
    return params["embedding"] if cfg.tie_embeddings else params["lm_head"]


def logits_from_hidden(embedding: Array, hidden: Array, cfg: ModelConfig) -> Array:
    """Output projection + final soft-cap, in f32. hidden [..., D], embedding [V, D] (the
    `output_embedding`)."""
    logits = jnp.einsum("...d,vd->...v", hidden, embedding.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return A.softcap(logits, cfg.final_logit_softcap)


class RMSNorm(nn.Module):
    """x / rms(x) in f32, times (1 + w) as Gemma stores it (`plus_one`), else times w."""

    eps: float
    param_dtype: Any = jnp.float32
    plus_one: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), init).astype(jnp.float32)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def make_norm(cfg: ModelConfig, param_dtype: Any, name: Optional[str] = None) -> RMSNorm:
    """The family's RMSNorm (the one place that knows Gemma stores its scale minus one)."""
    return RMSNorm(cfg.rms_norm_eps, param_dtype, cfg.gemma, name=name)


class Attention(nn.Module):
    """Projections, RoPE and the output projection; the attention itself is `attention.attend`,
    chosen by the cache (none in training, the sampler's cache object when sampling)."""

    cfg: ModelConfig
    sliding: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache):
        cfg, dt = self.cfg, self.dtype
        D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = _param(self, "q", (D, N, H), ("embed", "q_heads", "head_dim")).astype(dt)
        wk = _param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim")).astype(dt)
        wv = _param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim")).astype(dt)
        wo = _param(self, "o", (N, H, D), ("q_heads", "head_dim", "embed")).astype(dt)

        q = jnp.einsum("BTD,DNH->BTNH", x, wq)
        k = jnp.einsum("BTD,DKH->BTKH", x, wk)
        v = jnp.einsum("BTD,DKH->BTKH", x, wv)
        if cfg.attention_bias:
            bias = lambda name, n, axis: _param(self, name, (n, H), (axis, "head_dim"),
                                                nn.initializers.zeros_init()).astype(dt)
            q = q + bias("q_bias", N, "q_heads")
            k = k + bias("k_bias", K, "kv_heads")
            v = v + bias("v_bias", K, "kv_heads")
        q, k = rope(q, positions, cfg), rope(k, positions, cfg)
        q = constrain(q * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, dt),
                      ("act_batch", "act_length", "act_heads", None))
        out, cache = A.attend(q, k, v, positions, segment_ids, cache, self.sliding, cfg)
        if cache is None:
            return jnp.einsum("BTNH,NHD->BTD", out, wo), None
        # sampling: a plain 2-D matmul (as an NH-contracting einsum, XLA:CPU re-lays out wo
        # every decode step)
        B, T = x.shape[:2]
        return out.reshape(B, T, N * H) @ wo.reshape(N * H, D), cache


class MLP(nn.Module):
    """GeGLU (Gemma2) or SwiGLU (Llama, Qwen2)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        D, F, dt = self.cfg.embed_dim, self.cfg.hidden_dim, self.dtype
        gate = _param(self, "gate", (D, F), ("embed", "mlp")).astype(dt)
        up = _param(self, "up", (D, F), ("embed", "mlp")).astype(dt)
        down = _param(self, "down", (F, D), ("mlp", "embed")).astype(dt)
        act = (lambda g: jax.nn.gelu(g, approximate=True)) if self.cfg.gemma else jax.nn.silu
        h = act(dense(x, gate)) * dense(x, up)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return dense(h, down)


class Block(nn.Module):
    """One decoder layer: pre-norm attention, pre-norm MLP, residuals; Gemma2 also normalises
    each sublayer's output (post-norms)."""

    cfg: ModelConfig
    sliding: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache=None):
        norm = lambda name: make_norm(self.cfg, self.param_dtype, name)
        post = (lambda name, h: norm(name)(h)) if self.cfg.gemma else (lambda name, h: h)
        h, cache = Attention(self.cfg, self.sliding, self.dtype, self.param_dtype, name="attn")(
            norm("pre_attn_norm")(x), positions, segment_ids, cache)
        x = x + post("post_attn_norm", h)
        h = MLP(self.cfg, self.dtype, self.param_dtype, name="mlp")(norm("pre_ffw_norm")(x))
        x = x + post("post_ffw_norm", h)
        return constrain(x, ("act_batch", "act_length", "act_embed")), cache


class LayerPair(nn.Module):
    """The scanned unit: a sliding-window layer followed by a global one (both global when the
    config has no sliding window)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        x, _ = Block(self.cfg, self.cfg.local_layer(0), self.dtype, self.param_dtype, name="local")(
            x, positions, segment_ids)
        x, _ = Block(self.cfg, False, self.dtype, self.param_dtype, name="global")(
            x, positions, segment_ids)
        return x, None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def embed_tokens(embedding: Array, tokens: Array, cfg: ModelConfig, dtype: Any) -> Array:
    """Token embeddings in the compute dtype, scaled by sqrt(embed_dim) for Gemma2."""
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    if cfg.gemma:
        x = x * jnp.asarray(math.sqrt(cfg.embed_dim), dtype)
    return constrain(x, ("act_batch", "act_length", "act_embed"))


class Gemma2(nn.Module):
    """The training-layout forward of every family (the name is history): tokens [B, T],
    positions [B, T] (-1 = padding), optional segment ids of packed rows -> logits [B, T, V]
    (f32) or the final hidden [B, T, D].
    Layers are stacked and scanned in pairs; the sampler runs the same `Block`s one by one
    over its own layout and cache (`tpt_jax.engine.layout`)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"

    def setup(self):
        self.embedding = _param(self, "embedding", (self.cfg.vocab_size, self.cfg.embed_dim),
                                ("vocab", "embed"))
        if not self.cfg.tie_embeddings:
            self.lm_head = _param(self, "lm_head", (self.cfg.vocab_size, self.cfg.embed_dim),
                                  ("vocab", "embed"))
        pair = LayerPair
        if self.remat != "none":
            pair = nn.remat(pair, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        self.layers = nn.scan(
            pair, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast), length=self.cfg.num_layers // 2,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.cfg, self.dtype, self.param_dtype)
        self.final_norm = make_norm(self.cfg, self.param_dtype)

    def __call__(self, tokens, positions, segment_ids=None, return_hidden: bool = False):
        x = embed_tokens(self.embedding, tokens, self.cfg, self.dtype)
        x, _ = self.layers(x, positions, segment_ids)
        x = self.final_norm(x)
        if return_hidden:
            return x
        out = self.embedding if self.cfg.tie_embeddings else self.lm_head
        return logits_from_hidden(out, x, self.cfg)


def make_model(cfg: ModelConfig, dtype: Any = "float32", param_dtype: Any = "float32",
               remat: str = "none") -> Gemma2:
    return Gemma2(cfg, as_dtype(dtype), as_dtype(param_dtype), remat)


# ----------------------------------------------------------------------------- params


def _abstract_boxed(model: Gemma2) -> Any:
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy))["params"]


def param_logical_axes(model: Gemma2) -> Any:
    """Tree of logical-axis tuples, one per parameter (no allocation)."""
    specs = nn.get_partition_spec(_abstract_boxed(model))
    return jax.tree.map(lambda s: tuple(s), specs,
                        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def abstract_params(model: Gemma2) -> Any:
    """Tree of ShapeDtypeStruct (no allocation)."""
    return nn.meta.unbox(_abstract_boxed(model))


def param_shardings(model: Gemma2, mesh, rules) -> Any:
    from tpt_jax.gemma.sharding import tree_shardings
    return tree_shardings(param_logical_axes(model), rules, mesh, abstract_params(model))


def init_params(model: Gemma2, rng: Array, mesh=None, rules=None) -> Any:
    """Random params, each array created directly in its sharding (never whole on one device)."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    init = lambda key: nn.meta.unbox(model.init(key, dummy, dummy))["params"]
    if mesh is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=param_shardings(model, mesh, rules))(rng)


def count_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def padding_positions(mask: Array) -> Array:
    """Positions from a validity mask [B, T]: 0, 1, ... over valid tokens, -1 on padding."""
    mask = mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, -1)


def forward(model: Gemma2, params: Any, tokens: Array, mask: Optional[Array] = None) -> Array:
    """Logits [B, T, V] for a batch of token ids; `mask` (1 = token, 0 = padding) optional."""
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask)
    return model.apply({"params": params}, tokens, padding_positions(mask))
