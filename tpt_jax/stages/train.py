"""Train: supervised fine-tuning on pruned examples, sharded, resumable to the bit.

    params, metrics = train(params, model, tokenizer, examples, cfg, out_dir, mesh)

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
- Orbax checkpoints (`tpt_jax.gemma.checkpoint`) in `out_dir/checkpoints` hold the state (params,
  optimizer state, step, PRNG key) and the data order, cursor, logged metrics and a
  fingerprint of config + data; a run restarted with the same inputs resumes from the
  newest readable checkpoint and ends with the same bits. `out_dir/best` keeps the params
  with the lowest eval loss.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tpt_jax import faults, io
from tpt_jax.stages import sft_data
from tpt_jax.gemma.checkpoint import Checkpoints, abstract_like
from tpt_jax.config import MeshConfig, TptError, TrainConfig
from tpt_jax.stages.loss import chunked_cross_entropy
from tpt_jax.gemma.model import Gemma2, abstract_params, param_shardings
from tpt_jax.gemma.sharding import BATCH, TRAIN_RULES, make_mesh, mesh_axis_size, use_rules

log = logging.getLogger(__name__)

# Fields that change neither the math nor the data order: a resume may change them.
_RESUME_FREE = ("keep_checkpoints", "save_every", "log_every", "async_checkpoint")
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
        ce = chunked_cross_entropy(hidden, params["embedding"], mb["targets"], self.model.cfg,
                                   self.cfg.loss_chunk)
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


# ----------------------------------------------------------------------------- the loop


def _fingerprint(cfg: TrainConfig, model: Gemma2, digest: str, eval_digest: str) -> str:
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE}
    blob = json.dumps({"train": train, "model": dataclasses.asdict(model.cfg),
                       "dtype": str(model.dtype), "param_dtype": str(model.param_dtype),
                       "data": digest, "eval": eval_digest}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _host_metrics(pending: list) -> list[dict]:
    out = []
    for step, m in jax.device_get(pending):
        out.append({"step": step, **{k: float(v) for k, v in m.items()}})
    return out


def train(params: Any, model: Gemma2, tokenizer, examples: Sequence[dict], cfg: TrainConfig,
          out_dir: str, mesh: Optional[Mesh] = None, eval_examples: Optional[Sequence[dict]] = None,
          *, donate: bool = False, stop_at: Optional[int] = None, label: str = "train",
          tracker: Any = None, progress: bool = True) -> tuple[Any, dict]:
    """Fine-tune `params` on `examples` (records with `prompt` and `completion`).

    Resumes from `out_dir/checkpoints` when it holds a checkpoint of the same config and data
    (then `params` only serves as the shape template). `eval_examples`, or else an
    `eval_fraction` slice held out of `examples`, is scored every `eval_every` steps and at the
    end. Returns (params, metrics): the best-by-eval-loss params when `use_best` and an eval
    set exist, else the final ones. `donate=True` lets training consume the caller's `params`
    buffers; `stop_at=k` checkpoints after step k and returns (a planned interruption).
    `tracker` (`tpt_jax.loop.tracking.TrainTracker`) gets every step's metrics; `progress`
    shows a progress bar on a terminal (the step log lines when there is none).

    A non-finite loss or gradient norm (seen on the host at each log, eval or save point,
    always before a save) stops training with a TptError naming `label` and the step; the
    bad state is never saved, so the newest checkpoint stays the last good one."""
    mesh = mesh or default_mesh()
    _check_vocab(tokenizer, model.cfg.vocab_size)
    examples = list(examples)
    if eval_examples is None:
        examples, eval_examples = sft_data.split_eval(examples, cfg.eval_fraction, cfg.seed)
    train_enc, stats = sft_data.encode_examples(tokenizer, examples, cfg.max_length)
    eval_enc, eval_stats = sft_data.encode_examples(tokenizer, list(eval_examples), cfg.max_length)
    if not train_enc:
        raise TptError(f"no training examples with a trainable completion (of {len(examples)} "
                       f"given, {stats.no_target} had none left within max_length "
                       f"{cfg.max_length})")
    if stats.truncated:
        log.warning("%d of %d training examples longer than max_length %d were truncated "
                    "(their EOS is cut off)", stats.truncated, len(examples), cfg.max_length)
    if stats.no_target:
        log.warning("%d training examples left out: no completion token within max_length %d",
                    stats.no_target, cfg.max_length)

    lengths = sft_data.lengths_of(train_enc)
    orders = [sft_data.epoch_order(len(train_enc), cfg.seed, e)
              for e in range(sft_data.num_epoch_orders(cfg.epochs))]
    plan = sft_data.make_plan(orders, lengths, cfg.batch_size, cfg.pack, cfg.max_length, cfg.epochs)
    total = len(plan)
    micro = check_batch(cfg, mesh)
    stepper = Stepper.get(model, cfg, mesh)
    sched = schedule_args(cfg, total)
    fp = _fingerprint(cfg, model, sft_data.data_digest(train_enc), sft_data.data_digest(eval_enc))

    root = io.path(out_dir)
    ckpts = Checkpoints(str(root / "checkpoints"), keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoint)
    best_ckpts = Checkpoints(str(root / "best"), keep=1, async_save=cfg.async_checkpoint)

    def check(meta):
        if meta.get("fingerprint") != fp:
            raise TptError(f"{root}/checkpoints holds a run with a different train config or "
                           f"data (fingerprint {meta.get('fingerprint')} != {fp}); use a new "
                           f"output directory or the same inputs")

    restored = ckpts.restore_latest(stepper.abstract_state(), check)
    if restored is not None:
        start, state, meta = restored
        orders = [np.asarray(o, np.int64) for o in meta["orders"]]
        plan = sft_data.make_plan(orders, lengths, cfg.batch_size, cfg.pack, cfg.max_length,
                                  cfg.epochs)
        history, evals = meta["history"], meta["evals"]
        best = meta["best"]
        best_ckpts.drop_after(start)
        log.info("resumed from %s/checkpoints step %d of %d", root, start, total)
    else:
        start, history, evals, best = 0, [], [], {"step": None, "eval_loss": None}
        state = stepper.init_state(params, cfg.seed, copy=not donate)
    del params

    eval_lengths = sft_data.lengths_of(eval_enc)
    eval_batches = [
        sft_data.build_batch(b, eval_enc, micro, sft_data.row_length(
            b, eval_lengths, False, cfg.max_length, cfg.length_bucket), 0, cfg.loss_bucket)
        for b in sft_data.eval_plan(len(eval_enc), micro)]

    def run_eval(step):
        sums = [stepper.eval_sums(state["params"], b) for b in eval_batches]
        loss_sum, weight = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        value = loss_sum / max(weight, 1.0)
        evals.append({"step": step, "eval_loss": value})
        log.info("step %d/%d eval loss %.4f", step, total, value)
        if best["eval_loss"] is None or value < best["eval_loss"]:
            best.update(step=step, eval_loss=value)
            best_ckpts.save(step, {"params": state["params"]}, {"step": step, "eval_loss": value})

    def save(step):
        meta = {"fingerprint": fp, "step": step, "total_steps": total,
                "orders": [o.tolist() for o in orders], "cursor": step, "history": history,
                "evals": evals, "best": best, "stats": stats.to_json()}
        ckpts.save(step, state, meta)
        faults.point("ckpt-save")  # the async save is in flight here
        _write_log(root, history, evals)

    def stop_if_not_finite(fetched: list[dict]) -> None:
        bad = next((h for h in fetched if not (math.isfinite(h["loss"])
                                               and math.isfinite(h["grad_norm"]))), None)
        if bad is None:
            return
        ckpts.wait()
        best_ckpts.wait()
        good = ckpts.steps()
        ckpts.close()
        best_ckpts.close()
        raise TptError(f"{label}: loss {bad['loss']} (grad_norm {bad['grad_norm']}) at step "
                       f"{bad['step']} of {total}; stopped without saving that state; the last "
                       f"good checkpoint is " + (f"step {good[-1]} in {root}/checkpoints" if good
                                                 else "none (no step was saved)")
                       + "; lower train.learning_rate or set train.clip_norm")

    pending, t0, tokens_seen = [], time.perf_counter(), 0
    end = total if stop_at is None else min(total, stop_at)
    step = start
    tracker = tracker or _NoTracker()
    tracker.begin(start, total)
    bar = progress_bar(label, start, total, progress)
    try:
        for step in range(start + 1, end + 1):
            batch_rows = plan[step - 1]
            length = sft_data.row_length(batch_rows, lengths, cfg.pack, cfg.max_length,
                                         cfg.length_bucket)
            batch = sft_data.build_batch(batch_rows, train_enc, cfg.batch_size, length, 0,
                                         cfg.loss_bucket)
            tokens_seen += int(batch["weights"].sum())
            state, metrics = stepper.train_step(state, batch, sched)
            pending.append((step, metrics))
            faults.point("step")
            bar.update(1)
            last = step == end
            if step % cfg.log_every == 0 or last or (cfg.eval_every and step % cfg.eval_every == 0) \
                    or (cfg.save_every and step % cfg.save_every == 0):
                fetched = _host_metrics(pending)
                history.extend(fetched)
                pending = []
                stop_if_not_finite(fetched)
                rate = tokens_seen / max(1e-9, time.perf_counter() - t0)
                for h in fetched:
                    tracker.step(h["step"], {**h, "tokens_per_s": rate})
                _report(bar, history[-1], total, rate)
            if eval_batches and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                run_eval(step)
            if last or (cfg.save_every and step % cfg.save_every == 0):
                save(step)
                tracker.flush()
    finally:
        bar.close()
        tracker.close()
    elapsed = time.perf_counter() - t0
    ckpts.wait()
    best_ckpts.wait()

    params = state["params"]
    final_step = step
    if cfg.use_best and best["step"] is not None and best["step"] != final_step \
            and final_step == total:
        restored_best = best_ckpts.restore_latest({"params": abstract_like(params)})
        if restored_best is not None:
            log.info("returning the params of step %d (best eval loss %.4f)", best["step"],
                     best["eval_loss"])
            params = restored_best[1]["params"]
    ckpts.close()
    best_ckpts.close()
    metrics = {
        "steps": final_step, "total_steps": total, "resumed_from": start,
        "losses": [h["loss"] for h in history], "history": history, "evals": evals,
        "final_loss": history[-1]["loss"] if history else None,
        "best_step": best["step"], "best_eval_loss": best["eval_loss"],
        "examples": stats.to_json(), "eval_examples": eval_stats.examples,
        "train_seconds": elapsed, "trained_tokens_per_s": tokens_seen / max(elapsed, 1e-9),
        "fingerprint": fp,
    }
    if jax.process_index() == 0:
        io.write_json_atomic(root / "train_metrics.json", {k: v for k, v in metrics.items()
                                                           if k != "history"})
    return params, metrics


class _NoTracker:
    """`train(tracker=None)`: the TrainTracker interface, doing nothing."""

    def begin(self, start: int, total: int) -> None: ...

    def step(self, step: int, metrics: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def progress_bar(label: str, start: int, total: int, show: bool = True):
    """Steps done / total, loss, tokens/s and ETA, like Think's bar; off with `show=False`, on
    processes other than 0 and when stderr is not a terminal (tqdm's `disable=None`)."""
    from tqdm.auto import tqdm
    off = True if not show or jax.process_index() != 0 else None
    return tqdm(total=total, initial=start, unit="step", desc=label, dynamic_ncols=True,
                disable=off)


def _report(bar, h: dict, total: int, rate: float) -> None:
    """The latest logged step: on the bar when it shows, else as a log line."""
    if not bar.disable:
        bar.set_postfix(loss=f"{h['loss']:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        return
    log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g (%.0f trained tokens/s)",
             h["step"], total, h["loss"], h["lr"], h["grad_norm"], rate)


def _write_log(root, history: list, evals: list) -> None:
    if jax.process_index() != 0:
        return
    rows = sorted(history + evals, key=lambda r: (r["step"], "eval_loss" in r))
    io.write_jsonl_atomic(root / "train_log.jsonl", rows)


def _check_vocab(tokenizer, vocab_size: int) -> None:
    try:
        from tpt_jax.gemma.tokenizer import check_vocab
    except ImportError:
        return
    check_vocab(tokenizer, vocab_size)
