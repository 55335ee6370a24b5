"""tpt bench accelerator on CPU at a tiny shape: every run it lists comes back as a table row
(the subprocesses really run), a failing run is a row with its one-line error and exit 1,
and the shipped GSM8K-like lengths are clipped as asked."""
import json

from tpt_jax.bench import accelerator as A
from tpt_jax.cli import main

TINY = ["bench", "accelerator", "--shape", "test-tiny", "--dtype", "float32", "--prompt", "8",
        "--slots", "2", "--rows-per-slot", "2", "--max-new", "16", "--train-batch", "8",
        "--train-seq", "32", "--timeout", "300"]


def test_every_run_is_a_row(capsys):
    assert main(TINY + ["--attention", "paged"]) == 0
    out = capsys.readouterr().out.splitlines()
    results = [json.loads(x) for x in out if x.startswith("{")]
    assert [r["run"] for r in results] == ["uniform", "ragged 2 slots paged", "train"]
    assert not any("error" in r for r in results)
    ragged = results[1]
    assert ragged["attention"] == "paged" and ragged["rows"] == 4
    assert ragged["useful_tokens"] == sum(A.ragged_lengths(4, 16))
    assert results[2]["tokens_per_s"] > 0
    assert sum(x.startswith("| ") for x in out) == 2 + 3  # header, rule, three runs


def test_a_failing_run_is_a_row(capsys, monkeypatch):
    monkeypatch.setattr(A, "runs", lambda args, backend, lengths_file: [
        ("ragged", ["sample", "--shape", "test-tiny", "--lengths", "/nonexistent.json"])])
    assert main(TINY) == 1
    out = capsys.readouterr().out
    assert "| ragged | exit 2: " in out and "/nonexistent.json" in out


def test_runs_past_the_budget_are_skipped(capsys):
    assert main(TINY + ["--attention", "paged", "--budget", "5"]) == 1
    out = capsys.readouterr().out
    assert out.count(" | skipped: the 5 s budget is spent |") == 3  # a table row each


def test_shipped_lengths():
    full = A.ragged_lengths(8192, 4096)
    clipped = A.ragged_lengths(1024, 1024)
    assert clipped == [min(x, 1024) for x in full[:1024]]
    assert 200 < sum(clipped) / len(clipped) < 400 and 0.01 < clipped.count(1024) / 1024 < 0.06
