"""The run directory: a lock, a state file of completed stages, and the config fingerprint.

`tpt run` may be killed at any moment. Each stage writes its artifacts atomically and only
then is marked done in state.json (also written atomically), so a rerun redoes at most the
stage that was interrupted. Only process 0 writes; a lock keeps two runs out of one directory.
`check_output` is the read-only half: `tpt run` calls it (and its set-up) before the RunDir is
entered, so a refused start writes nothing.
"""
from __future__ import annotations

import fcntl
import logging
import os
from typing import Any, Optional

import jax

from tpt_jax import io
from tpt_jax.config import TptError
from tpt_jax.config_io import fingerprint, to_dict

log = logging.getLogger(__name__)

STATE = "state.json"
CONFIG = "config.json"


# What a start leaves before its first stage begins; anything else means a stage began.
BOOKKEEPING = (CONFIG, STATE, ".lock")


def check_output(root: str, cfg: Any, force: bool = False) -> None:
    """Read-only: refuse, before anything is written, an output that is a file or not
    writable, a directory another run holds, or a different run that began a stage."""
    io.check_writable_dir(root, "--output")
    if not io.path(root).exists():
        return
    if jax.process_index() == 0:  # the lock is process 0's; the others would see it held
        _check_lock(root)
    _resolve_state(root, cfg, force)


def _check_lock(root: str) -> None:
    """Probe the lock a running `tpt run` holds, without creating or changing any file."""
    lock = os.path.join(root, ".lock")
    if io.is_remote(root) or not os.path.isfile(lock):
        return
    try:
        f = open(lock, "rb")
    except OSError as e:
        raise TptError(f"{lock}: cannot open the run's lock file ({e.strerror})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(root) from None
        fcntl.flock(f, fcntl.LOCK_UN)


def _in_use(root: str) -> TptError:
    return TptError(f"{root}: another tpt run is using this directory (lock "
                    f"{os.path.join(root, '.lock')} is held)")


def _began(root: str, state: dict) -> bool:
    """A stage finished (state.json) or started (any file besides the start's bookkeeping)."""
    if state["done"]:
        return True
    temporary = (f".{STATE}.tmp", f".{CONFIG}.tmp")  # atomic writes killed half-way
    return any(p.name not in BOOKKEEPING and not p.name.startswith(temporary)
               for p in io.path(root).iterdir())


def _resolve_state(root: str, cfg: Any, force: bool) -> dict:
    """The state this config continues from (a fresh one if there is none); a different
    config is refused unless nothing began, or `force`. Reads only."""
    fp = fingerprint(cfg)
    state_path = io.path(os.path.join(root, STATE))
    if not state_path.exists():
        return {"fingerprint": fp, "done": []}
    state = io.read_json(state_path, kind=None)
    if not isinstance(state, dict) or not isinstance(state.get("done"), list) \
            or not isinstance(state.get("info", {}), dict):
        raise TptError(f"{state_path}: not a tpt run state file")
    if state.get("fingerprint") != fp:
        if not _began(root, state):
            log.info("%s: no stage of the earlier start began; starting with this config", root)
        elif not force:
            raise TptError(
                f"{root} was started with a different config (fingerprint "
                f"{state.get('fingerprint')} != {fp}); use a new --output, or --force "
                f"to continue with the new config")
        else:
            log.warning("%s: config changed; continuing with the new one (--force)", root)
        state = {**state, "fingerprint": fp}
    return state


class RunDir:
    """Completed-stage bookkeeping for one run directory. Nothing is written until the `with`
    block is entered: then the lock is taken, the state read, and config and state written;
    the lock is held until the block (or the process) ends."""

    def __init__(self, root: str, cfg: Any, force: bool = False):
        self.root = str(root)
        self.cfg, self.force = cfg, force
        self.primary = jax.process_index() == 0
        self._lock_file = None
        self.state: dict = {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def __enter__(self) -> "RunDir":
        check_output(self.root, self.cfg, self.force)
        io.path(self.root).mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.state = _resolve_state(self.root, self.cfg, self.force)
            if self.primary:
                io.write_json_atomic(self.path(CONFIG), to_dict(self.cfg))
                io.write_json_atomic(self.path(STATE), self.state)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    # -- lock

    def _lock(self) -> None:
        if self.primary and not io.is_remote(self.root):
            self._lock_file = open(self.path(".lock"), "w")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                self._lock_file = None
                raise _in_use(self.root) from None

    def _unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- state

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
