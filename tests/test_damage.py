"""A damaged run directory, or a full disk, never costs finished work (issue 24).

One finished one-round run (the fault test's tiny config, `rounds=1`) is copied per case and
run again in-process with the same command, as a user would:
- every artifact a later stage or a resume reads, cut short, replaced by garbage or emptied:
  the damaged stages are redone with one warning naming the file, and the run ends identical;
- state.json and config.json both damaged: a one-line error, the directory byte-identical;
- a disk that fills (a size-limited tmpfs, where this machine lets us mount one) at four
  points of a run: a one-line "disk full" error each time, then, after space is freed, the
  same command ends identical to the uninterrupted run;
- a full disk simulated at the write calls (JSON writes and Orbax's RESOURCE_EXHAUSTED).
"""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from test_faults import _no_costs, _params, _records, _samples, overrides
from tpt_jax import errors, io
from tpt_jax.cli import main

KINDS = ("truncated", "garbage", "empty")


def command(root: Path, out: Path) -> list[str]:
    return ["run", *overrides(root), "rounds=1", "--no-progress", "-o", str(out)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    assert main(command(root, root / "reference")) == 0
    return root, root / "reference"


def damage(p: Path, kind: str) -> None:
    """Cut to half, garbage of another length (not written by tpt), or emptied."""
    if kind == "truncated":
        os.truncate(p, p.stat().st_size // 2)
    elif kind == "garbage":
        p.write_bytes(b"\x89garbage\x00\n" * 5)
    else:
        p.write_bytes(b"")


def _biggest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _files(out: Path) -> dict:
    """What each damaged stage's file is, one per stage (rotated over the kinds)."""
    return {
        "r01/think": ["r01/samples/samples-00001.jsonl", "r01/samples/think.json",
                      "r01/samples/samples-00003.jsonl"],
        "r01/prune": ["r01/train.jsonl", "r01/prune_stats.json", "r01/train.jsonl"],
        "r01/train": [str(_biggest(out / "r01" / "params" / "params").relative_to(out))],
        "r00/eval": ["r00/eval.json", "r00/eval/greedy/samples-00000.jsonl"],
        "r01/eval": ["r01/eval.json"],
        "export": ["hf/model.safetensors", "hf/config.json"],
    }


def assert_same_results(out: Path, ref: Path) -> None:
    assert sorted(json.loads((out / "state.json").read_text())["done"]) == \
        sorted(json.loads((ref / "state.json").read_text())["done"])
    assert _no_costs(json.loads((out / "metrics.json").read_text())) == \
        _no_costs(json.loads((ref / "metrics.json").read_text()))
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((ref / "config.json").read_text())
    for name in ("r00/eval.json", "r01/eval.json", "r01/train.jsonl", "r01/prune_stats.json"):
        assert _records(out / name) == _records(ref / name), name
    for folder in ("r01/samples", "r00/eval/greedy", "r01/eval/greedy"):
        assert _samples(out / folder) == _samples(ref / folder), folder
    for tag in ("r00", "r01"):
        a, b = _params(out / tag / "params"), _params(ref / tag / "params")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), tag
    assert (out / "hf/model.safetensors").read_bytes() == \
        (ref / "hf/model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_artifacts_are_redone(finished, tmp_path, capsys, kind):
    root, ref = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    i = KINDS.index(kind)
    damaged = {stage: files[i % len(files)] for stage, files in _files(out).items()}
    for rel in [*damaged.values(), "metrics.json", "config.json"]:
        damage(out / rel, kind)
    # the newest train checkpoint too: the redone r01/train falls back to the one before it
    ckpts = out / "r01" / "train" / "checkpoints"
    newest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    damage(_biggest(ckpts / str(newest)), kind)
    capsys.readouterr()

    assert main(command(root, out)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    for stage, rel in damaged.items():
        lines = [line for line in err.splitlines() if f"redoing {stage} " in line]
        assert len(lines) == 1 and str(out / rel) in lines[0], (stage, rel, err[-3000:])
    for name in ("metrics.json", "config.json"):
        assert sum(str(out / name) in line and "writing it again" in line
                   for line in err.splitlines()) == 1, (name, err[-3000:])
    assert_same_results(out, ref)
    assert (ckpts / f"{newest}.corrupt").is_dir()  # the damaged checkpoint was moved aside


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_damaged_state_is_redone_when_config_json_shows_the_run(finished, tmp_path, capsys):
    root, ref = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    damage(out / "state.json", "truncated")
    capsys.readouterr()
    assert main(command(root, out)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sum("state.json" in line and "redoing every stage" in line
               for line in err.splitlines()) == 1, err[-3000:]
    assert_same_results(out, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_state_and_config_is_one_line_and_writes_nothing(finished, tmp_path, capsys,
                                                                 kind):
    root, ref = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    damage(out / "state.json", kind)
    damage(out / "config.json", kind)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(command(root, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert str(out / "state.json") in err and "config.json" in err, err
    assert _snapshot(out) == before


def test_disk_full_message_names_the_directory():
    e = OSError(errno.ENOSPC, "No space left on device", "/runs/x/r01/eval.json")
    assert str(errors.disk_full(e)).startswith("disk full: no space left on the device of "
                                               "/runs/x/r01;")
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.mu/0" in OCDBT database at '
                       'local file "/runs/x/r00/train/checkpoints/8.orbax-checkpoint-tmp/'
                       'state.orbax-checkpoint-tmp/ocdbt.process_0/": ... No space left on '
                       "device [os_error_code='28']")
    assert "of /runs/x/r00/train/checkpoints;" in str(errors.disk_full(orbax))
    assert "of /runs/x;" in str(errors.disk_full(OSError(errno.ENOSPC, "No space"), "/runs/x"))
    oom = ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0G")
    assert errors.disk_full(oom, "/runs/x") is None
    assert errors.disk_full(OSError(errno.EACCES, "Permission denied")) is None


def test_writes_abandoned_by_a_full_disk_stay_quiet(monkeypatch):
    """What Orbax's abandoned writes raise after the error (on a closed event loop, or at
    exit) prints nothing; any other unraisable error still goes to Python's hook."""
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(sys, "__unraisablehook__", printed.append)
    errors.quiet_disk_full()
    for text in ("Event loop is closed", "sys.meta_path is None, Python is likely shutting down",
                 "something else"):
        sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError(text)))
    assert [str(u.exc_value) for u in printed] == ["something else"]


def _one_line_disk_full(err: str, where: Path) -> None:
    err = err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err[-30:]
    last = err[-1]
    assert last.startswith("tpt run: error: disk full") and str(where) in last, err[-30:]


def test_simulated_full_disk_at_the_write_calls(finished, tmp_path, capsys, monkeypatch):
    """JSON writes (eval.json) and an Orbax write (the redone params) fail with ENOSPC; each
    is one line, nothing half-written is marked done, and the rerun ends identical."""
    from tpt_jax.gemma import weights
    root, ref = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    damage(out / "r01" / "eval.json", "truncated")
    damage(_biggest(out / "r01" / "params" / "params"), "truncated")
    real_write = io.write_text_atomic

    def full_write(p, text):
        if str(p).endswith("eval.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(p, text)

    def full_save(params, cfg, where):
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.x" in OCDBT database at '
                         f'local file "{where}/params.orbax-checkpoint-tmp-1/": No space left '
                         f"on device [os_error_code='28']")

    for module, name, fake, stage in ((weights, "save_params", full_save, "r01/train"),
                                      (io, "write_text_atomic", full_write, "r01/eval")):
        monkeypatch.setattr(module, name, fake)
        capsys.readouterr()
        assert main(command(root, out)) == 2
        _one_line_disk_full(capsys.readouterr().err, out)
        assert stage not in json.loads((out / "state.json").read_text())["done"]
        monkeypatch.undo()
    assert main(command(root, out)) == 0
    assert_same_results(out, ref)


def _progress(out: Path) -> tuple:
    """How far a stopped run got: stages done, then its newest train checkpoint."""
    done = json.loads((out / "state.json").read_text())["done"]
    steps = [(p.parent.parent.parent.name, int(p.name))
             for p in out.glob("r*/train/checkpoints/*") if p.name.isdigit()]
    return len(done), max(steps, default=("", 0))


def test_full_tmpfs_at_four_points_then_resumed(finished, tmp_path, capsys):
    root, ref = finished
    mnt = tmp_path / "small"
    mnt.mkdir()
    total = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={total // 10}", "tmpfs",
                            str(mnt)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()[:80]})")
    out = mnt / "run"
    try:
        stops = []
        for share in (0.1, 0.35, 0.6, 0.85):
            subprocess.run(["mount", "-o", f"remount,size={int(total * share)}", str(mnt)],
                           check=True)
            capsys.readouterr()
            assert main(command(root, out)) == 2, share
            _one_line_disk_full(capsys.readouterr().err, out)
            stops.append(_progress(out))
        subprocess.run(["mount", "-o", f"remount,size={3 * total}", str(mnt)], check=True)
        assert main(command(root, out)) == 0
        assert_same_results(out, ref)
        assert stops == sorted(set(stops)), stops  # four points, each further in the run
        assert not list(out.rglob("*.tmp-*")) and not list(out.rglob("*orbax-checkpoint-tmp*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
