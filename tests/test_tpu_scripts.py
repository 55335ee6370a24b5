"""tpu_scripts/*.sh: shellcheck-clean, and --dry-run prints the right gcloud commands.

A fake `gcloud` that fails loudly shadows any real one on PATH, so a dry run that called
gcloud would fail the test. The remote commands the scripts send to the workers are run
here too, in a fake worker home, to prove they are valid shell that does what they say.
"""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
ALL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_gcloud(tmp_path):
    """PATH whose `gcloud` fails loudly and leaves a marker file if anything calls it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud-was-called"
    _write_exe(bin_dir / "gcloud", f"#!/bin/sh\necho \"FAKE GCLOUD CALLED: $*\" >&2\n"
                                   f"echo \"$*\" >> {shlex.quote(str(marker))}\nexit 97\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPT_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    assert shutil.which("gcloud", path=env["PATH"]) == str(bin_dir / "gcloud")
    return env, marker


def run_script(env, script, *args, check=True):
    proc = subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, f"{script} {args} -> {proc.returncode}\n{proc.stderr}"
    return proc


def gcloud_lines(stdout: str) -> list[list[str]]:
    """Each printed gcloud command, split as a shell would split it."""
    cmds = [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]
    assert cmds, stdout
    return cmds


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def remote_commands(cmds):
    return [flag(c, "command") for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]


# ----------------------------------------------------------------------------- shellcheck


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("shellcheck is not installed in CI (.ci/run installs it with apt-get)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    assert ALL_SCRIPTS, "no tpu_scripts/*.sh"
    proc = subprocess.run(["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in ALL_SCRIPTS]],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [p.name for p in ALL_SCRIPTS if p.name != "common.sh"])
def test_help_and_unknown_options(fake_gcloud, script):
    env, marker = fake_gcloud
    proc = run_script(env, script, "--help")
    assert proc.stdout.startswith("Usage: ") and "--dry-run" in proc.stdout
    bad = run_script(env, script, "--no-such-option", "--dry-run", check=False)
    assert bad.returncode == 2 and "unknown option: --no-such-option" in bad.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------- dry runs


def test_dry_run_gemma2_2b_on_v5e_8(fake_gcloud):
    env, marker = fake_gcloud
    proc = run_script(env, "run_all.sh", "--dry-run", "--name", "tpt-2b", "--zone", "us-west4-a",
                      "--project", "my-proj", "--type", "v5e-8", "--spot",
                      "--config", "gemma2_2b_gsm8k", "--output", "gs://my-bucket/tpt/gemma2-2b")
    assert not marker.exists(), marker.read_text()
    cmds = gcloud_lines(proc.stdout)
    verbs = [" ".join(c[1:5]) for c in cmds]
    assert verbs == ["compute tpus tpu-vm create", "compute tpus tpu-vm scp",
                     "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",
                     "compute tpus tpu-vm ssh", "compute tpus tpu-vm scp",
                     "compute tpus tpu-vm ssh"]
    create = cmds[0]
    assert create[5] == "tpt-2b" and "--spot" in create
    assert flag(create, "accelerator-type") == "v5litepod-8"
    assert flag(create, "version") == "v2-alpha-tpuv5-lite"
    for c in cmds:
        assert flag(c, "zone") == "us-west4-a" and flag(c, "project") == "my-proj"
        if c[4] in ("ssh", "scp"):
            assert flag(c, "worker") == "all"
    # setup: source tarball to every worker, pip install -e .[tpu], device check
    assert cmds[1][6] == "tpt-2b:tpt_jax-src.tar.gz"
    install, check = remote_commands(cmds)[:2]
    assert "uv venv -q --allow-existing --python 3.11 ~/tpt-venv" in install  # JAX needs >= 3.11
    assert 'uv pip install -q --python ~/tpt-venv/bin/python -e ".[tpu]"' in install
    assert "python3 -m tpt_jax.distributed" in check
    # launch: the config goes to every worker, then the same tpt run starts on all of them
    assert cmds[5][5] == str(REPO / "configs" / "gemma2_2b_gsm8k.yaml")
    assert cmds[5][6] == "tpt-2b:tpt_run/gemma2_2b_gsm8k.yaml"
    launch = remote_commands(cmds)[-1]
    assert ("nohup tpt run ~/tpt_run/gemma2_2b_gsm8k.yaml --output gs://my-bucket/tpt/gemma2-2b"
            in launch)
    assert 'worker-$W.log' in launch and launch.rstrip().endswith('log $LOG"')


def test_dry_run_gemma2_9b_on_v5p_32_queued(fake_gcloud):
    env, marker = fake_gcloud
    proc = run_script(env, "run_all.sh", "--dry-run", "--name", "tpt-9b", "--zone", "us-east5-a",
                      "--type", "v5p-32", "--queued", "--config", "configs/gemma2_9b_gsm8k.yaml",
                      "--output", "gs://my-bucket/tpt/gemma2-9b", "--", "rounds=4")
    assert not marker.exists(), marker.read_text()
    assert "16 chips on 4 host(s)" in proc.stderr
    cmds = gcloud_lines(proc.stdout)
    create, describe = cmds[0], cmds[1]
    assert create[1:6] == ["compute", "tpus", "queued-resources", "create", "tpt-9b"]
    assert flag(create, "node-id") == "tpt-9b"
    assert flag(create, "accelerator-type") == "v5p-32"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert describe[1:6] == ["compute", "tpus", "queued-resources", "describe", "tpt-9b"]
    rest = cmds[2:]
    assert all(c[3] == "tpu-vm" and flag(c, "worker") == "all" for c in rest)
    assert all(flag(c, "zone") == "us-east5-a" and not any(a.startswith("--project") for a in c)
               for c in cmds)
    assert ["configs/gemma2_9b_gsm8k.yaml", "tpt-9b:tpt_run/gemma2_9b_gsm8k.yaml"] == rest[-2][5:7]
    assert ("nohup tpt run ~/tpt_run/gemma2_9b_gsm8k.yaml --output gs://my-bucket/tpt/gemma2-9b "
            "rounds=4 >>") in remote_commands(rest)[-1]


@pytest.mark.parametrize("tpu_type, accelerator, runtime", [
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
])
def test_type_table(fake_gcloud, tpu_type, accelerator, runtime):
    env, marker = fake_gcloud
    cmd = gcloud_lines(run_script(env, "create.sh", "--dry-run", "--type", tpu_type).stdout)[0]
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpt-tpu"]
    assert flag(cmd, "accelerator-type") == accelerator and flag(cmd, "version") == runtime
    assert not marker.exists()


@pytest.mark.parametrize("args, message", [
    (["--type", "v7-8"], "unknown TPU generation"),
    (["--type", "v5p-12"], "multiple of 8"),
    (["--type", "v5e-2"], "1, 4, 8, 16"),
    ([], "--type is required"),
    (["--type", "v5e-8", "--name", "Bad_Name"], "lowercase"),
    (["--type", "v5e-8", "--reserved"], "--reserved needs --queued"),
])
def test_create_rejects_bad_options(fake_gcloud, args, message):
    env, marker = fake_gcloud
    proc = run_script(env, "create.sh", "--dry-run", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout
    assert not marker.exists()


def test_launch_requires_gs_output_and_config(fake_gcloud, tmp_path):
    env, marker = fake_gcloud
    proc = run_script(env, "launch.sh", "--config", "x.yaml", "--output", "/tmp/out", check=False)
    assert proc.returncode == 2 and "must be a gs:// URL" in proc.stderr
    proc = run_script(env, "launch.sh", "--config", str(tmp_path / "missing.yaml"),
                      "--output", "gs://b/x", check=False)
    assert proc.returncode == 1 and "config not found" in proc.stderr
    # run_all checks every step's options before it would create anything
    proc = run_script(env, "run_all.sh", "--type", "v5e-8", "--config", str(tmp_path / "nope.yaml"),
                      "--output", "gs://b/x", check=False)
    assert proc.returncode == 2 and "config not found" in proc.stderr
    assert not marker.exists()


def test_logs_and_teardown_dry_run(fake_gcloud):
    env, marker = fake_gcloud
    logs = gcloud_lines(run_script(env, "logs.sh", "--dry-run", "--name", "tpt-9b",
                                   "--zone=us-east5-a", "--lines", "20").stdout)
    assert len(logs) == 1 and flag(logs[0], "worker") == "all"
    assert "tail -n 20 -F ~/tpt_run/worker-$W.log" in flag(logs[0], "command")
    one = gcloud_lines(run_script(env, "logs.sh", "--dry-run", "--worker", "0", "--status").stdout)
    assert flag(one[0], "worker") == "0" and "tpt $S" in flag(one[0], "command")

    down = gcloud_lines(run_script(env, "teardown.sh", "--dry-run", "--name", "tpt-9b",
                                   "--zone", "us-east5-a", "--queued", "--yes",
                                   "--save-logs", "logs/9b").stdout)
    assert down[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert down[0][5:7] == ["tpt-9b:tpt_run/worker-*.log", "logs/9b/"]
    assert down[1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "tpt-9b",
                       "--force", "--zone=us-east5-a", "--quiet"]
    vm = gcloud_lines(run_script(env, "teardown.sh", "--dry-run", "--name", "tpt-2b").stdout)
    assert vm == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "tpt-2b"]]
    assert not marker.exists()


# ----------------------------------------------------------------------------- real runs


@pytest.fixture
def recording_gcloud(tmp_path):
    """A `gcloud` that records its arguments and, for scp, copies the local file."""
    bin_dir = tmp_path / "rbin"
    bin_dir.mkdir()
    record, copies = tmp_path / "gcloud-calls", tmp_path / "copies"
    copies.mkdir()
    _write_exe(bin_dir / "gcloud", f"""#!/bin/bash
printf '%s\\n' "$*" >> {shlex.quote(str(record))}
if [ "$4" = scp ]; then cp "$5" {shlex.quote(str(copies))}/; fi
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPT_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    env["TMPDIR"] = str(tmp_path)
    return env, record, copies


def test_setup_packs_the_checkout(recording_gcloud, tmp_path):
    env, record, copies = recording_gcloud
    run_script(env, "setup.sh", "--name", "tpt-x", "--zone", "z", "--no-check")
    calls = record.read_text().splitlines()
    assert len(calls) == 2 and calls[0].startswith("compute tpus tpu-vm scp ")
    assert not (tmp_path / "tpt_jax-src-tpt-x.tar.gz").exists()  # removed after the copy
    with tarfile.open(copies / "tpt_jax-src-tpt-x.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"setup.py", "tpt_jax/distributed.py", "tpu_scripts/common.sh"} <= names
    assert not any(n.startswith(".git/") or "__pycache__" in n for n in names)


def test_remote_launch_commands_run_on_a_fake_worker(fake_gcloud, tmp_path):
    """The launch/stop/logs commands, executed in a fake worker home with a fake `tpt`."""
    env, marker = fake_gcloud
    home = tmp_path / "home"
    (home / "tpt_jax").mkdir(parents=True)
    (home / ".local" / "bin").mkdir(parents=True)
    _write_exe(home / ".local" / "bin" / "tpt",
               "#!/bin/sh\necho \"tpt args: $*\"\necho \"HF_TOKEN=$HF_TOKEN\"\nexec sleep 30\n")
    wbin = tmp_path / "wbin"
    wbin.mkdir()
    _write_exe(wbin / "curl", "#!/bin/sh\necho 3\n")  # the metadata server: worker 3
    cfg = tmp_path / "my_cfg.yaml"
    cfg.write_text("rounds: 1\n")

    def remote(*args):
        out = run_script(env, "launch.sh", "--dry-run", *args).stdout
        return remote_commands(gcloud_lines(out))[-1]

    worker_env = dict(env, HOME=str(home), PATH=f"{wbin}{os.pathsep}{env['PATH']}")

    def on_worker(command):
        return subprocess.run(["bash", "-c", command], env=worker_env, cwd=home,
                              capture_output=True, text=True, timeout=90)

    launch = remote("--config", str(cfg), "--output", "gs://b/run", "--env", "HF_TOKEN=a b'c",
                    "--", "x.y=1")
    first = on_worker(launch)
    assert first.returncode == 0, first.stderr
    assert "worker 3: started tpt" in first.stdout
    pid = int((home / "tpt_run" / "tpt.pid").read_text())
    log = home / "tpt_run" / "worker-3.log"
    try:
        for _ in range(50):
            if "HF_TOKEN" in log.read_text():
                break
            time.sleep(0.1)
        text = log.read_text()
        assert f"tpt args: run {home}/tpt_run/my_cfg.yaml --output gs://b/run x.y=1" in text
        assert "HF_TOKEN=a b'c" in text
        # a second launch refuses while the first is alive
        again = on_worker(launch)
        assert again.returncode == 1 and "still running" in again.stderr
        # --stop ends it
        stop = run_script(env, "launch.sh", "--dry-run", "--stop").stdout
        stopped = on_worker(remote_commands(gcloud_lines(stop))[0])
        assert stopped.returncode == 0 and f"worker 3: stopped tpt (pid {pid})" in stopped.stdout
        # logs --no-follow prefixes lines with the worker
        logs = run_script(env, "logs.sh", "--dry-run", "--no-follow").stdout
        shown = on_worker(remote_commands(gcloud_lines(logs))[0])
        assert "[w3] tpt args: run" in shown.stdout
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not marker.exists()
