"""tpt bench sample: the ragged workload (--lengths) on both paths, and bad lengths files."""
import json
import os
import subprocess
import sys

import pytest

from tpt_jax.cli import main


def bench(capsys, *args):
    assert main(["bench", "sample", "--shape", "test-tiny", "--prompt", "8", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ragged_workload_both_paths(tmp_path, capsys):
    lengths = [3, 17, 5, 40, 2, 9, 11, 6, 25, 4]
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps(lengths))
    cont = bench(capsys, "--batch", "4", "--lengths", str(path))
    static = bench(capsys, "--batch", "4", "--lengths", str(path), "--static")
    for r in (cont, static):
        assert r["workload"] == "ragged" and r["useful_tokens"] == sum(lengths)
        assert r["slots"] == 4 and r["rows"] == len(lengths) and r["compiles"] == 0
        assert r["useful_tokens_per_s"] > 0 and 0 < r["slot_utilization"] <= 1
    assert (cont["path"], static["path"]) == ("continuous", "static")
    # static batches of 4 run to their longest row: 40 + 25 + 11 steps
    assert static["decode_steps"] == 40 + 25 + 11
    assert static["slot_utilization"] == round(sum(lengths) / (4 * 76), 4)
    assert cont["slot_utilization"] > static["slot_utilization"]
    assert cont["kv_cache_mib"] <= static["kv_cache_mib"]
    # the dense cache reads every column of every slot; live columns are fewer
    assert 0 < cont["kv_live_mib_per_step"] < cont["kv_read_mib_per_step"]
    assert cont["weights_mib"] > 0 and "roofline_share" not in cont  # CPU: no HBM figure


def test_a_call_per_shard_leaves_slots_idle(tmp_path, capsys):
    """--per-call 5: two calls, the second starting after the first's longest row (40)
    ends; one call (Think's stream) fills those slots with the second half's rows."""
    lengths = [3, 40, 5, 2, 4, 17, 5, 9, 2, 6]
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps(lengths))
    one = bench(capsys, "--batch", "4", "--lengths", str(path))
    apart = bench(capsys, "--batch", "4", "--lengths", str(path), "--per-call", "5")
    assert (one["prompts_a_call"], apart["prompts_a_call"]) == (10, 5)
    assert one["useful_tokens"] == apart["useful_tokens"] == sum(lengths)
    assert apart["decode_steps"] >= 40 + 17 > one["decode_steps"]
    assert apart["slot_utilization"] < one["slot_utilization"]
    # the dense cache: every slot's columns each step, whichever call the step is in
    assert apart["kv_read_mib_per_step"] == one["kv_read_mib_per_step"] > 0


def test_paged_pool_holds_more_rows_per_gb(tmp_path, capsys):
    """--n samples of each length's prompt through a pool of 6 pages (96 columns, where the
    dense cache reserves 64 for each of 6 slots): the same useful tokens, more rows decoding
    per GB of cache, pages within the pool, preempted rows' thrown-away tokens reported."""
    import jax.numpy as jnp
    from tpt_jax.engine.paged import pool_bytes
    from tpt_jax.gemma.config import model_preset
    lengths = [3, 17, 5, 40, 2, 9, 11, 6, 25, 4]
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps(lengths))
    common = ("--batch", "6", "--n", "2", "--lengths", str(path))
    dense = bench(capsys, *common, "--attention", "dense")
    gb = pool_bytes(model_preset("test-tiny"), 6.5, 16, jnp.float32) / 1e9
    paged = bench(capsys, *common, "--attention", "paged", "--kv-cache-gb", str(gb))
    for r in (dense, paged):
        assert r["useful_tokens"] == 2 * sum(lengths) and (r["prompts"], r["rows"]) == (10, 20)
    assert paged["pool_pages"] == 6 and 0 < paged["peak_pages"] <= 6
    assert paged["rows_per_gb"] > 1.3 * dense["rows_per_gb"]  # pages of 16: coarse for rows this short
    assert paged["preempted_tokens"] >= paged["preempted"] >= 0


def test_uniform_workload(capsys):
    r = bench(capsys, "--batch", "2", "--n", "2", "--new", "6", "--repeats", "1")
    assert r["workload"] == "uniform" and r["generated_tokens"] == 2 * 2 * 6
    assert r["slot_utilization"] == 1.0


@pytest.mark.parametrize("text", ["{\"a\": 1}", "[1, 0, 3]", "[]", "[1.5]", "[true]", "[-2]",
                                  "not json", "[1, \"2\"]"])
def test_bad_lengths_file_is_one_line(tmp_path, capsys, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["bench", "sample", "--shape", "test-tiny", "--lengths", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lengths" in err[0] and str(path) in err[0], err


def test_bad_lengths_cli_no_traceback(tmp_path):
    missing = tmp_path / "missing.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "tpt_jax.cli", "bench", "sample", "--lengths",
                        str(missing)], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 2
    lines = [l for l in p.stderr.strip().splitlines() if "error" in l]
    assert len(p.stderr.strip().splitlines()) == 1 and str(missing) in lines[0], p.stderr
    assert "Traceback" not in p.stderr
