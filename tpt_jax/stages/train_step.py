"""The compiled SFT step: AdamW with a warm-up + cosine schedule, gradient accumulation, and
`Stepper`, which holds the jitted train and eval steps for one model, config and mesh.

- Loss on the completion tokens (and the appended EOS) only, averaged over every trained
  token of the global batch; cross-entropy over vocabulary chunks (`tpt_jax.stages.loss`).
- AdamW with linear warm-up then cosine decay to 0 (HF `get_cosine_schedule_with_warmup`),
  global-norm clipping, no weight decay on parameters whose path contains a `no_decay` entry.
- Gradient accumulation: the global batch is split into `grad_accum` micro-batches, scanned
  inside the compiled step; gradients are summed and divided by the batch's trained tokens.
- One jitted step with the state donated; params and optimizer state sharded by TRAIN_RULES
  (FSDP over `fsdp`, tensor parallel over `tensor`), the batch over (`data`, `fsdp`).
  Compute dtype and parameter dtype come from the model (`make_model(cfg, "bfloat16",
  "float32")` = bf16 compute with f32 master weights and optimizer state).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tpt_jax.config import MeshConfig, TptError, TrainConfig
from tpt_jax.gemma.model import Gemma2, abstract_params, output_embedding, param_shardings
from tpt_jax.gemma.sharding import BATCH, TRAIN_RULES, make_mesh, mesh_axis_size, use_rules
from tpt_jax.stages import sft_data
from tpt_jax.stages.loss import chunked_cross_entropy

_STEPPERS: dict = {}


# ----------------------------------------------------------------------------- optimizer


def schedule_args(cfg: TrainConfig, total_steps: int) -> np.ndarray:
    """[peak lr, warm-up steps, total steps]: runtime inputs of the compiled step, so one
    compiled step serves every run length and learning rate."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return np.asarray([cfg.learning_rate, warmup, total_steps], np.float32)


def learning_rate(step, sched) -> jax.Array:
    """HF `get_cosine_schedule_with_warmup`: linear from 0 over `warmup` steps, then cosine
    to 0 at `total`; `step` counts completed optimizer steps (the first update uses step 0)."""
    peak, warmup, total = sched[0], sched[1], sched[2]
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / jnp.maximum(1.0, warmup)
    progress = jnp.clip((step - warmup) / jnp.maximum(1.0, total - warmup), 0.0, 1.0)
    return jnp.where(step < warmup, warm, peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """True where weight decay applies: paths containing none of the `no_decay` names."""
    def keep(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(n in name for n in no_decay)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig, params: Any) -> optax.GradientTransformation:
    """AdamW without its learning rate: clip -> Adam -> decoupled weight decay (masked); the
    step multiplies by -learning_rate(step), exactly `optax.adamw`'s order of operations."""
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, decay_mask(params, cfg.no_decay)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- the step


def default_mesh() -> Mesh:
    return make_mesh(MeshConfig())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh_axis_size(mesh, BATCH)


def check_batch(cfg: TrainConfig, mesh: Mesh) -> int:
    """Micro-batch rows; they must split evenly over the data-parallel devices."""
    if cfg.batch_size % cfg.grad_accum:
        raise TptError(f"train.batch_size ({cfg.batch_size}) must be divisible by "
                       f"train.grad_accum ({cfg.grad_accum})")
    micro = cfg.batch_size // cfg.grad_accum
    dp = data_parallel_size(mesh)
    if micro % dp:
        raise TptError(f"train micro-batch (batch_size {cfg.batch_size} / grad_accum "
                       f"{cfg.grad_accum} = {micro}) must be divisible by the data-parallel size "
                       f"mesh.data x mesh.fsdp = {dp}; change train.batch_size, train.grad_accum "
                       f"or the mesh")
    return micro


class Stepper:
    """Compiled train and eval steps for one model, mesh and the config fields that shape the
    program (`get` reuses them: later rounds and resumed runs do not recompile)."""

    def __init__(self, model: Gemma2, cfg: TrainConfig, mesh: Mesh):
        if cfg.remat != model.remat:
            model = model.clone(remat=cfg.remat)
        self.model, self.cfg, self.mesh = model, cfg, mesh
        abstract = abstract_params(model)
        self.tx = make_optimizer(cfg, abstract)
        self.param_sh = param_shardings(model, mesh, TRAIN_RULES)
        repl = NamedSharding(mesh, P())
        self.repl = repl
        opt_abstract = jax.eval_shape(self.tx.init, abstract)
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, self.param_sh,
                                       transform_non_params=lambda _: repl)
        self.state_sh = {"params": self.param_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
        skip = set() if cfg.pack else {"segments"}
        if not cfg.loss_bucket:
            skip.add("loss_pos")
        keys = tuple(k for k in sft_data.BATCH_KEYS if k not in skip)
        self.keys = keys
        self.batch_sh = {k: NamedSharding(mesh, P(None, BATCH, None)) for k in keys}
        self.eval_sh = {k: NamedSharding(mesh, P(BATCH, None)) for k in keys}
        # Traced (at the first call) inside `use_rules`, so the model's activation
        # constraints apply.
        self._train = jax.jit(self._step, in_shardings=(self.state_sh, self.batch_sh, repl),
                              out_shardings=(self.state_sh, repl), donate_argnums=0)
        self._eval = jax.jit(self._loss_sums, in_shardings=(self.param_sh, self.eval_sh),
                             out_shardings=repl)
        self._init = jax.jit(self._init_state, out_shardings=self.state_sh, static_argnums=2)

    # -- state
    def _init_state(self, params, seed, copy):
        if copy:  # the caller keeps its params: the donated state needs its own buffers
            params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        rng = jax.random.key_data(jax.random.key(seed))
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.int32(0),
                "rng": rng}

    def init_state(self, params: Any, seed: int, copy: bool = True) -> dict:
        params = jax.device_put(params, self.param_sh)
        return self._init(params, jnp.uint32(seed), copy)

    def abstract_state(self) -> Any:
        shapes = jax.eval_shape(lambda p: self._init_state(p, jnp.uint32(0), False),
                                abstract_params(self.model))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_sh)

    # -- math
    def _loss_sums(self, params, mb):
        hidden = self.model.apply({"params": params}, mb["tokens"], mb["positions"],
                                  mb.get("segments"), return_hidden=True)
        if "loss_pos" in mb:  # only the trained positions reach the vocabulary projection
            hidden = jnp.take_along_axis(hidden, mb["loss_pos"][..., None], axis=1)
        ce = chunked_cross_entropy(hidden, output_embedding(params, self.model.cfg), mb["targets"],
                                   self.model.cfg, self.cfg.loss_chunk)
        w = mb["weights"]
        return jnp.sum(jnp.where(w > 0, ce, 0.0) * w), jnp.sum(w)

    @classmethod
    def get(cls, model: Gemma2, cfg: TrainConfig, mesh: Mesh) -> "Stepper":
        key = (model.cfg, str(model.dtype), str(model.param_dtype), cfg.remat, mesh,
               cfg.grad_accum, cfg.loss_chunk, cfg.pack, cfg.loss_bucket > 0, cfg.clip_norm,
               cfg.weight_decay, tuple(cfg.no_decay))
        if key not in _STEPPERS:
            _STEPPERS[key] = cls(model, cfg, mesh)
        return _STEPPERS[key]

    def _step(self, state, batch, sched):
        params = state["params"]
        grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)

        def micro(mb):
            (loss, weight), grads = grad_fn(params, mb)
            return loss, weight, grads

        if batch["tokens"].shape[0] == 1:
            loss, weight, grads = micro(jax.tree.map(lambda x: x[0], batch))
        else:
            def body(carry, mb):
                loss, weight, grads = micro(mb)
                acc = jax.tree.map(jnp.add, carry[2], grads)
                acc = jax.lax.with_sharding_constraint(acc, self.param_sh)
                return (carry[0] + loss, carry[1] + weight, acc), None
            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, weight, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), batch)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        lr = learning_rate(state["step"], sched)
        updates = jax.tree.map(lambda u: (-lr).astype(u.dtype) * u, updates)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
               "step": state["step"] + 1,
               "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])}
        metrics = {"loss": loss / denom, "tokens": weight, "grad_norm": optax.tree.norm(grads),
                   "lr": lr}
        return new, metrics

    # -- calls
    def _put(self, arrays: dict, shardings: dict) -> dict:
        return {k: jax.make_array_from_callback(arrays[k].shape, shardings[k],
                                                lambda idx, a=arrays[k]: a[idx]) for k in self.keys}

    def train_step(self, state: dict, batch: dict, sched: np.ndarray) -> tuple[dict, dict]:
        """`batch`: numpy arrays [batch_size, T]; `sched`: `schedule_args(...)`. Returns (new
        state, device metrics); the old state is donated."""
        A = self.cfg.grad_accum
        split = {k: batch[k].reshape(A, -1, *batch[k].shape[1:]) for k in self.keys}
        with use_rules(self.mesh, TRAIN_RULES):
            return self._train(state, self._put(split, self.batch_sh), sched)

    def eval_sums(self, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        with use_rules(self.mesh, TRAIN_RULES):
            return self._eval(params, self._put(batch, self.eval_sh))
