"""Gemma2 in Flax: one definition for sampling (with a KV cache) and training.

Numerics follow the Gemma2 paper and HF `modeling_gemma2.py`: embeddings scaled by
sqrt(embed_dim); RMSNorm x * (1 + w) in f32; norms before and after both attention and MLP;
GeGLU with tanh-approximate GELU; RoPE; queries scaled by query_pre_attn_scalar**-0.5;
attention and final logits soft-capped; tied output embedding; sliding-window attention on
even layers, global on odd ones.

Layers are scanned in (local, global) pairs so compile time does not grow with depth. The
KV cache is part of the scan carry and updated in place, so a decode step never copies it.
Positions carry the padding: a token with position < 0 is padding and never attended to.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tpt_jax.gemma.config import ModelConfig
from tpt_jax.gemma.sharding import constrain

Array = jax.Array
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def as_dtype(name_or_dtype: Any) -> Any:
    return _DTYPES.get(name_or_dtype, name_or_dtype)


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init=None) -> Array:
    init = init or nn.initializers.normal(stddev=0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, [layers, batch, kv_heads, length, head_dim] (each
    (row, head) block contiguous, so decode attention is a plain batched matmul with no
    transpose), and the position of each cached slot ([batch, length], -1 = empty or padding)."""

    k: Array
    v: Array
    pos: Array

    @property
    def length(self) -> int:
        return self.k.shape[3]


CACHE_AXES = ("layers", "cache_batch", "cache_kv_heads", "cache_length", "head_dim")
CACHE_POS_AXES = ("cache_batch", "cache_length")


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.full((batch, length), -1, jnp.int32))


def softcap(x: Array, cap: Optional[float]) -> Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, HF `rotate_half` convention; x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1])
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


def logits_from_hidden(embedding: Array, hidden: Array, cfg: ModelConfig) -> Array:
    """Tied output projection + final soft-cap, in f32. hidden [..., D], embedding [V, D]."""
    logits = jnp.einsum("...d,vd->...v", hidden, embedding.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return softcap(logits, cfg.final_logit_softcap)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.zeros_init())
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


# Caches longer than this are scored in blocks of CACHE_BLOCK slots (see `cached_logits`).
LONG_CACHE = 256
CACHE_BLOCK = 64


def cache_length(length: int) -> int:
    """The cache length to allocate for `length` slots: long caches round up to whole blocks."""
    if length <= LONG_CACHE:
        return length
    return -(-length // CACHE_BLOCK) * CACHE_BLOCK


def cached_logits(q: Array, k: Array) -> Array:
    """Attention logits [B, K, Q, S] (f32) of queries q [B, K, Q, H] over a cache k [B, K, S, H].

    Up to LONG_CACHE slots, or for many queries (a prefill): one batched matmul. A decode step
    over a longer cache views it (a free reshape) as S / CACHE_BLOCK blocks of CACHE_BLOCK
    slots, one matmul per block: on XLA:CPU the single [Q, H] x [S, H]^T matmul falls off a
    cliff past a few hundred slots (45 ms at 32 rows x 1088 slots of the small shape, against
    5 ms blocked). A block's logits do not depend on how many blocks there are, so a row's
    results are the same at every (long) cache length."""
    B, K, S, H = k.shape
    if S <= LONG_CACHE or S % CACHE_BLOCK or q.shape[2] > 16:
        return jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32)
    kb = k.reshape(B, K, S // CACHE_BLOCK, CACHE_BLOCK, H)
    logits = jnp.einsum("BKQH,BKNSH->BKNQS", q, kb, preferred_element_type=jnp.float32)
    return jnp.swapaxes(logits, 2, 3).reshape(B, K, q.shape[2], S)


class Attention(nn.Module):
    cfg: ModelConfig
    sliding: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv, layer, cache_index):
        cfg, dt = self.cfg, self.dtype
        D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = _param(self, "q", (D, N, H), ("embed", "q_heads", "head_dim")).astype(dt)
        wk = _param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim")).astype(dt)
        wv = _param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim")).astype(dt)
        wo = _param(self, "o", (N, H, D), ("q_heads", "head_dim", "embed")).astype(dt)

        q = rope(jnp.einsum("BTD,DNH->BTNH", x, wq), positions, cfg.rope_theta)
        k = rope(jnp.einsum("BTD,DKH->BTKH", x, wk), positions, cfg.rope_theta)
        v = jnp.einsum("BTD,DKH->BTKH", x, wv)
        q = constrain(q * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, dt),
                      ("act_batch", "act_length", "act_heads", None))

        B, T = x.shape[:2]
        G = N // K
        qp = positions[:, :, None]
        if kv is None:  # full forward: attend within the sequence, keys [B, S, K, H]
            key_pos, new_kv = positions, None
        else:  # write this step's keys into the carried cache in place, attend over it
            k_all, v_all, key_pos = kv
            # all layers [L, B, K, S, H] (the scanned model) or one layer's [B, K, S, H] (the
            # sampler: no layer axis to add and drop, which made XLA copy the cache every step)
            stacked = k_all.ndim == 5
            at = ((layer,) if stacked else ()) + (0, 0, cache_index, 0)

            def put(c, x):
                x = jnp.swapaxes(x, 1, 2).astype(c.dtype)
                if jnp.ndim(cache_index) == 1:  # a write slot per row (continuous batching)
                    if stacked:
                        raise ValueError("per-row cache_index needs a per-layer cache")
                    write = lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0))
                    return jax.vmap(write)(c, x, cache_index)
                return jax.lax.dynamic_update_slice(c, x[None] if stacked else x, at)

            def read(c):
                c = jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) if stacked else c
                return c.astype(dt)

            k_all, v_all = put(k_all, k), put(v_all, v)
            k, v = read(k_all), read(v_all)
            new_kv = (k_all, v_all, key_pos)
        kp = key_pos[:, None, :]
        mask = (kp >= 0) & (kp <= qp)  # [B, T, S]
        if self.sliding:
            mask &= qp - kp < cfg.sliding_window
        if segment_ids is not None and kv is None:
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        neg = jnp.finfo(jnp.float32).min

        if kv is None:
            qg = q.reshape(B, T, K, G, H)
            logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
            logits = jnp.where(mask[:, None, None], softcap(logits, cfg.attn_logit_softcap), neg)
            probs = jax.nn.softmax(logits, axis=-1).astype(dt)
            out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)
        else:  # cache [B, K, S, H]: the T*G queries of a kv head form one matrix (fast decode)
            qg = jnp.swapaxes(q.reshape(B, T, K, G, H), 1, 2).reshape(B, K, T * G, H)
            logits = cached_logits(qg, k)
            mask = jnp.repeat(mask, G, axis=1) if G > 1 else mask  # query t*G + g
            logits = jnp.where(mask[:, None], softcap(logits, cfg.attn_logit_softcap), neg)
            probs = jax.nn.softmax(logits, axis=-1).astype(dt)
            out = jnp.einsum("BKQS,BKSH->BKQH", probs, v).reshape(B, K, T, G, H)
            out = constrain(jnp.swapaxes(out, 1, 2).reshape(B, T, N, H),
                            ("act_batch", "act_length", "act_heads", None))
            # a plain 2-D matmul: as an NH-contracting einsum, XLA:CPU re-lays out wo every step
            return (out.reshape(B, T, N * H) @ wo.reshape(N * H, D)), new_kv
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        return jnp.einsum("BTNH,NHD->BTD", out, wo), new_kv


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        D, F, dt = self.cfg.embed_dim, self.cfg.hidden_dim, self.dtype
        gate = _param(self, "gate", (D, F), ("embed", "mlp")).astype(dt)
        up = _param(self, "up", (D, F), ("embed", "mlp")).astype(dt)
        down = _param(self, "down", (F, D), ("mlp", "embed")).astype(dt)
        h = jax.nn.gelu(dense(x, gate), approximate=True) * dense(x, up)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return dense(h, down)


class Block(nn.Module):
    """One decoder layer: pre/post-norm attention, pre/post-norm GeGLU MLP, residuals."""

    cfg: ModelConfig
    sliding: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv, layer, cache_index):
        norm = lambda name: RMSNorm(self.cfg.rms_norm_eps, self.param_dtype, name=name)
        h, kv = Attention(self.cfg, self.sliding, self.dtype, self.param_dtype, name="attn")(
            norm("pre_attn_norm")(x), positions, segment_ids, kv, layer, cache_index)
        x = x + norm("post_attn_norm")(h)
        h = MLP(self.cfg, self.dtype, self.param_dtype, name="mlp")(norm("pre_ffw_norm")(x))
        x = x + norm("post_ffw_norm")(h)
        return constrain(x, ("act_batch", "act_length", "act_embed")), kv


class LayerPair(nn.Module):
    """The scanned unit: a sliding-window layer followed by a global one."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, positions, segment_ids, cache_index):
        x, kv, pair = carry
        args = (self.cfg, True, self.dtype, self.param_dtype)
        x, kv = Block(*args, name="local")(x, positions, segment_ids, kv, 2 * pair, cache_index)
        args = (self.cfg, False, self.dtype, self.param_dtype)
        x, kv = Block(*args, name="global")(x, positions, segment_ids, kv, 2 * pair + 1, cache_index)
        return (x, kv, pair + 1), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Gemma2(nn.Module):
    """tokens [B, T], positions [B, T] (-1 = padding) -> (logits [B, T, V] f32 or final hidden
    [B, T, D], updated KVCache or None). With a cache, the T new keys are written at slot
    `cache_index` (shared by all rows) and queries attend over the whole cache."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"

    def setup(self):
        self.embedding = _param(self, "embedding", (self.cfg.vocab_size, self.cfg.embed_dim),
                                ("vocab", "embed"))
        pair = LayerPair
        if self.remat != "none":
            pair = nn.remat(pair, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        self.layers = nn.scan(
            pair, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.cfg.num_layers // 2,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.cfg, self.dtype, self.param_dtype)
        self.final_norm = RMSNorm(self.cfg.rms_norm_eps, self.param_dtype)

    def __call__(self, tokens, positions, segment_ids=None, cache: Optional[KVCache] = None,
                 cache_index=None, return_hidden: bool = False):
        dt = self.dtype
        x = jnp.take(self.embedding, tokens, axis=0).astype(dt)
        x = x * jnp.asarray(math.sqrt(self.cfg.embed_dim), dt)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        kv = None
        if cache is not None:
            index = jnp.asarray(cache_index, jnp.int32)
            key_pos = jax.lax.dynamic_update_slice(cache.pos, positions.astype(jnp.int32), (0, index))
            kv = (cache.k, cache.v, key_pos)
        (x, kv, _), _ = self.layers((x, kv, jnp.int32(0)), positions, segment_ids, cache_index)
        x = self.final_norm(x)
        new_cache = None if kv is None else KVCache(k=kv[0], v=kv[1], pos=kv[2])
        if return_hidden:
            return x, new_cache
        return logits_from_hidden(self.embedding, x, self.cfg), new_cache


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
    logits, _ = model.apply({"params": params}, tokens, padding_positions(mask))
    return logits
