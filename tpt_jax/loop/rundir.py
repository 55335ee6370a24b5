"""The run directory: a lock, a state file of completed stages, and the config fingerprint.

`tpt run` may be killed at any moment. Each stage writes its artifacts atomically and only
then is marked done in state.json (also written atomically), so a rerun redoes at most the
stage that was interrupted. Only process 0 writes; a lock keeps two runs out of one directory.
A stage is marked with the sizes of the files it left: a rerun finds a damaged one (a copy cut
short, a disk error) before it writes anything, and runs that stage again.
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
from tpt_jax.config_io import dict_fingerprint, fingerprint, to_dict
from tpt_jax.gemma import manifest

log = logging.getLogger(__name__)

STATE = "state.json"
CONFIG = "config.json"
METRICS = "metrics.json"

# What each stage leaves, under its round's folder (export: under the run directory). Their
# sizes are recorded with the stage in state.json, so a damaged file is found before a rerun
# writes anything; the stage is then redone (every stage is deterministic: same result).
OUTPUTS = {"synthesize": ("synthetic.jsonl", "synthesize_stats.json"),
           "think": ("samples", "sources"),
           "prune": ("train.jsonl", "prune_stats.json", "data_quality.json", "influence.jsonl"),
           "train": ("params",), "eval": ("eval.json", "eval"), "export": ("hf",)}


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
    _resolve_state(root, cfg, force, say=lambda *_: None)  # RunDir says it, once


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


def _resolve_state(root: str, cfg: Any, force: bool, say=log.warning) -> dict:
    """The state this config continues from (a fresh one if there is none); a different
    config is refused unless nothing began, or `force`. Reads only; warnings go to `say`."""
    fp = fingerprint(cfg)
    state_path = io.path(os.path.join(root, STATE))
    if not state_path.exists():
        return {"fingerprint": fp, "done": []}
    try:
        state = io.read_json(state_path, kind=None)
        if not isinstance(state, dict) or not isinstance(state.get("done"), list) \
                or not isinstance(state.get("info", {}), dict):
            raise TptError(f"{state_path}: not a tpt run state file")
    except TptError as e:
        return _lost_state(root, fp, e, say)
    if state.get("fingerprint") != fp:
        if not _began(root, state):
            log.info("%s: no stage of the earlier start began; starting with this config", root)
        elif not force:
            raise TptError(
                f"{root} was started with a different config (fingerprint "
                f"{state.get('fingerprint')} != {fp}); use a new --output, or --force "
                f"to continue with the new config")
        else:
            say("%s: config changed; continuing with the new one (--force)", root)
        state = {**state, "fingerprint": fp}
    return state


def _lost_state(root: str, fp: str, error: TptError, say) -> dict:
    """A damaged state.json: when config.json shows this config, every stage is redone (intact
    samples and checkpoints are reused, and every stage is deterministic: same results); else
    nothing tells whether the files belong to this config, which is a one-line error."""
    try:
        same = dict_fingerprint(io.read_json(os.path.join(root, CONFIG))) == fp
    except TptError:
        same = False
    if not same:
        raise TptError(f"{error}, and {os.path.join(root, CONFIG)} does not show this config "
                       f"either; use a new --output, or delete {STATE} to redo every stage")
    say("%s; redoing every stage (intact samples and checkpoints are reused)", error)
    return {"fingerprint": fp, "done": []}


def stage_files(root: str, stage: str) -> dict[str, int]:
    """{path under root: size} of the files stage `stage` (e.g. "r01/think") left."""
    folder, _, short = stage.rpartition("/")
    sizes: dict[str, int] = {}
    for name in OUTPUTS.get(short, ()):
        rel = f"{folder}/{name}" if folder else name
        p = io.path(root) / rel
        if p.is_dir():
            sizes.update(manifest.file_sizes(p, rel + "/"))
        elif p.exists():
            sizes[rel] = p.stat().length
    return sizes


def damage(root: str, stage: str, recorded: Optional[dict]) -> Optional[str]:
    """What is wrong with a finished stage's files (the first bad one), or None: a file
    missing or of another size than recorded, or JSON that does not parse (a run recorded
    before sizes were: its files are parsed)."""
    have = stage_files(root, stage)
    for rel, size in sorted((recorded or have).items()):
        where = os.path.join(root, rel)
        if rel not in have:
            return f"{where} is missing"
        if have[rel] != size:
            return f"{where} has {have[rel]} bytes, expected {size}"
        why = _unreadable(where)
        if why:
            return why
    return None


def _unreadable(p: str) -> Optional[str]:
    """Why the JSON or JSONL file `p` does not parse, or None (also when there is none)."""
    try:
        if p.endswith(".json") and io.path(p).exists():
            io.read_json(p, kind=None)
        elif p.endswith(".jsonl") and io.path(p).exists():
            for _ in io.read_jsonl(p):
                pass
    except TptError as e:
        return str(e)
    return None


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
            self._redo_damaged()
            if self.primary:
                io.write_json_atomic(self.path(CONFIG), to_dict(self.cfg))
                io.write_json_atomic(self.path(STATE), self.state)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _redo_damaged(self) -> None:
        """Decided before anything is written: a finished stage whose files are damaged is
        run again; config.json and metrics.json are written again anyway (nothing reads
        them), which a damaged one is told in one line."""
        for stage in list(self.state["done"]):
            why = damage(self.root, stage, (self.info(stage) or {}).get("files"))
            if why:
                log.warning("%s; redoing %s (it gives the same result)", why, stage)
                self.state["done"].remove(stage)
        for name, source in ((CONFIG, "this config"),
                             (METRICS, "the rounds' eval.json and prune_stats.json")):
            why = _unreadable(self.path(name))
            if why:
                log.warning("%s; writing it again from %s", why, source)

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
        """Record `stage` as done, with the sizes of the files it left."""
        if stage not in self.state["done"]:
            self.state["done"].append(stage)
        if self.primary:
            self.state.setdefault("info", {})[stage] = {**info,
                                                        "files": stage_files(self.root, stage)}
            io.write_json_atomic(self.path(STATE), self.state)
        elif info:
            self.state.setdefault("info", {})[stage] = info

    def info(self, stage: str) -> Optional[dict]:
        return self.state.get("info", {}).get(stage)
