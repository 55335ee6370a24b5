"""Bad input through the real entry point (`python -m tpt_jax.cli`): exit 2, one error line, no
traceback, and nothing written: every file and directory of the test's tree, an existing run
directory among them, is byte-identical after a refused command. Then the run directory's
read-only check in-process: a refused start leaves no trace, so the corrected command runs in
the same --output."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpt_jax.cli import main
from tpt_jax.config import TptError, load_run_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["per_round={}", "model=test-tiny", "rounds=1", "data.synthetic_train=8",
        "data.synthetic_test=8", "data.seed_size=8", "think.n=1", "train.batch_size=8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files a user might point tpt at, and a run directory that finished round 0's train."""
    from tpt_jax.loop.rundir import RunDir
    w = tmp_path_factory.mktemp("world")
    with RunDir(str(w / "run"), load_run_config(None, TINY)) as rd:
        rd.mark("r00/train", wall_s=1.0)
    (w / "run" / "r00" / "params").mkdir(parents=True)
    (w / "run" / "r00" / "params" / "weights").write_bytes(b"\x00" * 64)
    (w / "badstate").mkdir()
    (w / "badstate" / "state.json").write_bytes(b'{"fingerprint": "\xff\xfe", "done": []}')
    (w / "file.txt").write_text("not a directory\n")
    (w / "bad_utf8.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "1"}\n\xff\xfe\n')
    (w / "dataset.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"})
        + "\n" for i in range(40)))
    (w / "bad.yaml").write_bytes(b"rounds: 2\nmodel: test-\xe9tiny\n")
    (w / "hf").mkdir()
    (w / "hf" / "config.json").write_bytes(b'{"model_type": "gemma2",\n "x": "\xc3"}')
    return w


def tree_digest(root: Path) -> dict:
    """Every path under root with its bytes' hash (directories too, so a new empty one shows)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


CASES = [  # (argv with {w} for the world dir, what the one error line must say)
    (["run", *TINY, "-o", "{w}/file.txt"], r"--output .*file\.txt is a file, not a directory"),
    (["run", *TINY, "mesh.data=3", "-o", "{w}/run"], r"run was started with a different config"),
    (["run", *TINY, "mesh.data=3", "--force", "-o", "{w}/run"], r"8 devices do not divide by 3"),
    (["run", *TINY, "-o", "{w}/badstate"], r"state\.json: not UTF-8 text at line 1"),
    (["run", "{w}/bad.yaml", "-o", "{w}/new"], r"bad\.yaml: not UTF-8 text"),
    (["run", *TINY, "data.source=jsonl", "data.train_path={w}/bad_utf8.jsonl",
      "data.test_path={w}/bad_utf8.jsonl", "-o", "{w}/new"],
     r"bad_utf8\.jsonl: no usable records: 2 not UTF-8 \(.*bad_utf8\.jsonl:1, .*:2\)"),
    (["train", "--examples", "{w}/dataset.jsonl", "--out", "{w}/new"],
     r"dataset\.jsonl: no training examples: expected JSONL rows with string fields 'prompt' "
     r"and 'completion' .*40 of 40 rows lack them"),
    (["think", "--dataset", "{w}/dataset.jsonl", "--model", "test-tiny", "--out",
      "{w}/file.txt"], r"--out .*file\.txt is a file, not a directory"),
    (["prune", "--dataset", "{w}/dataset.jsonl", "--samples", "{w}/bad_utf8.jsonl", "--out",
      "{w}/run", "--stats", "{w}/new.json"], r"--out .*run is a directory, not a file"),
    (["convert", "{w}/hf", "{w}/new", "--to", "orbax"], r"config\.json: not UTF-8 text at line 2"),
]


@pytest.mark.parametrize("argv,pattern", CASES, ids=[" ".join(a[:1] + a[-3:]) for a, _ in CASES])
def test_cli_refuses_in_one_line_and_writes_nothing(world, argv, pattern):
    argv = [a.replace("{w}", str(world)) for a in argv]
    before = tree_digest(world)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "tpt_jax.cli", *argv], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and p.stderr.splitlines()[-1] == errors[0], p.stderr
    assert errors[0].startswith(f"tpt {argv[0]}: error: ") and re.search(pattern, errors[0]), \
        p.stderr
    assert tree_digest(world) == before


# ----------------------------------------------------------------------------- in-process


def test_refused_start_leaves_no_trace_and_the_fix_runs_there(tmp_path, capsys):
    from tpt_jax.loop.rundir import check_output
    out = tmp_path / "run"
    assert main(["run", *TINY, "mesh.data=3", "-o", str(out)]) == 2
    assert "8 devices do not divide by 3" in capsys.readouterr().err
    assert not out.exists()
    check_output(str(out), load_run_config(None, TINY))  # the corrected command is welcome


def test_a_start_that_began_no_stage_is_not_a_different_run(tmp_path):
    from tpt_jax.loop.rundir import RunDir, check_output
    out = tmp_path / "run"
    first, second = load_run_config(None, TINY), load_run_config(None, TINY + ["rounds=2"])
    with RunDir(str(out), first):  # config.json and state.json written, nothing run
        pass
    check_output(str(out), second)
    with RunDir(str(out), second) as rd:
        assert rd.state["done"] == []
    state = json.loads((out / "state.json").read_text())
    assert json.loads((out / "config.json").read_text())["rounds"] == 2
    (out / "r00").mkdir()  # a stage began (round 0's train was killed before it finished)
    with pytest.raises(TptError, match="was started with a different config"):
        check_output(str(out), first)
    with pytest.raises(TptError, match="was started with a different config"):
        RunDir(str(out), first).__enter__()
    assert json.loads((out / "state.json").read_text()) == state
    check_output(str(out), first, force=True)


def test_output_paths_that_cannot_be_written(tmp_path, monkeypatch):
    from tpt_jax import io as tio
    (tmp_path / "f").write_text("x")
    with pytest.raises(TptError, match=r"--out .*/f is a file, not a directory$"):
        tio.check_writable_dir(str(tmp_path / "f"), "--out")
    with pytest.raises(TptError, match=r"--out .*/f/a/b: .*/f is a file, not a directory$"):
        tio.check_writable_dir(str(tmp_path / "f" / "a" / "b"), "--out")
    with pytest.raises(TptError, match=r"--stats .*tmp.* is a directory, not a file$"):
        tio.check_writable_file(str(tmp_path), "--stats")
    tio.check_writable_dir(str(tmp_path / "new" / "deeper"), "--out")
    assert not (tmp_path / "new").exists()
    # unwritable (os.access, as the check sees it; root may write anywhere, so it is faked)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path)
                        else real(p, mode))
    with pytest.raises(TptError, match=r"--out .*/new: directory .* is not writable$"):
        tio.check_writable_dir(str(tmp_path / "new"), "--out")
    with pytest.raises(TptError, match=r"--out .*/o\.jsonl: directory .* is not writable$"):
        tio.check_writable_file(str(tmp_path / "o.jsonl"), "--out")


def test_train_and_eval_outputs_checked_first(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    ex = tmp_path / "ex.jsonl"
    ex.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert main(["train", "--examples", str(ex), "--out", str(tmp_path / "f")]) == 2
    assert re.search(r"^tpt train: error: --out .*/f is a file", capsys.readouterr().err)
    assert main(["eval", *TINY, "--params", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert re.search(r"^tpt eval: error: --out .* is a directory, not a file",
                     capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex.jsonl", "f"]
