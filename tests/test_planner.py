"""Compute-matched sampling: S_WC = S_SE * P_SE / P_WC, and the `tpt budget` command."""
import json

import pytest

from tpt_jax import cli
from tpt_jax.config import TptError
from tpt_jax.gemma.config import MODEL_PRESETS
from tpt_jax.methods.planner import compute_matched_samples, parse_params, plan, samples_for_budget


def test_9b_vs_27b_gives_three_times_the_samples():
    assert compute_matched_samples(10, 27e9, 9e9) == pytest.approx(30)
    out = plan(strong=parse_params("27B"), weak=parse_params("9B"), samples_strong=10)
    assert out["ratio"] == pytest.approx(3)
    assert out["weak"]["samples"] == 30 and out["strong"]["samples"] == 10


def test_equal_budget_in_flops():
    out = plan(strong=27e9, weak=9e9, budget_flops=2 * 27e9 * 100 * 50 * 4, questions=50,
               tokens_per_sample=100)
    assert out["strong"]["samples_per_question"] == pytest.approx(4)
    assert out["weak"]["samples_per_question"] == pytest.approx(12)
    assert out["strong"]["flops"] == pytest.approx(out["weak"]["flops"])


def test_price_ratio_and_floor():
    out = plan(price_ratio=2.5, samples_strong=3)
    assert out["weak"]["samples_per_question"] == pytest.approx(7.5)
    assert out["weak"]["samples"] == 7  # never over budget


def test_parse_params():
    assert parse_params("9e9") == 9e9
    assert parse_params("2.6b") == pytest.approx(2.6e9)
    assert parse_params("350M") == 350e6
    assert parse_params("gemma2-9b") == MODEL_PRESETS["gemma2-9b"].param_count()
    with pytest.raises(TptError):
        parse_params("nine billion")
    with pytest.raises(TptError):
        parse_params("0")


def test_samples_for_budget():
    assert samples_for_budget(2 * 1e9 * 10 * 5 * 3, 1e9, 5, 10) == pytest.approx(3)


def test_missing_inputs_are_one_line_errors():
    with pytest.raises(TptError):
        plan(strong=27e9, samples_strong=10)
    with pytest.raises(TptError):
        plan(strong=27e9, weak=9e9)


def test_budget_cli(capsys):
    assert cli.main(["budget", "--strong", "27B", "--weak", "9B", "--samples-strong", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weak"]["samples"] == 30
    assert cli.main(["budget", "--strong", "27B"]) == 2  # one-line error, no traceback
    assert "error" in capsys.readouterr().err
