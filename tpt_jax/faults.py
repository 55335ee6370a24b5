"""Fault injection for the resume tests: `TPT_FAULT` kills this process at named points.

The code calls `faults.point("shard-written")` at a few places where a crash is interesting
(after a Think shard is written, after a train step, while an Orbax save is in flight, between
a stage's last write and its mark in state.json). `rounds` sets the current stage, so each
point is known as `<stage>:<name>`, e.g. `r01/think:shard-written`. Without `TPT_FAULT` a point
costs one dictionary lookup.

    TPT_FAULT="r01/think:shard-written@2"      SIGKILL at the 2nd hit of that point
    TPT_FAULT="r00/train:ckpt-save@1+0.05"     SIGKILL 50 ms after the 1st hit (mid-write)
    TPT_FAULT="*/eval:before-mark"             shell-style patterns match stage and point

Several specs may be joined with ','. Hits are counted per process, so after a restart the
count starts again. SIGKILL is what a preempted VM or the OOM killer does: no `finally`, no
atexit, no flush.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import sys
import threading

ENV = "TPT_FAULT"
_stage = ""
_hits: dict[str, int] = {}


def set_stage(name: str) -> None:
    """The stage that the next points belong to (`rNN/think`, ...; "" outside stages)."""
    global _stage
    _stage = name


def _kill(where: str) -> None:
    sys.stderr.write(f"TPT_FAULT: SIGKILL at {where}\n")  # for the test's logs
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _parse(item: str) -> tuple[str, int, float]:
    """`pattern[@k][+delay]` -> (pattern, k, delay seconds)."""
    delay = 0.0
    if "+" in item:
        item, d = item.rsplit("+", 1)
        delay = float(d)
    k = 1
    if "@" in item:
        item, n = item.rsplit("@", 1)
        k = int(n)
    return item.strip(), k, delay


def point(name: str) -> None:
    """Kill the process here if `TPT_FAULT` names this point (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where = f"{_stage}:{name}" if _stage else name
    for item in spec.split(","):
        pattern, k, delay = _parse(item)
        if not fnmatch.fnmatchcase(where, pattern):
            continue
        _hits[item] = _hits.get(item, 0) + 1
        if _hits[item] != k:
            continue
        if delay > 0:  # the work carries on until the kill lands
            threading.Timer(delay, _kill, [f"{where} + {delay:g} s"]).start()
        else:
            _kill(where)
