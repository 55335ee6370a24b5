"""Several hosts, one program each: connect them with `jax.distributed`, tag their logs.

Call `initialize()` first thing in a program, before any other JAX use (creating an array,
asking for devices): afterwards `jax.devices()` lists the devices of every process and
jitted code runs across all of them. Three cases:

- **Cloud TPU VM** (detected from the TPU environment variables or the TPU chips on the PCI
  bus, or asked for with `auto=True` / `TPT_DISTRIBUTED=auto`): `jax.distributed.initialize()`
  with no arguments; JAX reads the workers and this worker's index from the TPU metadata.
  A single-host slice simply becomes a cluster of one.
- **Other clusters**: an explicit coordinator `host:port` (process 0's address), process count
  and process id, as arguments or from `TPT_COORDINATOR`, `TPT_NUM_PROCESSES`,
  `TPT_PROCESS_ID`. On CPU the processes exchange data with gloo collectives.
- **One process** (anything else, or `TPT_DISTRIBUTED=off`): nothing to do.

`is_primary()` (process 0 writes shared files), `process_index()` and `process_count()` never
start a JAX backend, so they are safe in logging code that runs before `initialize()`.
`setup_logging()` prefixes every log line with `[pN]`, the process it came from.

    python -m tpt_jax.distributed     # initialize and report what this process sees
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import sys
from typing import Optional, Sequence, TextIO, Union

import jax

from tpt_jax.config import TptError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "TPT_COORDINATOR"
ENV_NUM_PROCESSES = "TPT_NUM_PROCESSES"
ENV_PROCESS_ID = "TPT_PROCESS_ID"
ENV_MODE = "TPT_DISTRIBUTED"  # auto: jax.distributed.initialize() | off: single process

# Set by the Cloud TPU runtime on TPU VMs and in GKE TPU pods.
_CLOUD_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID",
                  "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedError(TptError):
    """Multi-process set-up is incomplete, inconsistent, or came too late."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """How this process was connected. mode: single | explicit | auto | external (somebody
    else called jax.distributed.initialize)."""

    mode: str
    process_index: int
    process_count: int
    coordinator: Optional[str] = None


_info: Optional[DistributedInfo] = None


# ----------------------------------------------------------------------------- set-up


def on_cloud_tpu() -> bool:
    """True on a Cloud TPU VM or GKE TPU pod (with libtpu installed). Starts no backend."""
    if any(os.environ.get(name) for name in _CLOUD_TPU_ENV):
        return True
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:  # what JAX itself checks: TPU chips on the PCI bus
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private API moved: fall back to the TPU device files
        return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {raw!r}") from None


def _env_mode() -> Optional[bool]:
    raw = os.environ.get(ENV_MODE, "").strip().lower()
    if raw in ("", "default"):
        return None
    if raw in ("auto", "1", "true", "on", "yes"):
        return True
    if raw in ("off", "0", "false", "no", "single"):
        return False
    raise DistributedError(f"{ENV_MODE} must be 'auto' or 'off', got {raw!r}")


def _jax_is_initialized() -> bool:
    is_init = getattr(jax.distributed, "is_initialized", None)
    if is_init is not None:
        return bool(is_init())
    from jax._src import distributed as _d  # older JAX without the public function
    return _d.global_state.client is not None


def _jax_state() -> tuple[int, int]:
    """(process_id, num_processes) as jax.distributed recorded them, without a backend."""
    try:
        from jax._src import distributed as _d
        return int(_d.global_state.process_id), int(_d.global_state.num_processes)
    except Exception:
        return jax.process_index(), jax.process_count()


def _call_jax_initialize(**kwargs) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before" in str(e):  # "... must be called before any JAX computations ..."
            raise DistributedError(
                "tpt_jax.distributed.initialize() must run before any other JAX use (creating "
                "arrays, jax.devices(), ...); call it first thing in the program") from None
        raise


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: Optional[bool] = None,
               local_device_ids: Union[int, Sequence[int], None] = None,
               timeout_s: int = 300) -> DistributedInfo:
    """Connect this process to the others; returns how. Call before any other JAX use.

    coordinator: "host:port" of process 0 (it starts the coordination service there);
    num_processes, process_id: the cluster size and this process's index in 0..n-1.
    Missing values come from TPT_COORDINATOR / TPT_NUM_PROCESSES / TPT_PROCESS_ID. Either all
    three are known, or none: then `auto=True` (or TPT_DISTRIBUTED=auto, or running on a Cloud
    TPU VM when auto is None) calls `jax.distributed.initialize()` with no arguments, and
    otherwise this is a single process and nothing happens. Calling it again is a no-op.
    """
    global _info
    if _info is not None:
        return _info
    if _jax_is_initialized():  # somebody called jax.distributed.initialize already
        pid, n = _jax_state()
        _info = DistributedInfo("external", pid, n)
        return _info

    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if auto is None:
        auto = _env_mode()

    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if num_processes == 1 and process_id in (None, 0):
        _info = DistributedInfo("single", 0, 1)
    elif any(v is not None for v in given.values()):
        _info = _initialize_explicit(coordinator, num_processes, process_id,
                                     local_device_ids, timeout_s)
    elif auto or (auto is None and on_cloud_tpu()):
        _call_jax_initialize(local_device_ids=local_device_ids, initialization_timeout=timeout_s)
        pid, n = _jax_state()
        _info = DistributedInfo("auto", pid, n)
    else:
        _info = DistributedInfo("single", 0, 1)
    if _info.process_count > 1:
        log.info("jax.distributed: process %d of %d (%s%s)", _info.process_index,
                 _info.process_count, _info.mode,
                 f", coordinator {_info.coordinator}" if _info.coordinator else "")
    return _info


def _initialize_explicit(coordinator, num_processes, process_id, local_device_ids,
                         timeout_s) -> DistributedInfo:
    missing = [f"{name} (${env})" for name, env, value in (
        ("coordinator", ENV_COORDINATOR, coordinator),
        ("num_processes", ENV_NUM_PROCESSES, num_processes),
        ("process_id", ENV_PROCESS_ID, process_id)) if value is None]
    if missing:
        raise DistributedError(f"multi-process set-up needs coordinator, num_processes and "
                               f"process_id together; missing: {', '.join(missing)}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator must be host:port (process 0's address), "
                               f"got {coordinator!r}")
    if num_processes < 1:
        raise DistributedError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id must be in 0..{num_processes - 1}, got {process_id}")
    # CPU devices of different processes talk through gloo (harmless on TPU/GPU: it only
    # configures the CPU client). Recent JAX defaults to it; older ones had no default.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # pragma: no cover - JAX without the option
        pass
    _call_jax_initialize(coordinator_address=coordinator, num_processes=num_processes,
                         process_id=process_id, local_device_ids=local_device_ids,
                         initialization_timeout=timeout_s)
    return DistributedInfo("explicit", process_id, num_processes, coordinator)


def shutdown() -> None:
    """Disconnect (optional at exit; JAX does it too). `initialize()` may be called again."""
    global _info
    if _jax_is_initialized():
        jax.distributed.shutdown()
    _info = None


# ----------------------------------------------------------------------------- queries


def process_index() -> int:
    """This process's index (0 on a single process). Never starts a JAX backend."""
    if _info is not None:
        return _info.process_index
    return _jax_state()[0] if _jax_is_initialized() else 0


def process_count() -> int:
    """Number of processes (1 on a single process). Never starts a JAX backend."""
    if _info is not None:
        return _info.process_count
    return _jax_state()[1] if _jax_is_initialized() else 1


def is_primary() -> bool:
    """True on process 0, the one that writes shared files and reports progress."""
    return process_index() == 0


BARRIER_TIMEOUT_S = 3600
_barriers_passed = 0


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process reaches this point (a no-op on a single process).

    Waits on the coordination service rather than in a collective: a CPU (gloo) collective
    gives up when one process arrives 30 s after another, and process 0 may spend minutes
    writing files the others then read. Orbax's own syncs are such collectives, so call this
    just before handing Orbax a multi-process save or restore: the processes enter it together.
    """
    global _barriers_passed
    if process_count() == 1:
        return
    from jax._src import distributed as _d
    client = _d.global_state.client
    if client is None:  # initialized by something that left no client: use a collective
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    _barriers_passed += 1  # every process passes the same barriers in the same order
    try:
        client.wait_at_barrier(f"{name}#{_barriers_passed}", timeout_in_ms=timeout_s * 1000)
    except Exception as e:
        raise DistributedError(
            f"process {process_index()} waited {timeout_s} s at barrier {name!r} and not every "
            f"process arrived ({str(e).splitlines()[0][:160]})") from None


# ----------------------------------------------------------------------------- logging

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ProcessIndexFilter(logging.Filter):
    """Adds `record.process_index`; optionally drops records below `non_primary_level` on
    processes other than 0 (so 64 hosts do not print 64 copies of every progress line)."""

    def __init__(self, non_primary_level: Optional[int] = None):
        super().__init__()
        self.non_primary_level = non_primary_level

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_index = process_index()
        if self.non_primary_level is not None and record.process_index != 0:
            return record.levelno >= self.non_primary_level
        return True


class ProcessPrefixFormatter(logging.Formatter):
    """Prefixes every line of a formatted record (tracebacks included) with `[pN] `."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"[p{getattr(record, 'process_index', process_index())}] "
        return "\n".join(prefix + line for line in text.split("\n"))


def setup_logging(level: Union[int, str] = logging.INFO, *, fmt: str = DEFAULT_FORMAT,
                  datefmt: str = "%H:%M:%S", non_primary_level: Optional[int] = None,
                  stream: Optional[TextIO] = None, force: bool = False) -> logging.Handler:
    """Log to `stream` (stderr) from the root logger, every line prefixed with `[pN]`.

    Replaces the handler a previous call installed; `force=True` removes every other root
    handler too (as `logging.basicConfig(force=True)`). Returns the new handler.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if force or getattr(h, "_tpt_process_handler", False):
            root.removeHandler(h)
            h.close()  # a StreamHandler leaves its stream open
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(ProcessPrefixFormatter(fmt, datefmt))
    handler.addFilter(ProcessIndexFilter(non_primary_level))
    handler._tpt_process_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# ----------------------------------------------------------------------------- check


def main() -> int:
    """Initialize, then report this process's view (setup.sh runs this on every TPU worker)."""
    setup_logging()
    try:
        info = initialize()
    except DistributedError as e:
        print(f"tpt_jax.distributed: error: {e}", file=sys.stderr)
        return 2
    devices = jax.devices()
    log.info("jax %s: process %d of %d (%s), %d %s devices (%d local)", jax.__version__,
             info.process_index, info.process_count, info.mode, len(devices),
             devices[0].platform, jax.local_device_count())
    return 0


if __name__ == "__main__":
    sys.exit(main())
