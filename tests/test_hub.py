"""Hub ids (`ORG/NAME[@REV]`) resolve through huggingface_hub's cache, offline."""
import os
import shutil

import jax
import numpy as np
import pytest

from tpt_jax.config import SourceConfig, TptError
from tpt_jax.gemma import hub, model as M, weights
from tpt_jax.data.builtin_tokenizer import load_tokenizer
from tpt_jax.gemma.tokenizer import HFTokenizer
from tpt_jax.methods.multimodel import source_model_config

REV = "0123456789abcdef0123456789abcdef01234567"


def hf_tokenizer(path):
    """A word-level HF tokenizer with Gemma's pad/eos/bos ids, saved with save_pretrained."""
    import tokenizers
    import transformers
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3,
             **{w: i + 4 for i, w in enumerate("one two three plus is the answer".split())}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                                eos_token="<eos>", bos_token="<bos>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)


def put_in_cache(home, repo, src_dir, rev=REV, ref="main"):
    """The hub cache layout: models--ORG--NAME/refs/<ref> holds the commit, snapshots/<commit>/."""
    root = os.path.join(home, "hub", "models--" + repo.replace("/", "--"))
    shutil.copytree(src_dir, os.path.join(root, "snapshots", rev))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", ref), "w") as f:
        f.write(rev)


@pytest.fixture
def hub_home(tmp_path, monkeypatch, hf_tiny):
    home = tmp_path / "hf_home"
    src = tmp_path / "src"
    shutil.copytree(hf_tiny[0], src)
    hf_tokenizer(src)
    put_in_cache(str(home), "acme/gemma-tiny", str(src))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return str(home), str(src)


def test_hub_id_loads_the_same_params_and_tokenizer(hub_home):
    _, src = hub_home
    cfg = weights.read_hf_config("acme/gemma-tiny")
    assert cfg == weights.read_hf_config(src)
    model = M.make_model(cfg)
    a, b = weights.load_hf("acme/gemma-tiny", model), weights.load_hf(src, model)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tok = load_tokenizer("acme/gemma-tiny@main")
    assert isinstance(tok, HFTokenizer) and tok.encode("two plus three") == [5, 7, 6]
    assert source_model_config(SourceConfig(checkpoint="acme/gemma-tiny")) == cfg
    assert weights.read_hf_config(f"acme/gemma-tiny@{REV}") == cfg  # a commit hash as revision


def test_hub_errors_name_the_id(hub_home, tmp_path):
    home, src = hub_home
    with pytest.raises(TptError, match=r"checkpoint acme/missing: .*not in the Hugging Face "
                                       r"cache .*HF_HUB_OFFLINE=1"):
        weights.read_hf_config("acme/missing")
    with pytest.raises(TptError, match=r"acme/gemma-tiny@v2: .*revision 'v2' .*not in the"):
        weights.load_hf("acme/gemma-tiny@v2", None)
    mistral = tmp_path / "mistral"
    shutil.copytree(src, mistral)
    cfg = (mistral / "config.json").read_text().replace('"gemma2"', '"mistral"')
    (mistral / "config.json").write_text(cfg)
    put_in_cache(home, "acme/mistral-tiny", str(mistral))
    with pytest.raises(TptError, match=r"^checkpoint acme/mistral-tiny: model_type is 'mistral'; "
                                       r"not a supported model \(gemma2, llama, qwen2\)$"):
        weights.read_hf_config("acme/mistral-tiny")


def test_a_local_directory_wins_over_an_id(hub_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("acme/gemma-tiny")
    assert hub.resolve("acme/gemma-tiny") == "acme/gemma-tiny"
    assert hub.resolve("gs://b/acme") == "gs://b/acme" and hub.resolve(None) is None
    assert not hub.is_hub_id("runs/a/r00/params") and not hub.is_hub_id("./x/y")


def test_convert_from_a_hub_id_and_back_with_its_tokenizer(hub_home, tmp_path):
    from tpt_jax import cli
    _, src = hub_home
    orbax, hf = str(tmp_path / "orbax"), tmp_path / "hf"
    assert cli.main(["convert", "acme/gemma-tiny", orbax, "--to", "orbax"]) == 0
    assert cli.main(["convert", orbax, str(hf), "--to", "hf", "--tokenizer", "acme/gemma-tiny"]) == 0
    assert weights.read_hf_config(str(hf)) == weights.read_hf_config(src)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(hf))
    assert load_tokenizer(str(hf)).encode("two plus three") == [5, 7, 6]


def test_think_and_eval_cli_args_resolve_ids(hub_home):
    import argparse

    from tpt_jax import cli
    _, src = hub_home
    think = argparse.Namespace(checkpoint="acme/gemma-tiny@main", source=None)
    cli._resolve_hub_args("think", think)
    assert os.path.samefile(os.path.join(think.checkpoint, "config.json"),
                            os.path.join(hub.cache_dir(), "models--acme--gemma-tiny", "snapshots",
                                         REV, "config.json"))
    assert think.source == "gemma-tiny"  # the model's name in sample records, not the hash
    ev = argparse.Namespace(params="acme/gemma-tiny")
    cli._resolve_hub_args("eval", ev)
    assert ev.params == think.checkpoint
    local = argparse.Namespace(params=src)
    cli._resolve_hub_args("eval", local)
    assert local.params == src
