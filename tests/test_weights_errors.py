"""Bad checkpoints fail with one clear error naming the tensor or field."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tpt_jax.gemma import model as M
from tpt_jax.gemma import weights
from tpt_jax.config import TptError


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(ckpt, edit):
    f = f"{ckpt}/model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def model_for(path):
    return M.make_model(weights.read_hf_config(path))


def test_missing_tensor(hf_tiny, tmp_path):
    ckpt = copy_ckpt(hf_tiny[0], tmp_path / "c")
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(TptError, match=r"missing tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        weights.load_hf(str(ckpt), model_for(ckpt))


def test_wrong_shape(hf_tiny, tmp_path):
    ckpt = copy_ckpt(hf_tiny[0], tmp_path / "c")
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    rewrite_tensors(ckpt, edit)
    with pytest.raises(TptError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(16, 64\), expected \(32, 64\)"):
        weights.load_hf(str(ckpt), model_for(ckpt))


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,pattern", [
    ({"model_type": "mistral"}, r"config\.json: model_type 'mistral' is not supported "
                                r"\(supported: gemma2, llama, qwen2\)$"),
    ({"hidden_activation": "silu"}, r"hidden_activation 'silu'"),
    ({"num_hidden_layers": None}, r"field 'num_hidden_layers' is missing"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings"),
])
def test_bad_config(hf_tiny, tmp_path, changes, pattern):
    ckpt = copy_ckpt(hf_tiny[0], tmp_path / "c")
    edit_config(ckpt, **changes)
    with pytest.raises(TptError, match=pattern):
        weights.read_hf_config(str(ckpt))


def test_config_mismatch_names_field(hf_tiny):
    import dataclasses
    cfg = weights.read_hf_config(hf_tiny[0])
    other = M.make_model(dataclasses.replace(cfg, sliding_window=99))
    with pytest.raises(TptError, match="sliding_window"):
        weights.load_hf(hf_tiny[0], other)


def test_corrupt_safetensors(hf_tiny, tmp_path):
    ckpt = copy_ckpt(hf_tiny[0], tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(TptError, match="not a readable safetensors file"):
        weights.load_hf(str(ckpt), model_for(ckpt))


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TptError, match="model_type"):
        weights.read_hf_config(str(tmp_path))


def test_convert_cli_round_trip(hf_tiny, tmp_path):
    from tpt_jax.cli import main
    assert main(["convert", hf_tiny[0], str(tmp_path / "orbax"), "--to", "orbax"]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    a = load_file(f"{hf_tiny[0]}/model.safetensors")
    b = load_file(f"{tmp_path}/hf/model.safetensors")
    assert set(b) <= set(a) and len(b) == len([k for k in a if k != "lm_head.weight"])
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])


def test_convert_cli_error_is_one_line(tmp_path, capsys):
    from tpt_jax.cli import main
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "o"), "--to", "orbax"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "not found" in err
