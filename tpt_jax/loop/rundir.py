"""The run directory: a lock, a state file of completed stages, and the config fingerprint.

`tpt run` may be killed at any moment. Each stage writes its artifacts atomically and only
then is marked done in state.json (also written atomically), so a rerun redoes at most the
stage that was interrupted. Only process 0 writes; a lock keeps two runs out of one directory.
"""
from __future__ import annotations

import fcntl
import logging
import os
from typing import Any, Optional

import jax

from tpt_jax import io
from tpt_jax.config import TptError, fingerprint, to_dict

log = logging.getLogger(__name__)

STATE = "state.json"
CONFIG = "config.json"


class RunDir:
    """Completed-stage bookkeeping for one run directory. The lock is taken before the state
    is read or written, and held until the `with` block (or the process) ends."""

    def __init__(self, root: str, cfg: Any, force: bool = False):
        self.root = str(root)
        self.primary = jax.process_index() == 0
        self._lock_file = None
        io.path(self.root).mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.state = self._load(cfg, force)
        except BaseException:
            self._unlock()
            raise

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # -- lock

    def _lock(self) -> None:
        if self.primary and not io.is_remote(self.root):
            self._lock_file = open(self.path(".lock"), "w")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                self._lock_file = None
                raise TptError(f"{self.root}: another tpt run is using this directory "
                               f"(lock {self.path('.lock')} is held)") from None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- state

    def _load(self, cfg: Any, force: bool) -> dict:
        fp = fingerprint(cfg)
        state_path = io.path(self.path(STATE))
        if not state_path.exists():
            state = {"fingerprint": fp, "done": []}
        else:
            state = io.read_json(state_path)
            if not isinstance(state, dict) or not isinstance(state.get("done"), list):
                raise TptError(f"{state_path}: not a tpt run state file")
            if state.get("fingerprint") != fp:
                if not force:
                    raise TptError(
                        f"{self.root} was started with a different config (fingerprint "
                        f"{state.get('fingerprint')} != {fp}); use a new --output, or --force "
                        f"to continue with the new config")
                log.warning("%s: config changed; continuing with the new one (--force)", self.root)
                state["fingerprint"] = fp
        if self.primary:
            io.write_json_atomic(self.path(CONFIG), to_dict(cfg))
            io.write_json_atomic(state_path, state)
        return state

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def mark(self, stage: str, **info: Any) -> None:
        if stage not in self.state["done"]:
            self.state["done"].append(stage)
        if info:
            self.state.setdefault("info", {})[stage] = info
        if self.primary:
            io.write_json_atomic(self.path(STATE), self.state)

    def info(self, stage: str) -> Optional[dict]:
        return self.state.get("info", {}).get(stage)
