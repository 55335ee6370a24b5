"""Think's engine: batched generation with a KV cache, n samples per prompt from one prefill.

One compiled program per (prompt-length bucket, sampling settings) does everything for a batch:

1. prefill the P unique prompts (left-padded to the bucket, so every row's next cache slot is
   the same) into a prompt-sized cache; logits only for the last position;
2. expand that cache to P*g rows (g samples per prompt) inside the donated decode cache of
   length bucket + max_new, so the prompt is computed once however many samples it gets;
3. a `lax.while_loop` decode: one token per row per step, the cache carried and updated in
   place, per-row done flags (EOS or a stop token sequence); the loop exits when every row is
   done or max_new tokens are out.

Randomness is per row: key = fold_in(fold_in(key(seed), hash(question id)), sample index) and
the step key = fold_in(row key, step), so a row's tokens never depend on the other rows in its
batch. Rows are data-parallel and heads tensor-parallel through `SAMPLE_RULES`; outputs are
replicated before host code reads them, so it is safe on several hosts.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import flax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tpt_jax.gemma import model as M
from tpt_jax.config import ConfigError, MeshConfig, validate_sampling
from tpt_jax.gemma.sharding import SAMPLE_RULES, constrain, logical_to_spec, use_rules

log = logging.getLogger(__name__)
Array = jax.Array

# Incremented in the Python body of the jitted program: counts traces (= compilations).
TRACE_COUNT: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def validate(self) -> "SamplingConfig":
        validate_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        return self


@dataclasses.dataclass
class Generation:
    """One sample: generated ids (EOS excluded), why it ended, and how many tokens were drawn
    (EOS included: the compute it cost)."""

    tokens: list
    finish: str  # "stop" (EOS or a stop sequence) | "length"
    num_tokens: int
    logits: Optional[np.ndarray] = None  # [num_tokens, V], only when asked for


# ----------------------------------------------------------------------------- helpers


def prompt_buckets(max_prompt_tokens: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` up to (and capped by) max_prompt_tokens."""
    if max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    out, b = [], smallest
    while b < max_prompt_tokens:
        out.append(b)
        b *= 2
    out.append(max_prompt_tokens)
    return tuple(out)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


def stable_hash(text: str) -> int:
    """31-bit hash of a question id, identical on every host and every run."""
    return int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:4], "little") & 0x7FFFFFFF


def row_keys(seed: Array, id_hashes: Array, samples: Array) -> Array:
    """Per-row PRNG keys from (seed, question id hash, sample index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda h, s: jax.random.fold_in(jax.random.fold_in(base, h), s))(
        id_hashes, samples)


def sample_logits(logits: Array, keys: Array, cfg: SamplingConfig) -> Array:
    """Draw one token per row from logits [R, V] with per-row keys [R].

    Temperature first, then top-k, then top-p (the smallest set of most likely tokens whose mass
    reaches top_p; the first token is always kept), as in HF `generate`. Top-k uses `lax.top_k`,
    so a 256k vocabulary is never fully sorted unless top-p alone is asked for."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    vocab = logits.shape[-1]
    k = cfg.top_k if 0 < cfg.top_k < vocab else 0
    if k == 0 and cfg.top_p < 1:
        k = vocab
    draw = jax.vmap(jax.random.categorical)
    if k == 0:
        return draw(keys, logits).astype(jnp.int32)
    vals, idx = jax.lax.top_k(logits, k)  # sorted, largest first
    if cfg.top_p < 1:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        vals = jnp.where(before < cfg.top_p, vals, -jnp.inf)
    choice = draw(keys, vals)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Program:
    """Static settings of one compiled program (shapes add the bucket and the row count)."""

    sampling: SamplingConfig
    group: int  # rows per prompt (samples sharing one prefill)
    eos_ids: tuple
    stop_seqs: tuple  # tuple of token-id tuples
    pad_id: int
    record_logits: bool = False  # also return every step's logits (tests)


def _stop_hit(out: Array, step: Array, tok: Array, prog: _Program) -> Array:
    """Rows whose generated tokens (out[:, :step+1], tok at `step`) end with EOS or a stop
    sequence."""
    hit = jnp.zeros(tok.shape, bool)
    for e in prog.eos_ids:
        hit |= tok == e
    for seq in prog.stop_seqs:
        m = len(seq)
        if m > out.shape[1]:  # longer than max_new: can never complete
            continue
        if m == 1:
            hit |= tok == seq[0]
            continue
        window = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(step - m + 1, 0), m, axis=1)
        hit |= (step + 1 >= m) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1)
    return hit


@flax.struct.dataclass
class LayerCache:
    """The sampler's KV cache: one [B, K, S, H] array per layer (no per-step slicing of a
    stacked cache) and the slot positions [B, S] (-1 = empty)."""

    k: tuple
    v: tuple
    pos: Array


def init_layer_cache(cfg, rows: int, length: int, dtype: Any = jnp.float32) -> LayerCache:
    shape = (rows, cfg.num_kv_heads, length, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return LayerCache(k=zeros(), v=zeros(), pos=jnp.full((rows, length), -1, jnp.int32))


_CACHE_AXES = M.CACHE_AXES[1:]  # one layer


def _constrain_cache(c: LayerCache) -> LayerCache:
    return LayerCache(k=tuple(constrain(x, _CACHE_AXES) for x in c.k),
                      v=tuple(constrain(x, _CACHE_AXES) for x in c.v),
                      pos=constrain(c.pos, M.CACHE_POS_AXES))


def unstack_layers(params: Any, model: M.Gemma2, mesh=None, rules=SAMPLE_RULES) -> dict:
    """Training layout (layers stacked for `lax.scan`) -> sampling layout: one param tree per
    layer, placed with the sampling shardings. The decode step then reads each weight in place;
    slicing a stacked weight inside the loop would copy every weight on every step."""
    pairs = model.cfg.num_layers // 2
    names = ("local", "global")  # layer 2p is local (sliding), 2p + 1 global

    transpose = _transposed_unembed()

    def split(p):
        blocks = [jax.tree.map(lambda x: x[i], p["layers"][name])
                  for i in range(pairs) for name in names]
        out = {"embedding": p["embedding"], "final_norm": p["final_norm"], "blocks": blocks}
        if transpose:
            out["unembed"] = p["embedding"].T
        return out

    if mesh is None:
        return jax.jit(split)(params)
    sh = M.param_shardings(model, mesh, rules)
    drop = lambda s: NamedSharding(mesh, P(*tuple(s.spec)[1:]))
    out = {"embedding": sh["embedding"], "final_norm": sh["final_norm"],
           "blocks": [jax.tree.map(drop, sh["layers"][name]) for _ in range(pairs) for name in names]}
    if transpose:
        spec = tuple(sh["embedding"].spec) + (None,) * (2 - len(sh["embedding"].spec))
        out["unembed"] = NamedSharding(mesh, P(spec[1], spec[0]))
    return jax.jit(split, out_shardings=out)(params)


def _transposed_unembed() -> bool:
    """On CPU, x @ E.T streams the [V, D] embedding far slower than x @ E' with E' = E.T
    stored [D, V] (measured 2.3x for the small shape), so the sampling layout keeps a
    transposed copy there. Accelerators contract either layout at full speed: no copy."""
    return jax.default_backend() == "cpu"


def logits_of(sp: dict, hidden: Array, cfg) -> Array:
    """Final logits (f32, soft-capped) from the sampling layout."""
    if "unembed" not in sp:
        return M.logits_from_hidden(sp["embedding"], hidden, cfg)
    logits = jnp.einsum("...d,dv->...v", hidden, sp["unembed"].astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return M.softcap(logits, cfg.final_logit_softcap)


def forward_layers(model: M.Gemma2, sp: dict, tokens: Array, positions: Array,
                   cache: LayerCache, index: Array) -> tuple[Array, LayerCache]:
    """Gemma2 over the sampling layout: the model's own blocks, one call per layer (unrolled),
    writing the T new keys at cache slot `index`. Returns the final hidden [B, T, D]."""
    cfg, dt = model.cfg, model.dtype
    x = jnp.take(sp["embedding"], tokens, axis=0).astype(dt)
    x = constrain(x * jnp.asarray(math.sqrt(cfg.embed_dim), dt), ("act_batch", "act_length", "act_embed"))
    key_pos = jax.lax.dynamic_update_slice(cache.pos, positions.astype(jnp.int32), (0, index))
    ks, vs = [], []
    for layer, bp in enumerate(sp["blocks"]):
        block = M.Block(cfg, layer % 2 == 0, dt, model.param_dtype)
        kv = (cache.k[layer], cache.v[layer], key_pos)  # no layer axis: updated in place
        x, (k, v, _) = block.apply({"params": bp}, x, positions, None, kv, 0, index)
        ks.append(k)
        vs.append(v)
    x = M.RMSNorm(cfg.rms_norm_eps, model.param_dtype).apply({"params": sp["final_norm"]}, x)
    return x, LayerCache(k=tuple(ks), v=tuple(vs), pos=key_pos)


def _generate(model: M.Gemma2, sp: dict, cache: LayerCache, tokens: Array, positions: Array,
              id_hashes: Array, samples: Array, live: Array, seed: Array, prog: _Program):
    """The compiled program: prefill P prompts, expand to P*g rows, decode until done.

    tokens/positions [P, Lb] (left-padded, position -1 = padding); id_hashes/samples/live [R].
    Returns (cache, out [R, max_new] (pad after the end), num_tokens [R], stopped [R], the
    logits of every step [R, max_new, V] if prog.record_logits else None)."""
    TRACE_COUNT["generate"] += 1
    cfg, g, max_new = model.cfg, prog.group, prog.sampling.max_new_tokens
    n_prompts, lb = tokens.shape
    rows = n_prompts * g
    logits = lambda h: logits_of(sp, h, cfg)

    # 1. prefill the unique prompts; logits for the last position only
    small = _constrain_cache(init_layer_cache(cfg, n_prompts, lb, cache.k[0].dtype))
    hidden, small = forward_layers(model, sp, tokens, positions, small, jnp.int32(0))
    last = logits(hidden[:, -1])  # [P, V]

    # 2. share it: g rows per prompt, written into the donated decode cache in place
    rep = lambda x, axis: jnp.repeat(x, g, axis=axis) if g > 1 else x
    put = lambda big, x: jax.lax.dynamic_update_slice(big, rep(x, 0), (0,) * big.ndim)
    cache = _constrain_cache(LayerCache(
        k=tuple(put(b, x) for b, x in zip(cache.k, small.k)),
        v=tuple(put(b, x) for b, x in zip(cache.v, small.v)),
        pos=jnp.full(cache.pos.shape, -1, jnp.int32).at[:, :lb].set(rep(small.pos, 0))))
    next_pos = rep(jnp.max(positions, axis=1) + 1, 0)  # [R] position of the first new token

    keys = row_keys(seed, id_hashes, samples)
    step_keys = lambda i: jax.vmap(jax.random.fold_in, (0, None))(keys, i)
    tok = sample_logits(rep(last, 0), step_keys(0), prog.sampling)
    out = jnp.full((rows, max_new), prog.pad_id, jnp.int32).at[:, 0].set(tok)
    seen = None
    if prog.record_logits:
        seen = jnp.zeros((rows, max_new, cfg.vocab_size), jnp.float32).at[:, 0].set(rep(last, 0))
    hit = _stop_hit(out, jnp.int32(0), tok, prog) & live
    done = hit | ~live
    num = jnp.where(hit, 1, 0).astype(jnp.int32)

    # 3. decode: feed token i-1, draw token i
    def cond(state):
        i, _, _, done, _, _, _ = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, out, tok, done, num, cache, seen = state
        pos = (next_pos + i - 1)[:, None]
        hidden, cache = forward_layers(model, sp, tok[:, None], pos, cache, lb + i - 1)
        step_logits = logits(hidden[:, 0])
        if seen is not None:
            seen = jax.lax.dynamic_update_slice_in_dim(seen, step_logits[:, None], i, axis=1)
        new = sample_logits(step_logits, step_keys(i), prog.sampling)
        new = jnp.where(done, prog.pad_id, new)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
        hit = _stop_hit(out, i, new, prog) & ~done
        num = jnp.where(hit, i + 1, num)
        return i + 1, out, new, done | hit, num, _constrain_cache(cache), seen

    state = (jnp.int32(1), out, tok, done, num, cache, seen)
    _, out, _, done, num, cache, seen = jax.lax.while_loop(cond, body, state)
    stopped = (num > 0) & live
    num = jnp.where(stopped, num, jnp.where(live, max_new, 0))
    # replicated on every device, so each host can read the whole result
    if seen is not None:
        seen = constrain(seen, (None, None, None))
    return (cache, constrain(out, (None, None)), constrain(num, (None,)),
            constrain(stopped, (None,)), seen)


# ----------------------------------------------------------------------------- Sampler


@functools.lru_cache(maxsize=None)
def _compiled(cfg, dtype, param_dtype):
    """One jitted program per model shape, shared by every Sampler (new samplers for the
    same model, e.g. one per round, reuse the compiled programs)."""
    model = M.make_model(cfg, dtype, param_dtype)
    return jax.jit(functools.partial(_generate, model), static_argnames=("prog",),
                   donate_argnames=("cache",))


class Sampler:
    """Batched sampling on one model, compiled once per prompt bucket and sampling setting.

    `rows` is the fixed row count of every compiled batch (prompts x samples per prompt);
    prompts longer than the largest bucket keep their last tokens. The params (any layout,
    e.g. the trainer's) are copied once into the sampling layout (`unstack_layers`: one array
    per layer, `SAMPLE_RULES` shardings with a mesh), so rows are split over (data, fsdp) and
    heads over tensor, and the decode loop never gathers or slices a weight."""

    def __init__(self, model: M.Gemma2, params: Any, mesh=None, *, rows: int = 32,
                 max_prompt_tokens: int = 512, buckets: Optional[Sequence[int]] = None,
                 eos_id: Optional[int | Sequence[int]] = 1, pad_id: int = 0,
                 stop_tokens: Sequence[Sequence[int]] = (), rules=SAMPLE_RULES):
        if rows < 1:
            raise ConfigError(f"sampler rows must be >= 1, got {rows}")
        self.model, self.cfg, self.mesh, self.rules = model, model.cfg, mesh, rules
        self.rows = rows
        self.buckets = tuple(sorted(buckets)) if buckets else prompt_buckets(max_prompt_tokens)
        self.eos_ids = () if eos_id is None else (
            (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(map(int, eos_id)))
        self.pad_id = int(pad_id)
        self.stop_seqs = tuple(tuple(int(t) for t in s) for s in stop_tokens if len(s))
        self.cache_dtype = model.dtype
        self.params = unstack_layers(params, model, mesh, rules)  # the sampling layout
        self._cache: Optional[LayerCache] = None
        self._fn = _compiled(model.cfg, model.dtype, model.param_dtype)

    # -- placement

    def _cache_shardings(self, rows: int, length: int) -> LayerCache:
        c = self.cfg
        shape = (rows, c.num_kv_heads, length, c.head_dim)
        kv = NamedSharding(self.mesh, logical_to_spec(_CACHE_AXES, self.rules, self.mesh, shape))
        pos = NamedSharding(self.mesh, logical_to_spec(M.CACHE_POS_AXES, self.rules, self.mesh,
                                                       (rows, length)))
        return LayerCache(k=(kv,) * c.num_layers, v=(kv,) * c.num_layers, pos=pos)

    def _put(self, x: np.ndarray, logical: tuple) -> Array:
        """Host array (identical on every host) -> global array sharded by logical axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(logical, self.rules, self.mesh, x.shape)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec),
                                            lambda idx: x[idx])

    def _decode_cache(self, rows: int, length: int) -> LayerCache:
        """The donated decode cache: reused while the shape stays, else freshly allocated."""
        c = self._cache
        if c is not None and c.pos.shape == (rows, length):
            self._cache = None
            return c
        self._cache = None
        make = lambda: init_layer_cache(self.cfg, rows, length, self.cache_dtype)
        if self.mesh is None:
            return jax.jit(make)()
        return jax.jit(make, out_shardings=self._cache_shardings(rows, length))()

    def _program(self, sampling: SamplingConfig, group: int, record: bool = False) -> _Program:
        return _Program(sampling.validate(), group, self.eos_ids, self.stop_seqs, self.pad_id,
                        record)

    # -- one batch

    def _launch(self, prompts: Sequence[Sequence[int]], bucket: int, items: list, prog: _Program,
                seed: int):
        """Dispatch one compiled batch (asynchronously). items: (id hash, first sample,
        count) per prompt; slots past the last item are padding rows (never live)."""
        g = prog.group
        n_prompts = self.rows // g
        tokens = np.full((n_prompts, bucket), self.pad_id, np.int32)
        positions = np.full((n_prompts, bucket), -1, np.int32)
        hashes = np.zeros(n_prompts * g, np.int32)
        samples = np.zeros(n_prompts * g, np.int32)
        live = np.zeros(n_prompts * g, bool)
        for p, (ids, item) in enumerate(zip(prompts, items)):
            ids = list(ids)[-bucket:]
            if ids:
                tokens[p, bucket - len(ids):] = ids
                positions[p, bucket - len(ids):] = np.arange(len(ids))
            h, first, count = item
            rows = slice(p * g, p * g + count)
            hashes[p * g:(p + 1) * g] = h
            samples[p * g:(p + 1) * g] = first + np.arange(g)
            live[rows] = True
        length = bucket + prog.sampling.max_new_tokens
        cache = self._decode_cache(n_prompts * g, length)
        args = (self._put(tokens, ("act_batch", None)), self._put(positions, ("act_batch", None)),
                self._put(hashes, ("act_batch",)), self._put(samples, ("act_batch",)),
                self._put(live, ("act_batch",)))
        ctx = use_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            cache, *result = self._fn(self.params, cache, *args, jnp.asarray(seed, jnp.int32),
                                      prog=prog)
        self._cache = cache
        return result

    # -- public

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, n: int = 1,
                 ids: Optional[Sequence[str]] = None, seed: int = 0,
                 progress: Optional[Callable[[int], None]] = None,
                 return_logits: bool = False) -> list[list[Generation]]:
        """n samples for each prompt (token ids, BOS included if wanted) -> [prompt][sample].

        `ids` (default: the prompt's index) and `seed` decide each sample's randomness, so the
        same (seed, id, sample) gives the same tokens in any batch. `progress(k)` is called as
        k more samples finish. `return_logits` (tests) also returns each step's logits."""
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        ids = [str(i) for i in range(len(prompts))] if ids is None else list(ids)
        if len(ids) != len(prompts):
            raise ValueError("ids and prompts differ in length")
        g = min(n, self.rows)
        per_batch = self.rows // g
        prog = self._program(sampling, g, return_logits)
        # work items: (bucket, prompt index, first sample, count), grouped by bucket
        work = []
        for i, p in enumerate(prompts):
            b = bucket_for(len(p), self.buckets)
            if len(p) > self.buckets[-1]:
                log.warning("prompt %s has %d tokens; keeping the last %d", ids[i], len(p), b)
            for first in range(0, n, g):
                work.append((b, i, first, min(g, n - first)))
        work.sort(key=lambda w: w[0])  # stable: dataset order within a bucket
        batches = []
        for b in sorted({w[0] for w in work}):
            items = [w for w in work if w[0] == b]
            batches += [(b, items[j:j + per_batch]) for j in range(0, len(items), per_batch)]

        results: list[list[Optional[Generation]]] = [[None] * n for _ in prompts]
        pending = None
        for batch in batches + [None]:
            launched = None
            if batch is not None:  # dispatch the next batch before reading the previous one
                b, items = batch
                launched = (items, self._launch([prompts[i] for _, i, _, _ in items], b,
                                                [(stable_hash(ids[i]), f, c) for _, i, f, c in items],
                                                prog, seed))
            if pending is not None:
                self._collect(pending, g, results, progress)
            pending = launched
        return results  # type: ignore[return-value]

    def _collect(self, pending, g: int, results, progress) -> None:
        items, (out, num, stopped, seen) = pending
        out, num, stopped = np.asarray(out), np.asarray(num), np.asarray(stopped)
        seen = None if seen is None else np.asarray(seen)
        done = 0
        for p, (_, i, first, count) in enumerate(items):
            for j in range(count):
                r = p * g + j
                toks = out[r, :num[r]].tolist()
                if stopped[r] and toks and toks[-1] in self.eos_ids:
                    toks = toks[:-1]
                results[i][first + j] = Generation(
                    toks, "stop" if stopped[r] else "length", int(num[r]),
                    None if seen is None else seen[r, :num[r]])
                done += 1
        if progress is not None:
            progress(done)


def parse_mesh(text: str) -> MeshConfig:
    """`--mesh data,fsdp,tensor` of the sampling commands."""
    try:
        d, f, t = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--mesh must be three integers data,fsdp,tensor, got {text!r}") from None
    return MeshConfig(data=d, fsdp=f, tensor=t)
