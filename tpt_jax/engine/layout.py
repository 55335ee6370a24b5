"""The sampling layout of the weights and the forward over it.

Training stacks the layers for `lax.scan`; decoding reads each weight in place, so the sampler
keeps one param tree per layer (slicing a stacked weight inside the decode loop would copy
every weight on every step), placed with the sampling shardings. `SamplingWeights` holds that
copy for a whole run: `update` writes new weights into it (the old per-layer buffers are
donated, so two copies never sit side by side) and skips the copy when the weights are the
ones it already holds.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from tpt_jax.gemma import model as M
from tpt_jax.gemma.attention import softcap
from tpt_jax.gemma.config import ModelConfig

Array = jax.Array


def transposed_unembed() -> bool:
    """On CPU, x @ E.T streams the [V, D] embedding far slower than x @ E' with E' = E.T
    stored [D, V] (measured 2.3x for the small shape), so the sampling layout keeps a
    transposed copy there. Accelerators contract either layout at full speed: no copy."""
    return jax.default_backend() == "cpu"


def split_layers(params: Any, cfg: ModelConfig, transpose: bool) -> dict:
    """Training layout -> sampling layout: {embedding, final_norm, blocks: one tree per layer
    (layer 2p from the pair's "local" half, 2p + 1 from its "global" half), lm_head when
    untied, unembed: the output embedding transposed when `transpose`}."""
    names = ("local", "global")
    blocks = [jax.tree.map(lambda x: x[i], params["layers"][name])
              for i in range(cfg.num_layers // 2) for name in names]
    out = {"embedding": params["embedding"], "final_norm": params["final_norm"],
           "blocks": blocks}
    if not cfg.tie_embeddings:
        out["lm_head"] = params["lm_head"]
    if transpose:
        out["unembed"] = M.output_embedding(params, cfg).T
    return out


def _split_into(old_fresh: Any, params: Any, cfg: ModelConfig, transpose: bool) -> dict:
    """`split_layers`, with the previous layout's own buffers (`old_fresh`) donated."""
    del old_fresh
    return split_layers(params, cfg, transpose)


def layout_shardings(model: M.Gemma2, mesh, rules, transpose: bool) -> dict:
    """The sampling layout's shardings: the model's param shardings under `rules`, without the
    layer axis."""
    sh = M.param_shardings(model, mesh, rules)
    drop = lambda s: NamedSharding(mesh, P(*tuple(s.spec)[1:]))
    out = {"embedding": sh["embedding"], "final_norm": sh["final_norm"],
           "blocks": [jax.tree.map(drop, sh["layers"][name])
                      for _ in range(model.cfg.num_layers // 2) for name in ("local", "global")]}
    if not model.cfg.tie_embeddings:
        out["lm_head"] = sh["lm_head"]
    if transpose:
        spec = tuple(sh["embedding"].spec) + (None,) * (2 - len(sh["embedding"].spec))
        out["unembed"] = NamedSharding(mesh, P(spec[1], spec[0]))
    return out


def _own_buffers(sp: dict) -> tuple:
    """The parts of a layout that are its own copies (the embedding and final norm may be the
    trainer's arrays themselves, and those are never donated)."""
    return sp["blocks"], sp.get("unembed")


class SamplingWeights:
    """The sampler's copy of one model's weights in the sampling layout."""

    def __init__(self, model: M.Gemma2, mesh=None, rules=None,
                 transpose: Optional[bool] = None):
        self.transpose = transposed_unembed() if transpose is None else transpose
        shardings = None if mesh is None else layout_shardings(model, mesh, rules, self.transpose)
        split = functools.partial(split_layers, cfg=model.cfg, transpose=self.transpose)
        into = functools.partial(_split_into, cfg=model.cfg, transpose=self.transpose)
        self._first = jax.jit(split, out_shardings=shardings)
        self._again = jax.jit(into, donate_argnums=0, out_shardings=shardings)
        self.params: Optional[dict] = None
        self._source: list = []  # weak references to the leaves of the weights held
        self.copies = 0  # layout copies made (weights changed)

    def holds(self, params: Any) -> bool:
        """Whether the layout was made from exactly these (undeleted) arrays."""
        leaves = jax.tree.leaves(params)
        return (self.params is not None and len(leaves) == len(self._source)
                and all(r() is x and not x.is_deleted() for r, x in zip(self._source, leaves)))

    def update(self, params: Any) -> bool:
        """Hold `params` (training layout) in the sampling layout; False when they were
        already held (nothing copied)."""
        if self.holds(params):
            return False
        old, self.params = self.params, None
        if old is None:
            self.params = self._first(params)
        else:
            fresh = _own_buffers(old)
            del old
            self.params = self._again(fresh, params)
        self._source = [weakref.ref(x) for x in jax.tree.leaves(params)]
        self.copies += 1
        return True


# ----------------------------------------------------------------------------- the forward


def logits_of(sp: dict, hidden: Array, cfg: ModelConfig) -> Array:
    """Final logits (f32, soft-capped) from the sampling layout."""
    if "unembed" not in sp:
        return M.logits_from_hidden(M.output_embedding(sp, cfg), hidden, cfg)
    logits = jnp.einsum("...d,dv->...v", hidden, sp["unembed"].astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return softcap(logits, cfg.final_logit_softcap)


def forward_layers(model: M.Gemma2, sp: dict, tokens: Array, positions: Array,
                   cache: Any, index: Array) -> tuple[Array, Any]:
    """The model over the sampling layout: the model's own `Block`s, one call per layer
    (unrolled), each attending through its view of `cache` (a `cache.SlotCache` or a
    `paged.PagedCache`), writing the T new keys at cache column `index` (a scalar, or one
    column per row). Returns the final hidden [B, T, D] and the updated cache."""
    cfg, dt = model.cfg, model.dtype
    x = M.embed_tokens(sp["embedding"], tokens, cfg, dt)
    positions = positions.astype(jnp.int32)
    views = []
    for layer, (bp, view) in enumerate(zip(sp["blocks"], cache.views(positions, index))):
        block = M.Block(cfg, cfg.local_layer(layer), dt, model.param_dtype)
        x, view = block.apply({"params": bp}, x, positions, None, view)
        views.append(view)
    x = M.make_norm(cfg, model.param_dtype).apply({"params": sp["final_norm"]}, x)
    return x, cache.from_views(views)
