"""Property tests over every reader of user files: random bytes, truncation at every length
and JSON of the wrong types. Nothing but the one-line TptError (or a counted skip, where the
stage skips bad rows) may come out."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpt_jax import io as tio
from tpt_jax.config import DataConfig, TptError, load_run_config
from tpt_jax.config_io import to_dict
from tpt_jax.gemma.config import model_preset

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON values of every type, nested a little
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)
# bytes that look like JSONL often enough to reach the later checks
jsonl_bytes = st.lists(
    st.one_of(st.binary(max_size=30),
              json_values.map(lambda v: json.dumps(v).encode()),
              st.dictionaries(st.sampled_from(["id", "question", "answer", "prompt",
                                               "completion", "sample"]), json_values,
                              max_size=5).map(lambda d: json.dumps(d).encode())),
    max_size=6).map(b"\n".join)


ROOT = Path(tempfile.mkdtemp(prefix="tpt-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_fuzz_files():
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


def _file(data: bytes, name: str = "f.jsonl") -> str:
    """`data` as file `name`, alone in a new directory (hypothesis calls a test many times)."""
    d = Path(tempfile.mkdtemp(dir=ROOT))
    (d / name).write_bytes(data)
    return str(d / name)


def only_tpt_errors(fn, *args, **kwargs):
    """Call fn; a TptError must be one line and name its file. Returns the result or None."""
    try:
        return fn(*args, **kwargs)
    except TptError as e:
        assert "\n" not in str(e), str(e)
        return None


# ----------------------------------------------------------------------------- JSON, JSONL


@FUZZ
@given(jsonl_bytes)
def test_read_jsonl_counts_every_bad_line(data):
    p = _file(data)
    skips = tio.Skips()
    got = list(tio.read_jsonl(p, skips, required=("id",)))  # with skips: never raises
    lines = [n for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    assert len(got) + skips.total() == len(lines)
    assert all(isinstance(r, dict) and "id" in r for _, r in got)
    only_tpt_errors(lambda: list(tio.read_jsonl(p)))


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_read_json_bytes_and_types(data):
    p = _file(data, "x.json")
    obj = only_tpt_errors(tio.read_json, p)
    assert obj is None or isinstance(obj, dict)


def test_truncation_at_every_length():
    """A JSON file or JSONL file cut anywhere (a killed copy): an error or skips, never a crash."""
    doc = json.dumps({"fingerprint": "abc", "done": ["r00/train"], "é": [1.5, None, True]})
    rows = "\n".join(json.dumps({"id": f"q{i}", "question": f"Wie viele Äpfel? {i}",
                                 "answer": str(i)}) for i in range(3))
    for text in (doc, rows):
        data = text.encode()
        for n in range(len(data) + 1):
            p = _file(data[:n])
            only_tpt_errors(tio.read_json, p)
            skips = tio.Skips()
            list(tio.read_jsonl(p, skips))
            recs = only_tpt_errors(_load_jsonl_split, p)
            assert recs is None or all(set(r) == {"id", "question", "answer"} for r in recs)


def _load_jsonl_split(p):
    from tpt_jax.data.sources import load_split
    return load_split(DataConfig(source="jsonl", train_path=p), "train")


# ----------------------------------------------------------------------------- stage readers


@FUZZ
@given(jsonl_bytes)
def test_dataset_seed_examples_and_samples(data):
    from tpt_jax.data.sources import load_seed
    from tpt_jax.stages.prune import prune_files
    from tpt_jax.stages.sft_data import read_examples
    from tpt_jax.config import PruneConfig
    p = _file(data)
    only_tpt_errors(_load_jsonl_split, p)
    only_tpt_errors(load_seed, DataConfig(seed_path=p))
    recs = only_tpt_errors(read_examples, p)
    assert recs is None or all(isinstance(r["prompt"], str) and isinstance(r["completion"], str)
                               for r in recs)
    only_tpt_errors(prune_files, p, [p], PruneConfig())


@FUZZ
@given(st.binary(max_size=120) | json_values.map(lambda v: json.dumps(v).encode()))
def test_yaml_config_bytes_and_types(data):
    only_tpt_errors(load_run_config, _file(data, "c.yaml"))


@FUZZ
@given(st.sampled_from(["model", "rounds", "think", "train", "data", "mesh", "per_round",
                        "sources", "eval", "prune", "seed"]), json_values)
def test_yaml_config_wrong_types(key, value):
    only_tpt_errors(load_run_config, _file(json.dumps({key: value}).encode(), "c.yaml"))


# ----------------------------------------------------------------------------- checkpoints


HF_CONFIG = {"model_type": "gemma2", "vocab_size": 256, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
             "sliding_window": 6, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
             "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
             "layer_types": ["sliding_attention", "full_attention"] * 2,
             "rope_parameters": {"rope_theta": 10000.0}}


@FUZZ
@given(st.sampled_from(sorted(HF_CONFIG)), json_values)
def test_hf_config_json_wrong_types(key, value):
    from tpt_jax.gemma.weights import read_hf_config
    d = Path(_file(json.dumps({**HF_CONFIG, key: value}).encode(), "config.json")).parent
    cfg = only_tpt_errors(read_hf_config, str(d))
    if cfg is not None:
        cfg.validate()


@FUZZ
@given(st.sampled_from(sorted(to_dict(model_preset("test-tiny")))), json_values)
def test_model_json_wrong_types(key, value):
    from tpt_jax.gemma.weights import read_model_json
    raw = {**to_dict(model_preset("test-tiny")), key: value}
    d = Path(_file(json.dumps(raw).encode(), "model.json")).parent
    only_tpt_errors(read_model_json, str(d))


@FUZZ
@given(st.binary(max_size=100) | json_values.map(lambda v: json.dumps({"weight_map": v}).encode()))
def test_safetensors_index_bytes_and_types(data):
    from tpt_jax.gemma.weights import _Tensors
    d = Path(_file(data, "model.safetensors.index.json")).parent
    only_tpt_errors(_Tensors, str(d))


@settings(max_examples=15, deadline=None)
@given(st.binary(max_size=200))
def test_sentencepiece_model_bytes(data):
    from tpt_jax.data.builtin_tokenizer import load_tokenizer
    only_tpt_errors(load_tokenizer, _file(data, "tokenizer.model"))


@settings(max_examples=5, deadline=None)
@given(st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode()))
def test_hf_tokenizer_json_bytes(data):
    pytest.importorskip("transformers")
    from tpt_jax.data.builtin_tokenizer import load_tokenizer
    only_tpt_errors(load_tokenizer, str(Path(_file(data, "tokenizer.json")).parent))


# ----------------------------------------------------------------------------- run directory


@FUZZ
@given(st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["fingerprint", "done", "info"]), json_values)
       .map(lambda d: json.dumps(d).encode()))
def test_run_state_bytes_and_types(data):
    """check_output reads a run dir's state.json and only reads: the tree stays as it was."""
    from tpt_jax.loop.rundir import check_output
    cfg = load_run_config(None, ["model=test-tiny"])
    p = Path(_file(data, "state.json"))
    only_tpt_errors(check_output, str(p.parent), cfg)
    assert [q.name for q in p.parent.iterdir()] == ["state.json"] and p.read_bytes() == data
