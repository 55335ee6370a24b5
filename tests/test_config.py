"""Configs: YAML + dotted overrides, and a corpus of malformed configs, each with its clear
one-line error naming the key."""
from pathlib import Path

import pytest

from tpt_jax.config import ConfigError, RunConfig, load_run_config, round_config, validate_run
from tpt_jax.config_io import apply_overrides, fingerprint, from_dict
from tpt_jax.gemma.config import model_preset


def test_defaults_are_valid():
    validate_run(RunConfig())


CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    """Each file in configs/ parses, names only known keys, and passes validation in every
    round (per_round overrides included); its model is a preset unless it names a checkpoint."""
    cfg = load_run_config(str(path))
    assert cfg.rounds >= 0
    for r in range(cfg.rounds + 1):
        validate_run(round_config(cfg, r))
    if not cfg.checkpoint:
        model_preset(cfg.model)


def test_overrides_parse_yaml_values():
    data = apply_overrides({"think": {"n": 2}}, ["think.n=8", "think.temperature=0.5",
                                                 "eval.k=[1, 4]", "checkpoint=null", "prompt=plain"])
    cfg = from_dict(RunConfig, data)
    assert (cfg.think.n, cfg.think.temperature, cfg.eval.k, cfg.checkpoint, cfg.prompt) == (
        8, 0.5, [1, 4], None, "plain")


def test_int_promotes_to_float_but_not_back():
    assert from_dict(RunConfig, {"think": {"temperature": 1}}).think.temperature == 1.0
    with pytest.raises(ConfigError, match=r"config\.think\.n: expected an integer, got 1\.5"):
        from_dict(RunConfig, {"think": {"n": 1.5}})


def test_fingerprint_tracks_changes():
    a, b = RunConfig(), RunConfig()
    assert fingerprint(a) == fingerprint(b)
    b.think.n = 9
    assert fingerprint(a) != fingerprint(b)


BAD_CONFIGS = [
    ("rounds: 2\nbogus: 1\n", r"unknown config key config\.bogus"),
    ("think:\n  nn: 2\n", r"unknown config key config\.think\.nn; valid keys in config\.think"),
    ("think:\n  n: two\n", r"config\.think\.n: expected an integer, got 'two'"),
    ("think:\n  n: 0\n", r"think\.n must be >= 1"),
    ("think:\n  temperature: -1\n", r"think\.temperature must be >= 0"),
    ("think:\n  top_p: 1.5\n", r"think\.top_p must be in \(0, 1\]"),
    ("think: 3\n", r"config\.think: expected a mapping"),
    ("train:\n  learning_rate: 0\n", r"train\.learning_rate must be > 0"),
    ("train:\n  warmup_ratio: 1.0\n", r"train\.warmup_ratio must be in \[0, 1\)"),
    ("train:\n  remat: sometimes\n", r"train\.remat must be none, full or dots"),
    ("train:\n  pack: yes please\n", r"config\.train\.pack: expected true/false"),
    ("train:\n  batch_size: 0\n", r"train\.batch_size"),
    ("rounds: -1\n", r"rounds must be >= 0"),
    ('"bad\\nkey": 1\n', r"unknown config key config\.'bad\\nkey'; valid keys"),
    ("think:\n  attention: flash\n", r"think\.attention must be one of auto, dense, paged, pallas"),
    ("think:\n  attention: dense\n  kv_cache_gb: 2\n", r"kv_cache_gb .*needs think\.attention"),
    ("think:\n  kv_cache_share: 1.5\n", r"think\.kv_cache_share must be in \(0, 1\)"),
    ("think:\n  kv_cache_share: 0.5\n  kv_cache_gb: 2\n", r"kv_cache_share .*no think\.kv_cache_gb"),
    ("init_from: scratch\n", r"init_from must be 'previous' or 'base'"),
    ("model: gemma3-1b\n", r"model: unknown preset 'gemma3-1b'"),
    ("dtype: float16\n", r"dtype must be float32 or bfloat16"),
    ("mesh:\n  data: 0\n", r"mesh\.data must be a positive size or -1"),
    ("mesh:\n  data: -1\n  fsdp: -1\n", r"at most one axis may be -1"),
    ("eval:\n  k: [0]\n", r"eval\.k a list of positive integers"),
    ("eval:\n  k: 5\n", r"config\.eval\.k: expected a list"),
    ("data:\n  source: s3\n", r"data\.source must be one of"),
    ("data:\n  source: jsonl\n", r"data\.source jsonl needs data\.train_path"),
    ("prune:\n  strategy: best\n", r"prune\.strategy: unknown step 'best'"),
    ("prune:\n  strategy: max-k\n", r"max-k needs prune\.max_per_question"),
    ("- 1\n- 2\n", r"top level must be a mapping"),
    ("think: [unclosed\n", r"line \d+: invalid YAML"),
    ("think:\n  temperature: .nan\n", r"expected a finite number"),
]


@pytest.mark.parametrize("text,pattern", BAD_CONFIGS, ids=[p for _, p in BAD_CONFIGS])
def test_bad_config_clear_error(tmp_path, text, pattern):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_run_config(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override,pattern", [
    ("think.n", r"not of the form key=value"),
    ("=3", r"empty key"),
    ("think.n.x=3", r"think\.n: expected an integer|n is not a section"),
    ("think.n=[1", r"not valid YAML"),
])
def test_bad_overrides(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(None, [override])


def test_missing_config_file_lists_known():
    with pytest.raises(ConfigError, match=r"config 'nope' not found .*tiny_cpu"):
        load_run_config("nope")
