"""Bad input: malformed configs (more in tests/test_config.py), records, run directories and
checkpoints. Each gives its clear one-line error or a counted skip, and no traceback reaches
the user: the CLI cases go through `tpt_jax.cli.main` (and one through a real subprocess)."""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpt_jax import io as tio
from tpt_jax.cli import main
from tpt_jax.config import TptError
from conftest import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
# small enough that a case which does get past the config reaches its error quickly
TINY = ["per_round={}", "model=test-tiny", "rounds=1", "data.synthetic_train=8", "data.synthetic_test=8",
        "data.seed_size=8", "think.n=1", "train.batch_size=8"]


def one_error_line(capsys, command: str) -> str:
    """stderr holds exactly one error line, `tpt COMMAND: error: ...`, and no traceback
    (log lines such as counted-skip warnings may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"tpt {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- tpt run


def _hf_tokenizer(path: Path, size: int) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, size)})
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>").save_pretrained(path)
    return str(path)


def _all_bad_dataset(path: Path, no_answer: bool = True) -> str:
    """Rows no stage can use (Think needs no answer, so `no_answer=False` leaves that row out)."""
    rows = [json.dumps({"id": "a", "answer": "1"}),                    # no question
            json.dumps({"id": "b", "question": "   ", "answer": "1"}),  # empty question
            json.dumps({"id": "d", "question": ["not", "text"], "answer": "1"}),
            "{broken", "[1, 2]"]
    if no_answer:
        rows.append(json.dumps({"id": "c", "question": "How many?"}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


RUN_CASES = [
    # (overrides, what the one error line must say)
    (["bogus.key=1"], r"unknown config key config\.bogus"),
    (["think.n=two"], r"config\.think\.n: expected an integer, got 'two'"),
    (["think.long_prompts=chop"], r"think\.long_prompts must be truncate or skip"),
    (["train.grad_accum=3"], r"train\.batch_size \(8\) must be divisible by train\.grad_accum"),
    (["mesh.data=2", "mesh.fsdp=2"], r"needs 4 devices, but 8 are available"),
    # the mesh has fsdp=-1 = 8 devices: a batch of 6 rows cannot split over them (found before
    # any model is built, not at round 0's first train step)
    (["train.batch_size=6"], r"micro-batch .* must be divisible by the data-parallel size"),
    (["per_round={1: {train: {batch_size: 12}}}"], r"divisible by the data-parallel size"),
    # the decode cache (found before any model is built)
    (["think.attention=paged", "think.kv_cache_gb=0.0001"],
     r"kv_cache_gb=0\.0001 holds \d+ pages of 16 tokens( \(\d+ on each of \d+ devices\))?, "
     r"but one row at its longest"),
    (["think.attention=paged", "think.kv_cache_share=0.5"],
     r"kv_cache_share needs a backend that reports its free memory \(GPU, TPU\), and this "
     r"one is cpu"),
    (["think.attention=pallas"], r"attention 'pallas' runs JAX's Pallas paged-attention "
                                 r"kernel \(GPU or TPU\), and this backend is cpu"),
    (["tokenizer=@HF300"], r"has 300 tokens but model\.vocab_size is 256"),
    (["data.source=jsonl", "data.train_path=@BAD", "data.test_path=@BAD"],
     r"no usable|no questions|no records"),
    # a source model's checkpoint that is not there: found before round 0 trains
    (["sources.models=[{name: weak, checkpoint: no/such/dir}]"],
     r"sources\.models\[0\] \(weak\): checkpoint no/such/dir \(relative to .*\) has neither "
     r"model\.json"),
]


@pytest.mark.parametrize("overrides,pattern", RUN_CASES, ids=[p for _, p in RUN_CASES])
def test_run_cli_one_line_errors(tmp_path, capsys, overrides, pattern):
    subst = {"@HF300": lambda: _hf_tokenizer(tmp_path / "tok", 300),
             "@BAD": lambda: _all_bad_dataset(tmp_path / "bad.jsonl")}
    args = []
    for o in TINY + overrides:
        for k, f in subst.items():
            if k in o:
                o = o.replace(k, f())
        args.append(o)
    assert main(["run", *args, "-o", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys, "run")
    assert re.search(pattern, line), line


def test_run_dir_lock_corrupt_state_and_foreign_state(tmp_path, capsys):
    from tpt_jax.config import load_run_config
    from tpt_jax.loop.rundir import RunDir
    out = tmp_path / "run"
    cfg = load_run_config(None, TINY)
    # a second run on a directory in use: refused before it reads or writes anything there
    with RunDir(str(out), cfg):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert main(["run", *TINY, "eval.n=3", "-o", str(out)]) == 2
        assert "another tpt run is using this directory" in one_error_line(capsys, "run")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the lock goes with the process (or the with-block): the same command now gets past it,
    # here up to the damaged state file, which config.json cannot stand in for: it shows
    # another config (with this one's, every stage would be redone)
    (out / "state.json").write_text('{"fingerprint": "x", "done": [')
    assert main(["run", *TINY, "eval.n=3", "-o", str(out)]) == 2
    assert re.search(r"state\.json: invalid JSON at line 1", one_error_line(capsys, "run"))
    (out / "state.json").write_text("[1, 2]")
    assert main(["run", *TINY, "eval.n=3", "-o", str(out)]) == 2
    assert "not a tpt run state file" in one_error_line(capsys, "run")


def test_held_lock_is_process_0s_alone(tmp_path, monkeypatch):
    """On a multi-process run process 0 holds the lock while process 1 starts: process 1 must
    not read the held lock as another run's (a race that failed the two-process run)."""
    from tpt_jax.config import load_run_config
    from tpt_jax.loop import rundir
    out, cfg = tmp_path / "run", load_run_config(None, TINY)
    with rundir.RunDir(str(out), cfg):
        with pytest.raises(TptError, match="another tpt run"):
            rundir.check_output(str(out), cfg)
        monkeypatch.setattr(rundir.jax, "process_index", lambda: 1)
        rundir.check_output(str(out), cfg)  # process 1: no error


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    """The real entry point: an unknown key and a wrong type, stderr is one line, exit 2."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for override, needle in (("think.nn=2", "unknown config key config.think.nn"),
                             ("train.pack=maybe", "config.train.pack: expected true/false")):
        p = subprocess.run([sys.executable, "-m", "tpt_jax.cli", "run", override, "-o",
                            str(tmp_path / "r")], env=env, capture_output=True, text=True,
                           cwd=REPO, timeout=300)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("tpt run: error: ") and needle in p.stderr, p.stderr


# ----------------------------------------------------------------------------- records


def test_dataset_rows_are_counted_skips_with_line_numbers(tmp_path):
    from tpt_jax.config import DataConfig
    from tpt_jax.data.sources import load_split
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "ok1", "question": "Tom has 3 apples. How many?", "answer": "#### 3"}),
        json.dumps({"id": "a", "answer": "1"}),
        json.dumps({"id": "b", "question": "  \n ", "answer": "1"}),
        json.dumps({"id": "c", "question": "How many?"}),
        json.dumps({"id": "d", "question": "How many?", "answer": ""}),
        json.dumps({"id": "e", "question": {"x": 1}, "answer": "1"}),
        "{broken",
        "[1, 2]",
        json.dumps({"id": "ok1", "question": "Again?", "answer": "2"}),
        json.dumps({"id": "ok2", "question": "Sam has 2 pens. How many?", "answer": 2}),
    ]) + "\n")
    skips = tio.Skips()
    recs = load_split(DataConfig(source="jsonl", train_path=str(f)), "train", skips)
    assert [r["id"] for r in recs] == ["ok1", "ok2"] and recs[1]["answer"] == "2"
    assert skips.by_reason == {
        "missing field 'question'": [f"{f}:2"], "empty question": [f"{f}:3"],
        "missing field 'answer'": [f"{f}:4"], "empty answer": [f"{f}:5"],
        "question/answer not text": [f"{f}:6"], "malformed JSON": [f"{f}:7"],
        "not a JSON object": [f"{f}:8"], "duplicate id": [f"{f}:9"]}


def test_think_cli_counts_bad_questions_then_one_line_error(tmp_path, capsys):
    """`tpt think` skips rows without a usable question (counted, with line numbers); with
    none left it stops with one line before loading any model."""
    bad = _all_bad_dataset(tmp_path / "bad.jsonl", no_answer=False)
    assert main(["think", "--dataset", bad, "--model", "test-tiny", "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{bad}: no questions" in err.splitlines()[-1]
    assert "1 empty question" in err and "1 question not text" in err and "malformed JSON" in err
    assert main(["think", "--dataset", str(tmp_path / "missing.jsonl"), "--model",
                 "test-tiny", "--out", str(tmp_path / "out")]) == 2
    assert "missing.jsonl: file not found" in one_error_line(capsys, "think")
    assert main(["think", "--dataset", bad, "--model", "test-tiny", "--out",
                 str(tmp_path / "out"), "--n", "0"]) == 2
    assert "--n must be >= 1" in one_error_line(capsys, "think")


def test_prune_cli_bad_strategy_and_missing_samples(tmp_path, capsys):
    ds = tmp_path / "d.jsonl"
    ds.write_text(json.dumps({"id": "q", "question": "?", "answer": "1"}) + "\n")
    base = ["prune", "--dataset", str(ds), "--out", str(tmp_path / "o.jsonl"),
            "--stats", str(tmp_path / "s.json")]
    assert main(base + ["--samples", str(ds), "--strategy", "best-of"]) == 2
    assert "unknown step 'best-of'" in one_error_line(capsys, "prune")
    assert main(base + ["--samples", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: file not found" in one_error_line(capsys, "prune")


def test_training_examples_missing_fields_are_counted(tmp_path, caplog):
    from tpt_jax.stages.sft_data import read_examples
    f = tmp_path / "ex.jsonl"
    f.write_text("\n".join([json.dumps({"prompt": "p", "completion": "c"}),
                            json.dumps({"prompt": "p"}), json.dumps({"completion": "c"}),
                            "not json"]) + "\n")
    assert read_examples(str(f)) == [{"prompt": "p", "completion": "c"}]
    assert "skipped 3 records" in caplog.text
    assert f"missing field 'completion' ({f}:2)" in caplog.text
    assert f"missing field 'prompt' ({f}:3)" in caplog.text


def test_tampered_think_shard_is_sampled_again(tmp_path, caplog):
    """A shard that lost or repeated a (question, sample) is not reused on resume: Think
    samples it again (to the same records: they depend on seed, question and sample only)."""
    from tpt_jax.stages import think as T
    caplog.set_level(logging.INFO)
    rec = lambda q, j: {"id": q, "sample": j, "source": "m", "prompt": "", "completion": "x",
                        "finish": "stop", "tokens": 1}
    tio.write_jsonl_atomic(tmp_path / T.shard_name(0),
                           [rec("q0", 0), rec("q0", 1), rec("q1", 0), rec("q1", 0)])
    tio.write_jsonl_atomic(tmp_path / T.shard_name(1), [rec("q2", 0), rec("q2", 1)])
    assert T._read_shard(str(tmp_path), 0, ["q0", "q1"], 2) is None
    assert "samples-00000.jsonl does not hold exactly samples 0..1" in caplog.text
    assert T._read_shard(str(tmp_path), 1, ["q2"], 2) == [rec("q2", 0), rec("q2", 1)]
    # a half-written shard (the temporary name of an atomic write) is removed, not read
    (tmp_path / ".samples-00002.jsonl.tmp-deadbeef").write_text('{"id": "q')
    T._remove_partial_shards(str(tmp_path))
    assert not list(tmp_path.glob(".samples-*"))


def test_long_prompts_policy_truncate_or_skip(tmp_path, caplog):
    from tpt_jax.stages import think as T
    from tpt_jax.config import ThinkConfig
    enc = [[2, 5, 6], [2, 5, 6, 7, 8, 9, 10], [2, 9]]
    got, long_idx = T.fit_prompts(enc, 4, "truncate")
    assert long_idx == [1] and got == [[2, 5, 6], [2, 8, 9, 10], [2, 9]]  # BOS + the tail
    got, long_idx = T.fit_prompts(enc, 4, "skip")
    assert long_idx == [1] and got == [[2, 5, 6], None, [2, 9]]
    # skip in a Think run: the long question gets no samples, the count is in think.json
    qs = [{"id": "long", "question": "x" * 200}, {"id": "long2", "question": "y" * 300}]
    cfg = ThinkConfig(n=2, shard_size=1, max_prompt_tokens=32, long_prompts="skip")
    recs = T.think(None, None, ByteTokenizer(), qs, cfg, str(tmp_path), template="plain", progress=False)
    assert recs == []
    manifest = json.loads((tmp_path / T.MANIFEST).read_text())
    assert manifest["long_prompts"] == "skip" and manifest["long_prompts_skipped"] == 2
    assert manifest["long_prompt_ids"] == ["long", "long2"]
    assert "2 of 2 prompts are longer than think.max_prompt_tokens 32 and were skipped" in caplog.text
    # the policy decides the samples: resuming the folder with the other one is refused
    with pytest.raises(TptError, match="long_prompts='skip'"):
        T.think(None, None, ByteTokenizer(), qs, ThinkConfig(n=2, shard_size=1, max_prompt_tokens=32),
                str(tmp_path), template="plain", progress=False)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_params(tmp_path_factory):
    import jax

    from tpt_jax.gemma import model as M
    from tpt_jax.gemma import weights
    from tpt_jax.gemma.config import model_preset
    model = M.make_model(model_preset("test-tiny"))
    params = M.init_params(model, jax.random.key(0))
    out = tmp_path_factory.mktemp("params") / "r00-params"
    weights.save_params(params, model.cfg, str(out))
    return out, model


def _damaged(src: Path, dst: Path, how: str) -> Path:
    import shutil
    shutil.copytree(src, dst)
    files = sorted(p for p in (dst / "params").rglob("*") if p.is_file())
    if how == "truncate":
        big = max((p for p in files if "/d/" in str(p)), key=lambda p: p.stat().st_size)
        os.truncate(big, big.stat().st_size // 3)
    elif how == "no-metadata":
        (dst / "params" / "_METADATA").unlink()
        for p in dst.rglob("manifest.ocdbt"):
            p.unlink()
    elif how == "partial":  # what a save killed mid-write leaves: only the temporary dir
        shutil.move(dst / "params", dst / "params.orbax-checkpoint-tmp")
    elif how == "empty-data":
        for p in files:
            if "/d/" in str(p):
                p.write_bytes(b"")
    elif how == "truncate-no-sizes":  # no files.json (an older or foreign checkpoint): Orbax
        (dst / "files.json").unlink()   # itself finds the damage
        big = max((p for p in files if "/d/" in str(p)), key=lambda p: p.stat().st_size)
        os.truncate(big, big.stat().st_size // 3)
    return dst


@pytest.mark.parametrize("how,pattern", [
    ("truncate", r"params/(.*/)?d/\w+ has \d+ bytes, expected \d+$"),
    ("no-metadata", r"params/_METADATA is missing$"),
    ("empty-data", r"params/(.*/)?d/\w+ has 0 bytes, expected \d+$"),
    ("partial", r"no Orbax params checkpoint \(expected .*/params\)"),
    ("truncate-no-sizes", r"cannot restore params"),
])
def test_damaged_round_params_one_line_error(saved_params, tmp_path, capfd, how, pattern):
    from tpt_jax.gemma import weights
    src, model = saved_params
    d = _damaged(src, tmp_path / "p", how)
    with pytest.raises(TptError, match=pattern) as info:
        weights.load_params(str(d), model)
    assert "\n" not in str(info.value)
    if how != "truncate-no-sizes":  # caught before Orbax's reader, which prints on failure
        assert "Traceback" not in capfd.readouterr().err


def test_damaged_params_through_the_cli(saved_params, tmp_path, capsys):
    src, _ = saved_params
    d = _damaged(src, tmp_path / "p", "truncate")
    assert main(["convert", str(d), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "bytes, expected" in one_error_line(capsys, "convert")
    (d / "model.json").write_text("{oops")
    assert main(["convert", str(d), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "model.json: invalid JSON at line 1" in one_error_line(capsys, "convert")
    (d / "model.json").write_text(json.dumps({"vocab_size": 256, "layers": 3}))
    assert main(["convert", str(d), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "model.json" in one_error_line(capsys, "convert")


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    """A learning rate of 1e30 blows the weights up after the first update: the stage stops
    with a one-line error naming the round and step, and never saves the bad state."""
    sys.path.insert(0, str(Path(__file__).parent))
    from sft_helpers import CharTokenizer, make_examples, tiny_model

    from tpt_jax.gemma import model as M
    from tpt_jax.gemma.checkpoint import Checkpoints
    from tpt_jax.config import TrainConfig
    from tpt_jax.stages.train import train
    import jax
    model = tiny_model()
    params = M.init_params(model, jax.random.key(0))
    cfg = TrainConfig(learning_rate=1e30, warmup_ratio=0.0, batch_size=8, max_length=32,
                      save_every=1, log_every=1, async_checkpoint=False, keep_checkpoints=5,
                      length_bucket=16)
    with pytest.raises(TptError) as info:
        train(params, model, CharTokenizer(), make_examples(32), cfg, str(tmp_path),
              label="round 2 train")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("round 2 train: loss ")
    m = re.search(r"at step (\d+) of 4; stopped without saving that state; the last good "
                  r"checkpoint is step (\d+) in ", msg)
    assert m, msg
    bad, good = int(m.group(1)), int(m.group(2))
    assert good == bad - 1 >= 1
    assert Checkpoints(str(tmp_path / "checkpoints")).steps() == list(range(1, bad))
