"""Orbax step checkpoints: a pytree of (sharded) arrays plus a JSON dict, kept last-N.

Each step is one Orbax checkpoint with two items: `state` (params, optimizer state, step,
PRNG key: anything `StandardSave` takes) and `meta` (JSON: data order and cursor, logged
metrics, config fingerprint). Saving is asynchronous: `save` returns once the arrays are
copied off the devices, and the files are written in the background (call `wait` before
relying on them). Orbax writes into a temporary directory and renames it when complete
(or marks completion on GCS), so a killed save never shows up as a step.

`restore_latest` walks back from the newest step: an unreadable checkpoint (corrupt or
partial files) is logged, moved aside to `<step>.corrupt`, and the previous one is tried.
Once a step's save is complete, `<step>.files.json` records the size of each of its files, so
a cut file is found by comparing sizes, before Orbax's reader (which reports it as asyncio
tracebacks) sees it.
Local and gs:// directories work alike.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from tpt_jax import distributed, io
from tpt_jax.gemma import manifest

log = logging.getLogger(__name__)


def _abs(directory: str) -> Any:
    return io.path(directory if io.is_remote(directory) else os.path.abspath(directory))


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)), tree)


class Checkpoints:
    """Step checkpoints in `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str, keep: Optional[int] = 2, async_save: bool = True):
        self.directory = _abs(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        distributed.barrier("tpt-checkpoints-open")  # Orbax's first sync is a gloo collective
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.wait()  # the previous save is complete (Orbax would wait here too) and recorded
        self._forget(step)
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state: Any, check: Optional[Callable[[dict], None]] = None
                       ) -> Optional[tuple[int, Any, dict]]:
        """(step, state, meta) of the newest readable checkpoint, or None if there is none.
        `check(meta)` may raise (e.g. a config mismatch): that is not treated as corruption."""
        for step in reversed(self.steps()):
            try:
                manifest.check(self.directory / str(step), self._sizes_file(step),
                               f"{self.directory}/{step}")
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # orbax/tensorstore raise many kinds on damaged files
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                log.warning("checkpoint step %d in %s is unreadable (%s); moving it aside and "
                            "falling back to the previous one", step, self.directory, reason)
                self._quarantine(step)
                continue
            if check is not None:
                check(meta)
            return step, state, meta
        return None

    def drop_after(self, step: int) -> None:
        """Delete steps newer than `step` (e.g. written by a run that is being replayed)."""
        for s in self.steps():
            if s > step:
                self.manager.delete(s)
                self._forget(s)

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{step}.corrupt"
            if dst.exists():
                dst.rmtree()
            if src.exists():
                src.rename(dst)
            self._forget(step)
        distributed.barrier(f"tpt-quarantine-{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._record_sizes()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # -- size manifests (process 0 writes them)

    def _sizes_file(self, step: int) -> Any:
        return self.directory / f"{step}.files.json"

    def _record_sizes(self) -> None:
        """A manifest for every finished step that has none; drop those of deleted steps."""
        if jax.process_index() != 0 or not self.directory.exists():
            return
        steps = set(self.steps())
        for step in steps:
            if not self._sizes_file(step).exists():
                manifest.write(self.directory / str(step), self._sizes_file(step))
        for p in self.directory.iterdir():
            name = p.name.removesuffix(".files.json")
            if p.name.endswith(".files.json") and name.isdigit() and int(name) not in steps:
                p.unlink()

    def _forget(self, step: int) -> None:
        if jax.process_index() == 0 and self._sizes_file(step).exists():
            self._sizes_file(step).unlink()
