"""tpt plan: ahead-of-time per-device memory from XLA, checked against the shard arithmetic."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tpt_jax.bench import plan as PL
from tpt_jax.config import ConfigError, load_run_config
from tpt_jax.gemma.config import model_preset

GiB = 1024 ** 3
OVERRIDES = ["per_round={}", "model=test-tiny", "dtype=bfloat16", "param_dtype=float32",
             "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
             "train.batch_size=4", "train.grad_accum=1", "train.max_length=32",
             "train.remat=full", "think.batch_size=8", "think.n=2",
             "think.max_prompt_tokens=16", "think.max_new_tokens=8"]


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = load_run_config("tiny_cpu", OVERRIDES)
    return cfg, PL.make_plan(cfg, 4)


def test_param_and_state_bytes_are_the_shards(tiny_plan):
    cfg, plan = tiny_plan
    mcfg = model_preset("test-tiny")
    total = mcfg.param_count() * 4  # f32 master weights
    assert plan["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    train = plan["programs"]["train"]
    # Everything but the tiny norm scales shards over fsdp x tensor = 4.
    assert train["parts"]["params"] == pytest.approx(total / 4, rel=0.05)
    assert train["parts"]["params"] >= total / 4
    assert train["params_total"] == total
    # Adam: two f32 moments per parameter (plus a step count).
    assert train["parts"]["opt_state"] == pytest.approx(2 * train["parts"]["params"], rel=0.01)
    # XLA's view: the state is an argument, donated (aliased) into the output.
    xla = train["xla"]
    state = train["parts"]["params"] + train["parts"]["opt_state"]
    assert xla["argument"] >= state + train["parts"]["batch"]
    assert xla["argument"] == pytest.approx(state + train["parts"]["batch"], rel=0.01)
    assert xla["alias"] == pytest.approx(state, rel=0.01)
    assert xla["temp"] > 0
    assert train["peak"] == xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] \
        + xla["generated_code"]
    assert train["held"] == train["parts"]["params"]
    assert train["total"] == train["peak"] + train["held"]
    # batch: int32/f32 arrays [grad_accum 1, 4 rows / dp 2, 32] (tokens, positions, targets,
    # weights and, with loss_bucket, loss_pos)
    one = 1 * 2 * 32 * 4
    assert train["parts"]["batch"] % one == 0 and train["parts"]["batch"] // one in (4, 5)


def test_sample_bytes(tiny_plan):
    cfg, plan = tiny_plan
    mcfg = model_preset("test-tiny")
    sample = plan["programs"]["sample"]
    # Sampling layout: tensor-parallel only (replicated over fsdp).
    assert sample["parts"]["params"] == pytest.approx(mcfg.param_count() * 4 / 2, rel=0.05)
    s = sample["shape"]
    assert s == {"rows": 8, "samples_per_prompt": 2, "max_prompt_tokens": 16,
                 "max_new_tokens": 8, "cache_length": 24}
    rows_per_device = 8 // 2  # rows over (data, fsdp)
    kv = 2 * mcfg.num_layers * rows_per_device * (mcfg.num_kv_heads // 2) * 24 \
        * mcfg.head_dim * 2  # k and v, bf16
    assert sample["parts"]["kv_cache"] == kv + rows_per_device * 24 * 4  # + int32 positions
    per_column = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * 2
    # dense: 24 columns + positions; paged: 16 + 8 - 1 columns in whole pages of 16
    assert sample["kv_rows_per_gb"] == {"dense": round(1e9 / (24 * (per_column + 4)), 2),
                                        "paged_at_limit": round(1e9 / (32 * per_column), 2),
                                        "page_size": 16}
    xla = sample["xla"]
    assert xla["argument"] == pytest.approx(
        sample["parts"]["params"] + sample["parts"]["kv_cache"], rel=0.01)
    assert xla["alias"] >= kv  # the cache is donated
    assert sample["held"] == plan["programs"]["train"]["parts"]["params"]
    assert plan["total"] == max(p["total"] for p in plan["programs"].values())
    assert plan["hbm_gib"] == {**PL.TPU_HBM_GIB, "gpu80": 79.6, "gpu141": 140.4}
    assert plan["fits"] == PL.fits(plan["total"], plan["hbm_gib"])
    assert all(v == "yes" for v in plan["fits"].values())


def test_fits_thresholds():
    assert PL.fits(10 * GiB) == {"v5e": "yes", "v4": "yes", "v6e": "yes", "v5p": "yes"}
    assert PL.fits(15 * GiB)["v5e"] == "tight"  # > 90% of 16 GiB
    assert PL.fits(17 * GiB) == {"v5e": "no", "v4": "yes", "v6e": "yes", "v5p": "yes"}
    assert PL.fits(30 * GiB)["v6e"] == "tight"
    assert PL.fits(33 * GiB) == {"v5e": "no", "v4": "no", "v6e": "no", "v5p": "yes"}
    assert set(PL.fits(200 * GiB).values()) == {"no"}
    assert PL.fits(16 * GiB)["v5e"] == "tight" and PL.fits(16 * GiB + 1)["v5e"] == "no"


def test_table_and_overrides(tiny_plan):
    cfg, plan = tiny_plan
    text = PL.format_plan(plan)
    assert "test-tiny" in text and "MiB/device" in text and "fits: v5e (yes)" in text
    assert "KV rows per GB: dense " in text
    assert "train" in text and "sample" in text and "v5p 95G" in text
    json.dumps(plan)  # --json output is plain data
    from tpt_jax.config import MeshConfig
    cfg2 = PL.apply_shape_overrides(cfg, MeshConfig(1, 4, 1), batch=8, seq=64, rows=16)
    assert (cfg2.mesh.fsdp, cfg2.train.batch_size, cfg2.train.max_length,
            cfg2.think.batch_size) == (4, 8, 64, 16)
    assert cfg.train.batch_size == 4  # the original is unchanged


def test_cli_reruns_itself_with_more_devices(monkeypatch, capsys):
    """More devices than this process has: the command runs again in a fresh process with
    XLA_FLAGS asking for them (the subprocess call is captured here, not run)."""
    from tpt_jax import cli
    from tpt_jax.cli import plan as plan_cli
    calls = []
    monkeypatch.setattr(plan_cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.delenv(plan_cli._CHILD_ENV, raising=False)
    rc = cli.main(["plan", "tiny_cpu", "model=test-tiny", "--devices", "64", "--mesh", "1,8,8",
                   "--batch", "8", "--json"])
    assert rc == 0 and len(calls) == 1
    cmd, env = calls[0]
    assert cmd[1:] == ["-m", "tpt_jax.cli", "plan", "tiny_cpu", "model=test-tiny", "--devices",
                       "64", "--mesh", "1,8,8", "--batch", "8", "--json"]
    assert "--xla_force_host_platform_device_count=64" in env["XLA_FLAGS"].split()
    assert env["JAX_PLATFORMS"] == "cpu" and env[plan_cli._CHILD_ENV] == "1"


def test_cli_errors_are_one_line(capsys):
    from tpt_jax import cli
    # 4 devices as fsdp: a batch of 2 cannot split over them
    rc = cli.main(["plan", "tiny_cpu", "model=test-tiny", "--devices", "4", "--mesh", "1,4,1",
                   "--batch", "2", "--only", "train"])
    err = capsys.readouterr().err
    assert rc == 2 and "divisible by the data-parallel size" in err and "Traceback" not in err
    assert cli.main(["plan", "tiny_cpu", "--devices", "0"]) == 2


def test_tpu_topology_names_are_checked():
    with pytest.raises(ConfigError, match="TYPE:AxB"):
        PL.tpu_devices("v9z:2x4")
    with pytest.raises(ConfigError, match="TYPE:AxB"):
        PL.tpu_devices("v5e:two")


def test_a_program_the_tpu_compiler_refuses_does_not_fit(monkeypatch):
    """libtpu's compiler raises RESOURCE_EXHAUSTED for a program that cannot fit the HBM:
    the plan records it as not fitting instead of failing (programs faked: no compile)."""
    cfg = load_run_config("tiny_cpu", OVERRIDES)
    fake_devices = PL.cpu_devices(4)
    monkeypatch.setattr(PL, "tpu_devices", lambda topo: (fake_devices, "v5e", 16.0))

    def refuse(*a):
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                           "required for HLO temporaries (15.98G) exceeds available HBM (15.75G).")

    train = {"program": "train", "total": 5 * GiB, "peak": 4 * GiB, "held": GiB,
             "parts": {"params": GiB, "opt_state": 2 * GiB, "temp": GiB, "batch": 0},
             "shape": {"batch_size": 4, "grad_accum": 1, "max_length": 32, "remat": "full"}}
    monkeypatch.setattr(PL, "plan_train", lambda *a: dict(train))
    monkeypatch.setattr(PL, "plan_sample", refuse)
    plan = PL.make_plan(cfg, tpu="v5e:2x2")
    assert plan["compiler"] == "tpu v5e:2x2" and plan["hbm_gib"] == {"v5e": 16.0}
    assert plan["programs"]["train"]["fits"] == {"v5e": "yes"}
    assert plan["programs"]["sample"]["total"] is None
    assert "15.98G" in plan["programs"]["sample"]["error"]
    assert plan["total"] is None and plan["fits"] == {"v5e": "no"}
    text = PL.format_plan(plan)
    assert "sample: does not compile: Ran out of memory" in text and "fits: none" in text


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_tpu_compiler_plan(tiny_plan):
    """With libtpu: the same tiny plan compiled by the TPU compiler for a v5e topology."""
    cfg, cpu = tiny_plan
    plan = PL.make_plan(cfg, tpu="v5e:2x2")
    assert plan["devices"] == 4 and plan["fits"] == {"v5e": "yes"}
    for name in ("train", "sample"):  # the shard sizes do not depend on the compiler
        assert plan["programs"][name]["parts"]["params"] == cpu["programs"][name]["parts"]["params"]
