"""tpt_jax.distributed: two processes on localhost form one 8-device JAX cluster."""
from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tpt_jax import distributed

REPO = Path(__file__).resolve().parent.parent

# Each process: 4 CPU devices, process-local rows -> one global [8, 3] array, then a jitted
# sum and a shard_map psum over all 8 devices.
WORKER = textwrap.dedent("""
    import sys
    from tpt_jax import distributed
    pid, port = int(sys.argv[1]), sys.argv[2]
    info = distributed.initialize(f"localhost:{port}", 2, pid, timeout_s=60)
    distributed.setup_logging()

    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert info.mode == "explicit" and info.process_index == pid, info
    assert jax.process_count() == 2, jax.process_count()
    assert jax.process_index() == pid
    assert jax.device_count() == 8, jax.device_count()
    assert jax.local_device_count() == 4
    assert distributed.is_primary() == (pid == 0)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    # Process p holds global rows 4p..4p+3; row r is [r, r, r].
    local = np.repeat(np.arange(4 * pid, 4 * pid + 4, dtype=np.float32)[:, None], 3, axis=1)
    x = jax.make_array_from_process_local_data(sharding, local, (8, 3))
    assert x.shape == (8, 3) and len(x.addressable_shards) == 4

    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    expected = 3 * sum(range(8))  # 84
    assert float(total.addressable_data(0)) == expected, total

    psum = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b.sum(), "data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))(x)
    assert float(psum.addressable_data(0)) == expected, psum

    distributed.barrier("test-done")
    import logging
    logging.getLogger("worker").info("ok sum=%s", float(total.addressable_data(0)))
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_processes_form_one_cluster():
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("TPT_COORDINATOR", "TPT_NUM_PROCESSES", "TPT_PROCESS_ID", "TPT_DISTRIBUTED"):
        env.pop(name, None)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(port)], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in (0, 1)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {pid} failed:\n{out}"
        assert f"[p{pid}]" in out and "ok sum=84.0" in out, out


# ----------------------------------------------------------------------------- in-process


@pytest.fixture
def fresh(monkeypatch):
    """A clean module state and environment (the test process itself stays single)."""
    for name in ("TPT_COORDINATOR", "TPT_NUM_PROCESSES", "TPT_PROCESS_ID", "TPT_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_info", None)
    return distributed


def test_single_process_does_nothing(fresh, monkeypatch):
    monkeypatch.setattr(fresh, "on_cloud_tpu", lambda: False)
    called = []
    monkeypatch.setattr(fresh.jax.distributed, "initialize", lambda **kw: called.append(kw))
    info = fresh.initialize()
    assert info == fresh.DistributedInfo("single", 0, 1) and not called
    assert fresh.is_primary() and fresh.process_index() == 0 and fresh.process_count() == 1
    assert fresh.initialize() is info  # idempotent


def test_cloud_tpu_calls_initialize_without_arguments(fresh, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    assert fresh.on_cloud_tpu()
    called = []
    monkeypatch.setattr(fresh.jax.distributed, "initialize", lambda **kw: called.append(kw))
    monkeypatch.setattr(fresh, "_jax_state", lambda: (2, 4))
    info = fresh.initialize()
    assert called and "coordinator_address" not in called[0]
    assert info == fresh.DistributedInfo("auto", 2, 4) and not fresh.is_primary()


def test_explicit_values_come_from_env_and_are_checked(fresh, monkeypatch):
    called = []
    monkeypatch.setattr(fresh.jax.distributed, "initialize", lambda **kw: called.append(kw))
    monkeypatch.setenv("TPT_COORDINATOR", "10.0.0.2:1234")
    monkeypatch.setenv("TPT_NUM_PROCESSES", "4")
    with pytest.raises(fresh.DistributedError, match=r"missing: process_id \(\$TPT_PROCESS_ID\)"):
        fresh.initialize()
    monkeypatch.setenv("TPT_PROCESS_ID", "4")
    with pytest.raises(fresh.DistributedError, match=r"process_id must be in 0\.\.3"):
        fresh.initialize()
    with pytest.raises(fresh.DistributedError, match="host:port"):
        fresh.initialize(coordinator="10.0.0.2", process_id=1)
    monkeypatch.setenv("TPT_PROCESS_ID", "3")
    info = fresh.initialize()
    assert info == fresh.DistributedInfo("explicit", 3, 4, "10.0.0.2:1234")
    assert called == [dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3,
                           local_device_ids=None, initialization_timeout=300)]
    assert fresh.jax.config.jax_cpu_collectives_implementation == "gloo"


def test_off_wins_over_tpu_detection(fresh, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    monkeypatch.setenv("TPT_DISTRIBUTED", "off")
    monkeypatch.setattr(fresh.jax.distributed, "initialize", lambda **kw: pytest.fail("called"))
    assert fresh.initialize().mode == "single"


def test_log_lines_carry_the_process_index(fresh, monkeypatch):
    stream = io.StringIO()
    root_level = logging.getLogger().level
    handler = fresh.setup_logging(stream=stream, non_primary_level=logging.WARNING)
    try:
        logger = logging.getLogger("tpt_jax.test")
        logger.info("hello\nsecond line")
        monkeypatch.setattr(fresh, "_info", fresh.DistributedInfo("explicit", 3, 4, "h:1"))
        logger.info("dropped on non-primary processes")
        logger.warning("kept")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(root_level)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[p0] ") and lines[0].endswith("hello")
    assert lines[1] == "[p0] second line"
    assert len(lines) == 3 and lines[2].startswith("[p3] ") and lines[2].endswith("kept")
