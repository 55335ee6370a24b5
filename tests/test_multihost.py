"""`tpt run` on two processes (4 CPU devices each, jax.distributed on localhost) writes what
one process with 8 devices writes: same metrics, same samples, same pruned training data.

The round is made tiny but not empty: the training questions are also the round-0 seed set,
so the round-0 fine-tune learns to answer most of them, round-1 Think finds correct traces,
Prune keeps them and round-1 Train runs (Orbax checkpoints, params saved collectively).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Everything that decides the result is pinned here, so tuning tiny_cpu does not move it.
OVERRIDES = ["per_round={}", 
    "model=test-tiny", "prompt=plain", "rounds=1", "init_from=previous", "seed=0",
    "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1",
    "data.source=jsonl", "data.train_limit=null", "data.test_limit=null",
    "think.n=2", "think.temperature=0.3", "think.top_k=0", "think.top_p=1.0",
    "think.max_prompt_tokens=48", "think.max_new_tokens=8", "think.batch_size=8",
    "think.shard_size=256", "think.seed=0",
    "prune.strategy=first-correct", "prune.max_examples=2000",
    "train.batch_size=8", "train.grad_accum=1", "train.max_length=64", "train.length_bucket=64",
    "train.epochs=30", "train.learning_rate=2e-2", "train.warmup_ratio=0",
    "train.eval_fraction=0", "train.pack=false", "train.remat=none",
    "per_round.1.train.epochs=1", "per_round.1.train.learning_rate=1e-3",
    "eval.greedy=true", "eval.n=0", "eval.max_new_tokens=8", "eval.limit=null",
]


# The reference: one process, 8 devices, the same collectives library (gloo) as the
# two-process run. XLA:CPU's in-process collectives add the devices' partial sums in another
# order than gloo does; the last-bit differences that leaves in the gradients are enough for
# Adam (which divides tiny gradients by their own size) to send training elsewhere.
ONE_PROCESS_GLOO = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=1, process_id=0)
from tpt_jax.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _questions(path: Path) -> None:
    """Eight one-line questions, six with answer 2 and two with answer 3: a few steps teach the
    tiny model to answer "#### 2", so Think finds correct traces for most (not all) of them."""
    names = ["Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Lily", "Ben"]
    items = ["apple", "pen", "card", "coin", "book", "egg", "shell", "stamp"]
    lines = []
    for i, (name, item) in enumerate(zip(names, items)):
        more = 1 if i < 6 else 2
        lines.append(json.dumps({
            "id": f"easy-{i}", "answer": f"#### {1 + more}",
            "question": f"{name} has 1 {item} and gets {more} more. How many {item}s does "
                        f"{name} have now?"}) + "\n")
    path.write_text("".join(lines))


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("TPT_COORDINATOR", "TPT_NUM_PROCESSES", "TPT_PROCESS_ID", "TPT_DISTRIBUTED"):
        env.pop(name, None)
    env.update(extra)
    return env


def _read(root: Path, rel: str) -> str:
    return (root / rel).read_text()


def _without_timings(obj):
    """Timings differ between runs; everything else must not."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("wall_s", "seconds")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _json(root: Path, rel: str):
    return _without_timings(json.loads(_read(root, rel)))


@pytest.mark.timeout(420)
def test_two_processes_write_what_one_process_writes(tmp_path):
    data = tmp_path / "questions.jsonl"
    _questions(data)
    files = [f"data.train_path={data}", f"data.test_path={data}", f"data.seed_path={data}"]
    cmd = lambda out: [sys.executable, "-m", "tpt_jax.cli", "run", "tiny_cpu", *OVERRIDES, *files,
                       "--output", str(out)]
    multi, single = tmp_path / "two", tmp_path / "one"
    port = _free_port()
    procs = {
        f"p{i}": subprocess.Popen(
            cmd(multi), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(4, TPT_COORDINATOR=f"127.0.0.1:{port}", TPT_NUM_PROCESSES="2",
                     TPT_PROCESS_ID=str(i)))
        for i in (0, 1)}
    reference = [sys.executable, "-c", ONE_PROCESS_GLOO, f"127.0.0.1:{_free_port()}",
                 *cmd(single)[3:]]
    procs["single"] = subprocess.Popen(reference, cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=_env(8))
    outputs = {}
    try:
        for name, p in procs.items():
            outputs[name] = p.communicate(timeout=400)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    failed = {name: p.returncode for name, p in procs.items() if p.returncode != 0}
    assert not failed, "".join(f"\n--- {name} exited {code}:\n{outputs.get(name, '')[-3000:]}"
                               for name, code in failed.items())

    # Both processes took part; only process 0 reported.
    assert "[p1]" in outputs["p1"] and "[p0]" not in outputs["p1"]
    assert "metrics:" in outputs["p0"] and "metrics:" not in outputs["p1"]

    m_multi = _json(multi, "metrics.json")
    assert m_multi == _json(single, "metrics.json")
    assert [r["round"] for r in m_multi] == [0, 1]
    assert m_multi[1]["train_examples"] > 0, "round 1 kept nothing: the test would not train"

    assert _json(multi, "r01/prune_stats.json") == _json(single, "r01/prune_stats.json")
    for rel in ("r01/train.jsonl", "r01/samples/samples-00000.jsonl", "r00/eval.json",
                "r01/eval.json", "r00/train/train_log.jsonl", "r01/train/train_log.jsonl"):
        assert _read(multi, rel) == _read(single, rel), rel
    state_multi = json.loads(_read(multi, "state.json"))
    assert state_multi["done"] == json.loads(_read(single, "state.json"))["done"]
    assert "r01/train" in state_multi["done"] and "r01/eval" in state_multi["done"]

    # Round-1 training checkpointed and the round's params were saved (collectively: the
    # fsdp shards live on both processes).
    assert any((multi / "r01/train/checkpoints").iterdir())
    assert (multi / "r01/params/model.json").exists()
    assert any((multi / "r01/params/params").glob("ocdbt.process_1"))
    leftovers = [p for p in multi.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
