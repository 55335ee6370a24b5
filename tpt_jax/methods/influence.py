"""Influence-based selection (JiuZhang3.0 / LESS): keep the training candidates whose gradient
points the way the gradient of a small target set points.

    kept, scores = select_by_influence(params, model, tokenizer, candidates, targets, cfg, mesh)

1. **Per-example gradients** of each example's loss (mean cross-entropy over its completion
   tokens, as in training) with respect to a chosen parameter subset, `jax.vmap(jax.grad(loss))`
   over a batch of examples. The subset is `cfg.influence_params`: path patterns over the
   parameter tree (`layers/*/mlp`, `layers/global/attn/o`, `embedding`, ...; fnmatch on the
   '/'-joined path, a pattern also matches everything below it). Stacked layer leaves
   (`layers/...`, one row per local/global pair) contribute one pair only,
   `cfg.influence_layer` (default -1: the last pair), so a per-example gradient is the size of
   that pair's weights, not the model's.
2. **Random projection** to `cfg.influence_dim` dimensions: g -> g R / sqrt(d) with R a
   Rademacher (+-1) matrix drawn from a fixed seed, generated `_CHUNK` input rows at a time
   inside the compiled step and never stored whole (each chunk's key = fold_in(seed, leaf,
   chunk)), so the projection of a 100M-parameter gradient costs no 100M x d matrix.
3. **Score** = cosine similarity between a candidate's projected gradient and the mean of the
   targets' normalised projected gradients; this ranks exactly as LESS's mean cosine to the
   target examples. The top `cfg.influence_fraction` of candidates are kept (ties: dataset
   order).

Examples are data-parallel: a batch's rows are sharded over the mesh batch axes (`data`,
`fsdp`), parameters keep whatever sharding they come with, and the [rows, d] projections come
back sharded the same way. Differences from LESS, on purpose: plain SGD gradients for both
sides (LESS uses Adam-preconditioned training gradients and LoRA weights), one target set.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tpt_jax.stages import sft_data
from tpt_jax.config import PruneConfig, TptError
from tpt_jax.stages.loss import chunked_cross_entropy
from tpt_jax.gemma.model import output_embedding
from tpt_jax.gemma.sharding import BATCH, mesh_axis_size

log = logging.getLogger(__name__)

_CHUNK = 8192  # gradient entries per generated block of the projection matrix
_FNS: dict = {}


# ----------------------------------------------------------------------------- parameter subset


def leaf_paths(params: Any) -> dict[str, Any]:
    """{'layers/local/mlp/gate': leaf, ...} in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip("/") + "/*")
               for p in patterns)


def chosen_paths(params: Any, patterns: Sequence[str]) -> list[str]:
    """The leaf paths the patterns select; an error names the available paths when none do."""
    paths = [p for p in leaf_paths(params) if _matches(p, patterns)]
    if not paths:
        raise TptError(f"prune.influence_params {list(patterns)!r} selects no parameter; paths "
                       f"look like: {', '.join(list(leaf_paths(params))[:6])}, ...")
    return paths


def _is_stacked(path: str) -> bool:
    return path.startswith("layers/")


def take_subset(params: Any, paths: Sequence[str], layer: int) -> dict[str, Any]:
    """The subset's values: stacked layer leaves give row `layer` (one local/global pair)."""
    flat = leaf_paths(params)
    return {p: flat[p][layer] if _is_stacked(p) else flat[p] for p in paths}


def merge_subset(params: Any, sub: dict[str, Any], layer: int) -> Any:
    """params with the subset's values put back (gradients flow to `sub` only)."""
    def put(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name not in sub:
            return leaf
        return jnp.asarray(leaf).at[layer].set(sub[name]) if _is_stacked(name) else sub[name]
    return jax.tree_util.tree_map_with_path(put, params)


def subset_size(params: Any, paths: Sequence[str]) -> int:
    flat = leaf_paths(params)
    return sum(math.prod(flat[p].shape[1:] if _is_stacked(p) else flat[p].shape) for p in paths)


# ----------------------------------------------------------------------------- projection


def _chunk_for(n: int) -> int:
    return min(_CHUNK, n)


def _block(seed: int, leaf: int, chunk: int, rows: int, dim: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), leaf), chunk)
    return jax.random.rademacher(key, (rows, dim), jnp.float32)


def project_leaf(g: jax.Array, leaf: int, dim: int, seed: int) -> jax.Array:
    """g [B, n] -> g R [B, dim] / sqrt(dim), R [n, dim] generated block by block (scan)."""
    B, n = g.shape
    c = _chunk_for(n)
    blocks = math.ceil(n / c)
    g = jnp.pad(g.astype(jnp.float32), ((0, 0), (0, blocks * c - n))).reshape(B, blocks, c)

    def body(acc, i):
        return acc + g[:, i] @ _block(seed, leaf, i, c, dim), None

    acc, _ = jax.lax.scan(body, jnp.zeros((B, dim), jnp.float32), jnp.arange(blocks))
    return acc / math.sqrt(dim)


def projection_matrix(n: int, leaf: int, dim: int, seed: int) -> np.ndarray:
    """The R / sqrt(dim) that `project_leaf` applies, materialised (tests, small n only)."""
    c = _chunk_for(n)
    blocks = [np.asarray(_block(seed, leaf, i, c, dim)) for i in range(math.ceil(n / c))]
    return np.concatenate(blocks)[:n] / math.sqrt(dim)


# ----------------------------------------------------------------------------- gradients


def example_loss(model, params: Any, ex: dict, loss_chunk: int = 8192) -> jax.Array:
    """Mean cross-entropy over one example's trained tokens (`ex`: 1-D arrays tokens,
    positions, targets, weights, as `sft_data.build_batch` makes per row); 0 for padding."""
    hidden = model.apply({"params": params}, ex["tokens"][None], ex["positions"][None],
                         return_hidden=True)
    ce = chunked_cross_entropy(hidden, output_embedding(params, model.cfg), ex["targets"][None],
                               model.cfg, loss_chunk)[0]
    w = ex["weights"]
    return jnp.sum(jnp.where(w > 0, ce, 0.0) * w) / jnp.maximum(jnp.sum(w), 1.0)


def per_example_grads(model, params: Any, batch: dict, paths: Sequence[str], layer: int,
                      loss_chunk: int = 8192) -> dict[str, jax.Array]:
    """{path: [B, *shape]}: each row's gradient with respect to the subset (vmap of grad)."""
    sub = take_subset(params, paths, layer)

    def loss(s, ex):
        return example_loss(model, merge_subset(params, s, layer), ex, loss_chunk)

    return jax.vmap(jax.grad(loss), in_axes=(None, 0))(sub, batch)


def projected_grads(model, params: Any, batch: dict, paths: Sequence[str], layer: int, dim: int,
                    seed: int, loss_chunk: int = 8192) -> jax.Array:
    """[B, dim]: the sum over subset leaves of each leaf's projected per-example gradient."""
    grads = per_example_grads(model, params, batch, paths, layer, loss_chunk)
    out = 0.0
    for i, p in enumerate(paths):
        g = grads[p]
        out = out + project_leaf(g.reshape(g.shape[0], -1), i, dim, seed)
    return out


def _compiled(model, mesh, paths: tuple, layer: int, dim: int, seed: int, loss_chunk: int):
    key = (model.cfg, str(model.dtype), str(model.param_dtype), mesh, paths, layer, dim, seed,
           loss_chunk)
    if key not in _FNS:
        out_sh = NamedSharding(mesh, P(BATCH, None)) if mesh is not None else None
        fn = lambda params, batch: projected_grads(model, params, batch, paths, layer, dim,
                                                   seed, loss_chunk)
        _FNS[key] = jax.jit(fn, out_shardings=out_sh)
    return _FNS[key]


# ----------------------------------------------------------------------------- scoring


def _encode(tokenizer, records: Sequence[dict], max_length: int, what: str):
    encoded, keep = [], []
    for i, rec in enumerate(records):
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
            raise TptError(f"influence: {what} {i} (id {rec.get('id')!r}) needs string fields "
                           f"'prompt' and 'completion'")
        enc, _ = sft_data.encode_example(tokenizer, rec["prompt"], rec["completion"], max_length)
        encoded.append(enc)
        keep.append(bool(enc.trained[1:].any()))
    return encoded, keep


def embed_examples(params: Any, model, tokenizer, records: Sequence[dict], cfg: PruneConfig,
                   mesh=None, *, max_length: int = 1600, loss_chunk: int = 8192,
                   what: str = "example") -> np.ndarray:
    """[len(records), influence_dim] projected gradients (rows of examples with no trained
    token left after truncation are 0)."""
    paths = tuple(chosen_paths(params, cfg.influence_params))
    fn = _compiled(model, mesh, paths, cfg.influence_layer, cfg.influence_dim, cfg.seed,
                   loss_chunk)
    encoded, _ = _encode(tokenizer, records, max_length, what)
    dp = mesh_axis_size(mesh, BATCH) if mesh is not None else 1
    rows = max(dp, math.ceil(cfg.influence_batch / dp) * dp)
    lengths = sft_data.lengths_of(encoded)
    out = np.zeros((len(records), cfg.influence_dim), np.float32)
    # Longest first: batches of similar length, few distinct padded shapes.
    order = np.argsort(-lengths, kind="stable") if len(records) else np.zeros(0, np.int64)
    batch_sh = NamedSharding(mesh, P(BATCH, None)) if mesh is not None else None
    for a in range(0, len(order), rows):
        idx = order[a:a + rows]
        plan = [[int(i)] for i in idx]
        length = sft_data.row_length(plan, lengths, False, max_length, 64)
        b = sft_data.build_batch(plan, encoded, rows, length)
        batch = {k: b[k] for k in ("tokens", "positions", "targets", "weights")}
        if batch_sh is not None:
            batch = jax.device_put(batch, batch_sh)
        proj = np.asarray(jax.device_get(fn(params, batch)))
        out[idx] = proj[:len(idx)]
    return out


def cosine_scores(cand: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cosine of each candidate row with the mean of the normalised target rows."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    direction = unit(unit(np.asarray(target, np.float64)).mean(axis=0))
    return unit(np.asarray(cand, np.float64)) @ direction


def top_fraction(scores: np.ndarray, fraction: float) -> list[int]:
    """Indices of the best ceil(fraction * n) scores, in their original order."""
    n = len(scores)
    k = min(n, max(1 if n else 0, math.ceil(fraction * n - 1e-9)))
    best = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return sorted(int(i) for i in best)


def select_by_influence(params: Any, model, tokenizer, candidates: Sequence[dict],
                        targets: Sequence[dict], cfg: PruneConfig, mesh=None, *,
                        max_length: int = 1600, loss_chunk: int = 8192
                        ) -> tuple[list[dict], list[float]]:
    """Keep the top `cfg.influence_fraction` of `candidates` (training records with prompt and
    completion) by gradient similarity to `targets`. Returns (kept records in their original
    order, one score per candidate)."""
    if not targets:
        raise TptError("influence selection needs at least one target example")
    if not candidates:
        return [], []
    kw = dict(max_length=max_length, loss_chunk=loss_chunk)
    t = embed_examples(params, model, tokenizer, targets, cfg, mesh, what="target", **kw)
    c = embed_examples(params, model, tokenizer, candidates, cfg, mesh, what="candidate", **kw)
    scores = cosine_scores(c, t)
    kept = [candidates[i] for i in top_fraction(scores, cfg.influence_fraction)]
    log.info("influence: kept %d of %d candidates (fraction %.2f, %d targets, dim %d)",
             len(kept), len(candidates), cfg.influence_fraction, len(targets), cfg.influence_dim)
    return kept, [float(s) for s in scores]


def pick_targets(pool: Sequence[dict], n: int, seed: int) -> list[dict]:
    """`n` target examples from a seed/dev pool, chosen by seed (all of them when n >= pool)."""
    if n >= len(pool):
        return list(pool)
    idx = sorted(np.random.default_rng([seed, 9]).choice(len(pool), n, replace=False).tolist())
    return [pool[i] for i in idx]


def apply_to_round(params: Any, model, tokenizer, kept: list[dict], stats: dict,
                   targets_pool: Sequence[dict], cfg: PruneConfig, mesh=None, *,
                   max_length: int = 1600, loss_chunk: int = 8192
                   ) -> tuple[list[dict], dict, list[dict]]:
    """The round loop's influence step after Prune: (selected examples, stats updated with an
    `influence` section and the kept count, per-candidate score rows)."""
    targets = pick_targets(targets_pool, cfg.influence_targets, cfg.seed)
    if not targets:
        raise TptError("prune strategy 'influence' needs target examples: set data.seed_path "
                       "(worked solutions) or use the synthetic task, which has its own")
    selected, scores = select_by_influence(params, model, tokenizer, kept, targets, cfg, mesh,
                                           max_length=max_length, loss_chunk=loss_chunk)
    chosen = {id(r) for r in selected}
    rows = [{"id": r["id"], "sample": r.get("sample"), "source": r.get("source"), "score": s,
             "kept": id(r) in chosen} for r, s in zip(kept, scores)]
    counts = stats.setdefault("counts", {})
    dropped = len(kept) - len(selected)
    if dropped:
        counts.setdefault("dropped", {})["influence"] = dropped
    counts["kept_before_influence"] = len(kept)
    counts["kept"] = len(selected)
    counts["questions_kept"] = len({r["id"] for r in selected})
    by_src = stats.get("by_source") or {}
    for src, entry in by_src.items():
        entry["kept"] = sum(1 for r in selected if r.get("source") == src)
    stats["influence"] = {"targets": len(targets), "candidates": len(kept),
                          "kept": len(selected), "fraction": cfg.influence_fraction,
                          "dim": cfg.influence_dim, "params": list(cfg.influence_params),
                          "layer": cfg.influence_layer,
                          "score_mean": float(np.mean(scores)) if scores else None}
    return selected, stats, rows
