"""Experiment tracking: TensorBoard event files (tensorboardX) in the run dir, and W&B.

    tracker = Tracker(run_dir, cfg.tracking, config=to_dict(cfg))
    train.train(..., tracker=tracker.train(r))   # per-step loss, lr, grad norm, tokens/s
    tracker.round_end(record)                    # pass@1, pass@k, coverage, kept examples, ...
    tracker.close()

Each train stage writes its own TensorBoard run (`tb/rNN`, tag `train/loss`, ...; the rounds
overlay in one chart), the round records `tb/rounds` (tag `round/pass_at_1`, step = round). A
writer is opened with `purge_step` at the step it resumes from, so TensorBoard drops whatever a
killed run wrote past its last checkpoint: a resumed run neither duplicates nor loses steps.
W&B, when `tracking.wandb_project` is set and `wandb` imports, gets the same values (one W&B
run per run dir, resumed by the id kept in `wandb_id`). Only process 0 writes anything.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional

import jax

from tpt_jax import io
from tpt_jax.config import TrackingConfig

log = logging.getLogger(__name__)

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s")


def _writer(logdir: str, purge_step: int):
    """A new event file in `logdir`; its name ends in the time in ns, so files of two writers
    opened in the same second still sort (and purge) in the order they were written."""
    from tensorboardX import SummaryWriter
    return SummaryWriter(logdir, purge_step=purge_step, flush_secs=30,
                         filename_suffix=f".{time.time_ns()}")


def tb_tag(name: str) -> str:
    """TensorBoard tags allow no '@': `pass@1` -> `pass_at_1` (W&B keeps the record's names)."""
    return name.replace("@", "_at_")


class TrainTracker:
    """Per-step scalars of one train stage; every method is a no-op when nothing is enabled."""

    def __init__(self, logdir: Optional[str] = None, wandb_run: Any = None, prefix: str = "train"):
        self.logdir, self.wandb, self.prefix = logdir, wandb_run, prefix
        self.writer = None

    def begin(self, start: int, total: int) -> None:
        """Called once before the first step; `start` = steps already done (a resume)."""
        if self.logdir is not None:
            self.writer = _writer(self.logdir, start + 1)
        if self.wandb is not None:
            self.wandb.define_metric(f"{self.prefix}/*", step_metric=f"{self.prefix}/step")

    def step(self, step: int, metrics: dict) -> None:
        values = {k: float(metrics[k]) for k in TRAIN_KEYS if k in metrics}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{self.prefix}/{k}": v for k, v in values.items()}
                           | {f"{self.prefix}/step": step})

    def flush(self) -> None:
        """At each checkpoint: what was logged up to it survives a kill."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def numeric_fields(record: dict, prefix: str = "") -> dict:
    """Flattened numbers of a round record ({"wall_s": {"think": 3}} -> {"wall_s/think": 3})."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(numeric_fields(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


class Tracker:
    """A run's tracking: `train(round)` for each train stage, `round_end(record)` per round."""

    def __init__(self, run_dir: str, cfg: Optional[TrackingConfig] = None,
                 config: Optional[dict] = None):
        cfg = cfg or TrackingConfig()
        main = jax.process_index() == 0
        self.tb = os.path.join(str(run_dir), "tb") if main and cfg.tensorboard else None
        self.wandb = _wandb_run(run_dir, cfg, config) if main and cfg.wandb_project else None
        self.rounds = None

    def train(self, r: Optional[int] = None) -> TrainTracker:
        """Round r's train stage (`tb/rNN`); r=None: the only one (`tpt train`: `tb/`)."""
        name = f"r{r:02d}" if r is not None else ""
        logdir = os.path.join(self.tb, name) if self.tb else None
        return TrainTracker(logdir, self.wandb, prefix=f"{name}/train".lstrip("/"))

    def round_end(self, record: dict) -> None:
        """One round's record (metrics.json's); the first call opens the writer at its round,
        so records a rerun emits again replace the earlier ones."""
        r = int(record["round"])
        values = {k: v for k, v in numeric_fields(record).items() if k != "round"}
        if self.tb is not None:
            if self.rounds is None:
                self.rounds = _writer(os.path.join(self.tb, "rounds"), r)
            for k, v in values.items():
                self.rounds.add_scalar(f"round/{tb_tag(k)}", v, r)
            self.rounds.flush()
        if self.wandb is not None:
            self.wandb.log({f"round/{k}": v for k, v in values.items()} | {"round": r})

    def close(self) -> None:
        if self.rounds is not None:
            self.rounds.close()
            self.rounds = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(run_dir: str, cfg: TrackingConfig, config: Optional[dict]):
    """A W&B run resumed across restarts of the same run dir (its id is kept in `wandb_id`)."""
    try:
        import wandb
    except ImportError:
        log.warning("tracking.wandb_project is %r but wandb is not installed (pip install "
                    "wandb); logging to TensorBoard only", cfg.wandb_project)
        return None
    id_file = io.path(run_dir) / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    io.write_text_atomic(id_file, run_id)
    local = str(run_dir) if not io.is_remote(run_dir) else None
    run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, id=run_id,
                     resume="allow", name=os.path.basename(str(run_dir).rstrip("/")),
                     config=config, dir=local)
    run.define_metric("round/*", step_metric="round")
    return run
