"""Train: supervised fine-tuning on pruned examples, sharded, resumable to the bit.

    params, metrics = train(params, model, tokenizer, examples, cfg, out_dir, mesh)

The compiled step (loss, AdamW, gradient accumulation, shardings) is `train_step.Stepper`;
this module runs it: `Trainer` prepares the data and its order, restores or initialises the
state, and then steps, evaluates, checkpoints and logs, one named method each.

Orbax checkpoints (`tpt_jax.gemma.checkpoint`) in `out_dir/checkpoints` hold the state (params,
optimizer state, step, PRNG key) and the data order, cursor, logged metrics and a fingerprint
of config + data; a run restarted with the same inputs resumes from the newest readable
checkpoint and ends with the same bits. `out_dir/best` keeps the params with the lowest eval
loss.
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
import numpy as np
from jax.sharding import Mesh

from tpt_jax import faults, io
from tpt_jax.config import TptError, TrainConfig
from tpt_jax.gemma.checkpoint import Checkpoints, abstract_like
from tpt_jax.gemma.model import Gemma2
from tpt_jax.gemma.tokenizer import check_vocab
from tpt_jax.stages import sft_data
from tpt_jax.stages.train_step import Stepper, check_batch, default_mesh, schedule_args

log = logging.getLogger(__name__)

# Fields that change neither the math nor the data order: a resume may change them.
_RESUME_FREE = ("keep_checkpoints", "save_every", "log_every", "async_checkpoint")


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
    trainer = Trainer(model, tokenizer, examples, cfg, out_dir, mesh or default_mesh(),
                      eval_examples, label)
    trainer.restore_or_init(params, donate)
    del params
    return trainer.run(stop_at, tracker or _NoTracker(), progress)


class Trainer:
    """One `train` call: its encoded data and order, compiled step, checkpoints, and the record
    that the checkpoints carry (history, evals, best)."""

    def __init__(self, model: Gemma2, tokenizer, examples: Sequence[dict], cfg: TrainConfig,
                 out_dir: str, mesh: Mesh, eval_examples: Optional[Sequence[dict]], label: str):
        self.cfg, self.label = cfg, label
        check_vocab(tokenizer, model.cfg.vocab_size)
        self.prepare_data(tokenizer, list(examples), eval_examples)
        self.orders = [sft_data.epoch_order(len(self.train_enc), cfg.seed, e)
                       for e in range(sft_data.num_epoch_orders(cfg.epochs))]
        self.plan = self.make_plan()
        self.total = len(self.plan)
        self.micro = check_batch(cfg, mesh)
        self.stepper = Stepper.get(model, cfg, mesh)
        self.sched = schedule_args(cfg, self.total)
        self.fingerprint = _fingerprint(cfg, model, sft_data.data_digest(self.train_enc),
                                        sft_data.data_digest(self.eval_enc))
        self.root = io.path(out_dir)
        self.ckpts = Checkpoints(str(self.root / "checkpoints"), keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoint)
        self.best_ckpts = Checkpoints(str(self.root / "best"), keep=1,
                                      async_save=cfg.async_checkpoint)

    # -- data
    def prepare_data(self, tokenizer, examples: list, eval_examples: Optional[Sequence[dict]]):
        """Hold out the eval split (unless given), tokenize both, and say what was cut."""
        cfg = self.cfg
        if eval_examples is None:
            examples, eval_examples = sft_data.split_eval(examples, cfg.eval_fraction, cfg.seed)
        self.train_enc, self.stats = sft_data.encode_examples(tokenizer, examples, cfg.max_length)
        self.eval_enc, self.eval_stats = sft_data.encode_examples(tokenizer, list(eval_examples),
                                                                  cfg.max_length)
        stats = self.stats
        if not self.train_enc:
            raise TptError(f"no training examples with a trainable completion (of {len(examples)} "
                           f"given, {stats.no_target} had none left within max_length "
                           f"{cfg.max_length})")
        if stats.truncated:
            log.warning("%d of %d training examples longer than max_length %d were truncated "
                        "(their EOS is cut off)", stats.truncated, len(examples), cfg.max_length)
        if stats.no_target:
            log.warning("%d training examples left out: no completion token within max_length %d",
                        stats.no_target, cfg.max_length)
        self.lengths = sft_data.lengths_of(self.train_enc)

    def make_plan(self) -> list:
        """Each step's rows, from the epoch orders (fresh, or the ones a checkpoint kept)."""
        cfg = self.cfg
        return sft_data.make_plan(self.orders, self.lengths, cfg.batch_size, cfg.pack,
                                  cfg.max_length, cfg.epochs)

    def eval_batches(self) -> list[dict]:
        cfg, lengths = self.cfg, sft_data.lengths_of(self.eval_enc)
        return [sft_data.build_batch(b, self.eval_enc, self.micro, sft_data.row_length(
                    b, lengths, False, cfg.max_length, cfg.length_bucket), 0, cfg.loss_bucket)
                for b in sft_data.eval_plan(len(self.eval_enc), self.micro)]

    # -- state
    def restore_or_init(self, params: Any, donate: bool) -> None:
        """The newest checkpoint of this config and data, with its order and record; else a
        fresh state from `params`."""
        restored = self.ckpts.restore_latest(self.stepper.abstract_state(), self.check_fingerprint)
        if restored is not None:
            self.start, self.state, meta = restored
            self.orders = [np.asarray(o, np.int64) for o in meta["orders"]]
            self.plan = self.make_plan()
            self.history, self.evals, self.best = meta["history"], meta["evals"], meta["best"]
            self.best_ckpts.drop_after(self.start)
            log.info("resumed from %s/checkpoints step %d of %d", self.root, self.start,
                     self.total)
        else:
            self.start, self.history, self.evals = 0, [], []
            self.best = {"step": None, "eval_loss": None}
            self.state = self.stepper.init_state(params, self.cfg.seed, copy=not donate)

    def check_fingerprint(self, meta: dict) -> None:
        if meta.get("fingerprint") != self.fingerprint:
            raise TptError(f"{self.root}/checkpoints holds a run with a different train config or "
                           f"data (fingerprint {meta.get('fingerprint')} != {self.fingerprint}); "
                           f"use a new output directory or the same inputs")

    # -- the loop
    def run(self, stop_at: Optional[int], tracker, progress: bool) -> tuple[Any, dict]:
        cfg, total = self.cfg, self.total
        eval_batches = self.eval_batches()
        pending, self.t0, self.tokens_seen = [], time.perf_counter(), 0
        end = total if stop_at is None else min(total, stop_at)
        step = self.start
        tracker.begin(self.start, total)
        bar = progress_bar(self.label, self.start, total, progress)
        try:
            for step in range(self.start + 1, end + 1):
                pending.append((step, self.train_step(step)))
                faults.point("step")
                bar.update(1)
                last = step == end
                if step % cfg.log_every == 0 or last or _every(cfg.eval_every, step) \
                        or _every(cfg.save_every, step):
                    self.log_metrics(pending, tracker, bar)
                    pending = []
                if eval_batches and (_every(cfg.eval_every, step) or step == total):
                    self.evaluate(step, eval_batches)
                if last or _every(cfg.save_every, step):
                    self.checkpoint(step)
                    tracker.flush()
        finally:
            bar.close()
            tracker.close()
        return self.finish(step, time.perf_counter() - self.t0)

    def train_step(self, step: int) -> dict:
        """One optimizer step on plan row `step`; returns its metrics, still on the device."""
        cfg, rows = self.cfg, self.plan[step - 1]
        length = sft_data.row_length(rows, self.lengths, cfg.pack, cfg.max_length,
                                     cfg.length_bucket)
        batch = sft_data.build_batch(rows, self.train_enc, cfg.batch_size, length, 0,
                                     cfg.loss_bucket)
        self.tokens_seen += int(batch["weights"].sum())
        self.state, metrics = self.stepper.train_step(self.state, batch, self.sched)
        return metrics

    def log_metrics(self, pending: list, tracker, bar) -> None:
        """Fetch the pending steps' metrics to the host, stop on a non-finite one, and report
        them with the trained tokens/s so far."""
        fetched = _host_metrics(pending)
        self.history.extend(fetched)
        self.stop_if_not_finite(fetched)
        rate = self.tokens_seen / max(1e-9, time.perf_counter() - self.t0)
        for h in fetched:
            tracker.step(h["step"], {**h, "tokens_per_s": rate})
        _report(bar, self.history[-1], self.total, rate)

    def evaluate(self, step: int, batches: list[dict]) -> None:
        """Eval loss of the current params; the best so far is saved to `out_dir/best`."""
        sums = [self.stepper.eval_sums(self.state["params"], b) for b in batches]
        loss_sum, weight = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        value = loss_sum / max(weight, 1.0)
        self.evals.append({"step": step, "eval_loss": value})
        log.info("step %d/%d eval loss %.4f", step, self.total, value)
        if self.best["eval_loss"] is None or value < self.best["eval_loss"]:
            self.best.update(step=step, eval_loss=value)
            self.best_ckpts.save(step, {"params": self.state["params"]},
                                 {"step": step, "eval_loss": value})

    def checkpoint(self, step: int) -> None:
        meta = {"fingerprint": self.fingerprint, "step": step, "total_steps": self.total,
                "orders": [o.tolist() for o in self.orders], "cursor": step,
                "history": self.history, "evals": self.evals, "best": self.best,
                "stats": self.stats.to_json()}
        self.ckpts.save(step, self.state, meta)
        faults.point("ckpt-save")  # the async save is in flight here
        _write_log(self.root, self.history, self.evals)

    def stop_if_not_finite(self, fetched: list[dict]) -> None:
        bad = next((h for h in fetched if not (math.isfinite(h["loss"])
                                               and math.isfinite(h["grad_norm"]))), None)
        if bad is None:
            return
        self.ckpts.wait()
        self.best_ckpts.wait()
        good = self.ckpts.steps()
        self.ckpts.close()
        self.best_ckpts.close()
        raise TptError(f"{self.label}: loss {bad['loss']} (grad_norm {bad['grad_norm']}) at step "
                       f"{bad['step']} of {self.total}; stopped without saving that state; the "
                       f"last good checkpoint is " + (f"step {good[-1]} in {self.root}/checkpoints"
                                                      if good else "none (no step was saved)")
                       + "; lower train.learning_rate or set train.clip_norm")

    def finish(self, final_step: int, elapsed: float) -> tuple[Any, dict]:
        """Wait for the saves; the best params when asked for and training ran to the end;
        the metrics, also written to `out_dir/train_metrics.json`."""
        self.ckpts.wait()
        self.best_ckpts.wait()
        params, best = self.state["params"], self.best
        if self.cfg.use_best and best["step"] is not None and best["step"] != final_step \
                and final_step == self.total:
            restored_best = self.best_ckpts.restore_latest({"params": abstract_like(params)})
            if restored_best is not None:
                log.info("returning the params of step %d (best eval loss %.4f)", best["step"],
                         best["eval_loss"])
                params = restored_best[1]["params"]
        self.ckpts.close()
        self.best_ckpts.close()
        history = self.history
        metrics = {
            "steps": final_step, "total_steps": self.total, "resumed_from": self.start,
            "losses": [h["loss"] for h in history], "history": history, "evals": self.evals,
            "final_loss": history[-1]["loss"] if history else None,
            "best_step": best["step"], "best_eval_loss": best["eval_loss"],
            "examples": self.stats.to_json(), "eval_examples": self.eval_stats.examples,
            "train_seconds": elapsed,
            "trained_tokens_per_s": self.tokens_seen / max(elapsed, 1e-9),
            "fingerprint": self.fingerprint,
        }
        if jax.process_index() == 0:
            io.write_json_atomic(self.root / "train_metrics.json",
                                 {k: v for k, v in metrics.items() if k != "history"})
        return params, metrics


def _every(n: int, step: int) -> bool:
    """`train.eval_every` / `save_every`: 0 is never."""
    return bool(n) and step % n == 0


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
