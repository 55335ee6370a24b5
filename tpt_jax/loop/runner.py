"""The stage runner: compute a stage's artifact, or load it when state.json says it is done.

A stage's result is an `Artifact`: held in memory when this process computed it (Train hands
its params to the next Think without a reload), loaded on first use when an earlier process
did the work (a resumed run reads only what a stage it still has to run needs).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from tpt_jax import distributed, faults
from tpt_jax.loop.rundir import RunDir


class Artifact:
    """A value, or how to load it; `get()` loads at most once and then drops the loader (and
    whatever it referenced, e.g. the previous round's weights)."""

    def __init__(self, value: Any = None, load: Optional[Callable[[], Any]] = None):
        self._value = value
        self._load = load

    def get(self) -> Any:
        if self._load is not None:
            self._value, self._load = self._load(), None
        return self._value


def run_stage(rd: RunDir, name: str, wall: dict, compute: Callable[[], Any],
              load: Optional[Callable[[], Any]] = None) -> Artifact:
    """`compute()` unless stage `name` (e.g. "r01/think") is done, then `load` on demand;
    records the stage's wall time in `wall` and, once its files are written, in state.json."""
    short = name.split("/")[-1]
    if rd.done(name):
        wall[short] = (rd.info(name) or {}).get("wall_s", 0.0)
        return Artifact(load=load)
    t0 = time.perf_counter()
    faults.set_stage(name)
    faults.point("start")
    value = compute()
    wall[short] = round(time.perf_counter() - t0, 2)
    # Process 0 wrote the stage's files; the others read them only after this point.
    distributed.barrier(f"tpt-stage-{name}")
    faults.point("before-mark")  # artifacts written, stage not yet recorded
    rd.mark(name, wall_s=wall[short])
    faults.set_stage("")
    return Artifact(value)
