"""Fault injection: `tpt run` on a tiny three-round config is killed with SIGKILL inside every
stage of every round (Think, Prune, Train, Eval of rounds 1-3, and round 0's Train and Eval),
inside an Orbax checkpoint write and the round's params write, between a stage's last write and
its mark in state.json, and at random moments, and rerun after each kill; round 0's params are
also damaged after their stage was recorded. The finished run must equal an uninterrupted one:
metrics.json (all but wall-clock seconds), every round's samples (each (question, sample)
exactly once), kept training examples, prune stats, train logs, params and final optimizer
state bit for bit, and every eval.

Three rounds, because a resumed run must hand each round's own weights on: after a restart,
round 2's Think samples from round 1's params and round 1's Eval evaluates them (issue:
"Resume is wrong after round 1"), which a one-round run cannot show.

Kills land deterministically through `TPT_FAULT` (tpt_jax/faults.py): `<stage>:<point>@k`
kills at the k-th time this process reaches that point; `<stage>:start+t` kills t seconds
after the stage starts (t from a seeded RNG: "random wall-clock moments" that still stay in
that stage, so the sequence below stays meaningful). Each rerun pays process start-up; the
compiled programs come from a JAX persistent compilation cache shared with the reference run.

`TPT_FAULTS_LONG=1` runs the long variant (more kill points, more random kills; there each
kill also has a backstop at the end of its stage, since a random kill may already have passed
the next point).
"""
import collections
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Everything that decides the run's size is pinned here, so retuning configs/tiny_cpu.yaml
# does not change what this test costs. The data: 32 synthetic questions whose worked solutions
# all end in "#### 7", used as seed solutions, training and eval questions alike, so a tiny
# model learns the answer in round 0 (32 steps of 8, checkpoints every 4) and every later round
# keeps and trains on its own correct samples. Each round's weights then differ, which is what
# lets this test see a resumed round using another round's weights. Per round: 32 questions x 2
# samples in 4 Think shards, 16 eval questions in 2 shards.
OVERRIDES = [
    "model=test-tiny", "rounds=3", "data.source=jsonl", "think.n=2", "think.batch_size=16",
    "think.shard_size=8", "think.max_new_tokens=64", "think.temperature=0.3",
    "think.max_prompt_tokens=96", "eval.n=0", "eval.limit=16", "eval.max_new_tokens=64",
    "train.batch_size=8", "train.max_length=192", "train.epochs=8", "train.learning_rate=3e-3",
    "train.save_every=4", "train.keep_checkpoints=2", "train.log_every=1",
    "train.async_checkpoint=true", "train.eval_fraction=0.0",
    "per_round={0: {train: {learning_rate: 0.01}}}",
]


def overrides(root: Path) -> list[str]:
    """OVERRIDES plus the data files, written once into the test's root folder."""
    data = root / "questions.jsonl"
    if not data.exists():
        from tpt_jax.data.synthetic import synthetic_split
        rows = [{"id": r["id"], "question": r["question"],
                 "answer": r["answer"].rsplit("####", 1)[0] + "#### 7"}
                for r in synthetic_split("train", 32, 0)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return OVERRIDES + [f"data.{k}_path={data}" for k in ("train", "test", "seed")]


CORRUPT = "corrupt r00/params"  # not a kill: damage round 0's params after its stage is done

# (TPT_FAULT spec or a marker, what it interrupts). "R:<stage>:<lo>:<hi>" is a random kill
# in [lo, hi) seconds after <stage> starts, with a backstop at the end of that stage (so a
# stage that finishes early is still killed inside, and the next kill point still lies ahead).
SHORT = [
    ("r00/train:step@3", "mid-train, step 3 of 4 (the step-2 checkpoint may be in flight)"),
    ("r00/train:ckpt-save@1", "an Orbax checkpoint write in flight"),
    ("r00/train:params-save", "the round's params (Orbax) write in flight"),
    ("r00/eval:shard-written@1", "Eval after its first shard"),
    (CORRUPT, ""),
    ("r00/eval:before-mark", "Eval written, not yet marked (and r00/params redone)"),
    ("r01/think:shard-written@2", "Think after 2 of 4 shards"),
    ("R:r01/think:0:3", "a random moment in Think"),
    ("r01/prune:before-mark", "Prune written, not yet marked"),
    ("r01/train:params-saved", "params written, model.json not yet"),
    ("r01/eval:shard-written@1", "round 1's Eval after its Train was recorded"),
    ("r02/think:shard-written@2", "round 2's Think, restarted: it samples from r01/params"),
    ("r02/prune:start", "Prune before it reads anything"),
    ("r02/train:before-mark", "Train written, not yet marked"),
    ("R:r02/eval:0:2", "a random moment in Eval"),
    ("r03/think:before-mark", "Think written, not yet marked"),
    ("r03/prune:before-mark", "Prune written, not yet marked"),
    ("r03/train:params-save", "the last params write in flight"),
    ("r03/eval:shard-written@1", "the last Eval after its first shard"),
]
LONG = [
    ("r00/train:step@1", "after the first train step, nothing saved"),
    ("r00/train:step@3", "mid-train"),
    ("r00/train:ckpt-save@1+0.05", "50 ms into an Orbax checkpoint write"),
    ("r00/train:ckpt-save@1", "an Orbax checkpoint write in flight"),
    ("R:r00/train:0.3:4", "a random moment in Train"),
    ("r00/train:params-save", "the round's params write in flight"),
    ("r00/train:params-saved", "params written, model.json not yet"),
    ("r00/train:before-mark", "Train written, not yet marked"),
    ("R:r00/eval:0:2", "a random moment in Eval"),
    ("r00/eval:shard-written@1", "Eval after its first shard"),
    (CORRUPT, ""),
    ("r00/eval:before-mark", "Eval written, not yet marked (and r00/params redone)"),
] + [item for r in (1, 2, 3) for item in [
    (f"r{r:02d}/think:shard-written@1", "Think after 1 shard"),
    (f"R:r{r:02d}/think:0:2", "a random moment in Think"),
    (f"r{r:02d}/think:before-mark", "Think written, not yet marked"),
    (f"r{r:02d}/prune:before-mark", "Prune written, not yet marked"),
    (f"r{r:02d}/train:params-save", "the round's params write in flight"),
    (f"r{r:02d}/train:before-mark", "Train written, not yet marked"),
    (f"R:r{r:02d}/eval:0:2", "a random moment in Eval"),
    (f"r{r:02d}/eval:before-mark", "Eval written, not yet marked"),
]]
ROUNDS = ("r00", "r01", "r02", "r03")
# what a run spent, which differs run to run: wall-clock fields, and Think's tokens (early
# stop's cancelled rows drew some: a resumed Think schedules its shards otherwise; the samples
# are the same)
COSTS = {"seconds", "wall_s", "tokens_per_s", "trained_tokens_per_s", "step_s", "time",
         "think_tokens"}


def _env(cache: Path, fault: str = "") -> dict:
    env = dict(os.environ)
    env.update({
        # 2 CPU devices: sharded (fsdp=2) yet cheap to restart on a loaded machine
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.pop("TPT_FAULT", None)
    if fault:
        env["TPT_FAULT"] = fault
    return env


def tpt_run(out: Path, cache: Path, log: Path, fault: str = "") -> int:
    cmd = [sys.executable, "-m", "tpt_jax.cli", "run", *overrides(out.parent), "-o", str(out)]
    with open(log, "w") as f:
        return subprocess.run(cmd, env=_env(cache, fault), stdout=f, stderr=subprocess.STDOUT,
                              cwd=REPO, timeout=900).returncode


def _state(out: Path) -> list:
    p = out / "state.json"
    return json.loads(p.read_text())["done"] if p.exists() else []


def _records(path: Path) -> list:
    """A JSON or JSONL artifact without its `COSTS` fields."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in COSTS}
        return [strip(v) for v in x] if isinstance(x, list) else x
    text = path.read_text()
    rows = [json.loads(text)] if path.suffix == ".json" else \
        [json.loads(line) for line in text.splitlines() if line.strip()]
    return strip(rows)


def _final_state(train_dir: Path) -> dict:
    """The newest train checkpoint's state (params and optimizer moments), as numpy arrays."""
    import jax
    import orbax.checkpoint as ocp
    steps = sorted(int(p.name) for p in (train_dir / "checkpoints").iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore(train_dir / "checkpoints" / str(steps[-1]) / "state")
    return {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _no_costs(metrics: list) -> list:
    return [{k: v for k, v in rec.items() if k not in COSTS} for rec in metrics]


def _samples(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("samples-*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]


def _params(folder: Path):
    from tpt_jax.gemma import model as M
    from tpt_jax.gemma import weights
    from tpt_jax.gemma.config import model_preset
    tree = weights.load_params(str(folder), M.make_model(model_preset("test-tiny")))
    import jax
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _corrupt_params(folder: Path) -> None:
    """Cut the biggest data file of an Orbax params checkpoint in half."""
    files = [p for p in folder.rglob("*") if p.is_file() and "/d/" in str(p)]
    big = max(files, key=lambda p: p.stat().st_size)
    os.truncate(big, big.stat().st_size // 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (it also fills the compilation cache the killed runs reuse)."""
    root = tmp_path_factory.mktemp("faults")
    cache, out = root / "jax-cache", root / "reference"
    rc = tpt_run(out, cache, root / "reference.log")
    assert rc == 0, (root / "reference.log").read_text()[-3000:]
    return root, cache, out


def test_killed_run_ends_like_an_uninterrupted_one(reference):
    root, cache, ref = reference
    # every round trains and its weights change what the next round samples: a resumed round
    # that used another round's weights could not go unnoticed
    assert all((ref / tag / "train").is_dir() for tag in ROUNDS)
    assert _samples(ref / "r01" / "samples") != _samples(ref / "r02" / "samples")
    out = root / "killed"
    long = bool(os.environ.get("TPT_FAULTS_LONG"))
    plan = LONG if long else SHORT
    rng = random.Random(8)
    kills, history = 0, []
    for i, (spec, what) in enumerate(plan):
        if spec == CORRUPT:
            assert "r00/train" in _state(out)
            _corrupt_params(out / "r00" / "params")
            history.append("corrupted r00/params")
            continue
        primary = spec
        if spec.startswith("R:"):
            _, stage, lo, hi = spec.split(":")
            primary = f"{stage}:start+{rng.uniform(float(lo), float(hi)):.2f}"
            spec = f"{primary},{stage}:before-mark"
        elif long and not spec.endswith("before-mark"):
            spec = f"{spec},{spec.split(':')[0]}:before-mark"
        log = root / f"killed-{i:02d}.log"
        rc = tpt_run(out, cache, log, fault=spec)
        history.append(f"{spec} -> rc {rc}, done {_state(out)}")
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        # every planned kill landed (the run did not finish or fail instead)
        assert rc == -signal.SIGKILL, "\n".join(history) + "\n" + text[-3000:]
        if not (long or "+" in primary):  # the intended point, not a backstop
            assert f"TPT_FAULT: SIGKILL at {primary.split('@')[0]}\n" in text, text[-3000:]
        kills += 1
        if spec == "r00/eval:before-mark":  # the first run after the damage: found up front
            assert "r00/params/" in text and "redoing r00/train" in text, text[-3000:]
    assert kills >= (10 if plan is SHORT else 20)

    rc = tpt_run(out, cache, root / "killed-final.log")
    assert rc == 0, (root / "killed-final.log").read_text()[-3000:]

    # same results as the uninterrupted run
    assert _state(out) == _state(ref)
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((ref / "metrics.json").read_text())
    assert _no_costs(got) == _no_costs(want)
    for tag in ROUNDS:
        for name in ("train.jsonl", "prune_stats.json", "eval.json", "train/train_log.jsonl"):
            if (tag == "r00" and name in ("train.jsonl", "prune_stats.json")) or \
                    (name.startswith("train/") and not (ref / tag / "train").exists()):
                continue
            assert _records(out / tag / name) == _records(ref / tag / name), f"{tag}/{name}"
        a, b = _params(out / tag / "params"), _params(ref / tag / "params")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{tag} {k}"
        if not (ref / tag / "train").exists():  # prune kept nothing: the model carried over
            continue
        a, b = _final_state(out / tag / "train"), _final_state(ref / tag / "train")
        assert a.keys() == b.keys() and any("mu" in k or "nu" in k for k in a), sorted(a)[:5]
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{tag} optimizer state {k}"

    # each (question, sample) exactly once, and the very same samples
    for tag in ROUNDS:
        for folder, n, questions in (("samples", 2, 32), ("eval/greedy", 1, 16)):
            if tag == "r00" and folder == "samples":
                continue
            recs = _samples(out / tag / folder)
            keys = [(r["id"], r["sample"]) for r in recs]
            # samples 0..m-1 of each question, m <= n (Think's early stop ends some at m < n)
            drawn = collections.Counter(i for i, _ in keys)
            assert len(keys) == len(set(keys)) and len(drawn) == questions, f"{tag}/{folder}"
            assert set(keys) == {(i, j) for i, m in drawn.items() for j in range(m)}
            assert max(drawn.values()) <= n and (folder != "eval/greedy" or len(keys) == 16)
            assert recs == _samples(ref / tag / folder), f"{tag}/{folder}"
    # killed writes leave no file that a reader would take for an artifact
    assert not list(out.rglob("*.orbax-checkpoint-tmp*"))
    assert not list(out.rglob(".samples-*.tmp-*"))


def test_changed_config_needs_force(reference, tmp_path, capsys):
    """On resume, a changed config is a one-line error (exit 2) unless --force."""
    import shutil

    from tpt_jax.cli import main
    _, _, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    changed = overrides(ref.parent) + ["eval.max_new_tokens=20"]
    assert main(["run", *changed, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "was started with a different config" in err and "--force" in err
    # --force: continues with the new config; every stage is done, so nothing is redone
    assert main(["run", *changed, "-o", str(out), "--force"]) == 0
    err = capsys.readouterr().err  # the CLI logs to stderr
    assert "config changed; continuing with the new one (--force)" in err and "Traceback" not in err
    got = json.loads((out / "metrics.json").read_text())
    assert _no_costs(got) == _no_costs(json.loads((ref / "metrics.json").read_text()))
