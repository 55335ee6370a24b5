"""Llama 3.x and Qwen2 on the shared definition, against transformers: logits and greedy
continuations of tiny random checkpoints (GQA 4/2 and 6/2, llama3 RoPE scaling, tied and untied
output, q/k/v biases) sharded on 8 CPU devices, `tpt convert` round trips, preset sizes."""
import copy
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tpt_jax import prompts
from tpt_jax.config import MeshConfig, TptError
from tpt_jax.engine import sampler as S
from tpt_jax.engine.sampling import SamplingConfig
from tpt_jax.gemma import model as M
from tpt_jax.gemma import sharding as SH
from tpt_jax.gemma import weights
from tpt_jax.gemma.config import MODEL_PRESETS
from test_model import batch_with_padding, hf_logits

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# name -> (transformers class, config kwargs). original_max_position 64 puts llama-tied's
# frequencies in all three llama3 bands (kept, blended, divided by the factor).
FAMILIES = {
    "llama-tied": ("Llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 rope_scaling=LLAMA3_ROPE, rope_theta=10000.0,
                                 tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "llama-untied": ("Llama", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                   rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
                                   tie_word_embeddings=False)),
    "qwen2": ("Qwen2", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6,
                            tie_word_embeddings=False)),
}


def make_checkpoint(path, cls, seed=0, **kw):
    """A random `{cls}ForCausalLM` saved with `save_pretrained`; norms and biases randomised
    too (their defaults are ones and zeros), so every weight matters in a parity check."""
    import transformers
    torch.manual_seed(seed)
    kw = copy.deepcopy(kw)  # transformers writes rope_theta into the rope_scaling dict it gets
    config = getattr(transformers, f"{cls}Config")(vocab_size=256, **kw)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:  # std 0.2: logits well above 1, greedy continuations that still vary
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    cls, kw = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, str(path), make_checkpoint(path, cls, **kw)


def sharded(path, mesh_shape=(1, 4, 2)):
    cfg = weights.read_hf_config(path)
    model = M.make_model(cfg)
    mesh = SH.make_mesh(MeshConfig(*mesh_shape))
    return model, mesh, weights.load_hf(path, model, mesh, SH.TRAIN_RULES)


def test_config_reads_the_family(family):
    name, path, _ = family
    cfg = weights.read_hf_config(path)
    assert cfg.family == name.split("-")[0]
    assert cfg.tie_embeddings == (name == "llama-tied")
    assert cfg.attention_bias == (name == "qwen2")
    assert cfg.rope_scaling_factor == (None if name == "qwen2" else 8.0)
    assert (cfg.sliding_window, cfg.attn_logit_softcap, cfg.final_logit_softcap) == (None,) * 3
    model = M.make_model(cfg)
    assert M.count_params(M.abstract_params(model)) == cfg.param_count() == sum(
        p.numel() for p in family[2].parameters())


def test_logits_match_hf_sharded(family):
    """Logits of a padded batch (left and right padding) on 8 devices, fsdp 4 x tensor 2."""
    _, path, hf_model = family
    model, mesh, params = sharded(path)
    assert len(params["layers"]["local"]["attn"]["q"].sharding.device_set) == 8
    tokens, mask = batch_with_padding(model.cfg.vocab_size)
    with SH.use_rules(mesh, SH.TRAIN_RULES):
        ours = np.asarray(jax.jit(lambda p, t, m: M.forward(model, p, t, m))(params, tokens, mask))
    ref = hf_logits(hf_model, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(ref[valid]).max() > 1.0
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_rope_frequencies_are_hfs(family):
    """The RoPE inverse frequencies equal the HF model's own (llama3-scaled for Llama; all
    three bands occur in llama-tied), and the scaling really changes them."""
    name, path, hf_model = family
    cfg = weights.read_hf_config(path)
    ours = np.asarray(M.rope_frequencies(cfg.head_dim, cfg))
    np.testing.assert_allclose(ours, hf_model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    assert cfg.rope_theta == FAMILIES[name][1]["rope_theta"]
    plain = np.asarray(M.rope_frequencies(cfg.head_dim, dataclasses.replace(
        cfg, rope_scaling_factor=None)))
    assert (name == "qwen2") == np.array_equal(ours, plain)


def test_greedy_matches_hf_generate_sharded(family):
    """The engine's sampler on 8 devices (data 4 x tensor 2), prompts of 4-13 tokens sharing
    a batch: token for token what transformers' greedy generate gives."""
    _, path, hf_model = family
    model, mesh, params = sharded(path, (4, 1, 2))
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, model.cfg.vocab_size, size=n).tolist() for n in (4, 9, 13)]
    sampler = S.Sampler(model, params, mesh, rows=4, max_prompt_tokens=16, eos_id=None)
    ours = sampler.generate(prompts, SamplingConfig(max_new_tokens=16))
    for p, gens in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16,
                                    do_sample=False, pad_token_id=0)
        ref = ref[0, len(p):].tolist()
        assert len(set(ref)) > 4, "degenerate reference output"
        assert gens[0].tokens == ref


def test_convert_round_trip(family, tmp_path):
    """`tpt convert` HF -> Orbax -> HF gives back every tensor the checkpoint has (bit for
    bit) and a config.json that transformers loads to the same model."""
    from transformers import AutoModelForCausalLM
    from tpt_jax.cli import main
    _, path, hf_model = family
    assert main(["convert", path, str(tmp_path / "orbax"), "--to", "orbax"]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    a = load_file(f"{path}/model.safetensors")
    b = load_file(f"{tmp_path}/hf/model.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert weights.read_hf_config(str(tmp_path / "hf")) == weights.read_hf_config(path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(reloaded) is type(hf_model)
    tokens, mask = batch_with_padding(256, seed=3)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask),
                                  hf_logits(hf_model, tokens, mask))


@pytest.mark.parametrize("change,pattern", [
    ({"model_type": "mistral"}, r"model_type 'mistral' is not supported \(supported: gemma2, "
                                r"llama, qwen2\)$"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     r"rope_type 'yarn' is not supported \(default, llama3\)$"),
    ({"use_sliding_window": True}, r"use_sliding_window is true; not supported for qwen2$"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not qwen2's silu$"),
])
def test_bad_family_config_is_one_line(tmp_path, change, pattern):
    cfg = weights.hf_config_dict(MODEL_PRESETS["qwen2.5-1.5b"], "float32")
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TptError, match=pattern):
        weights.read_hf_config(str(tmp_path))


@pytest.mark.parametrize("name,published", [("llama3.1-8b", 8.03e9), ("llama3.1-70b", 70.6e9),
                                            ("qwen2.5-1.5b", 1.54e9), ("qwen2.5-7b", 7.62e9)])
def test_preset_param_counts(name, published):
    """Abstract shapes (nothing allocated) against the published sizes; the presets read back
    from their own HF config.json."""
    cfg = MODEL_PRESETS[name]
    n = M.count_params(M.abstract_params(M.make_model(cfg)))
    assert n == cfg.param_count()
    assert abs(n - published) / published < 0.005


def test_hub_id_loads_the_family(family, tmp_path, monkeypatch):
    """A Hub id of a Llama / Qwen2 checkpoint (offline, from the HF cache) reads as its
    directory does, with the tokenizer's chat markers."""
    from test_family_chat import save_tokenizer
    from test_hub import put_in_cache
    from tpt_jax.data.builtin_tokenizer import load_tokenizer
    name, path, _ = family
    src = tmp_path / "src"
    shutil.copytree(path, src)
    save_tokenizer(src, name.split("-")[0])
    put_in_cache(str(tmp_path / "home"), f"acme/{name}", str(src))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = weights.read_hf_config(f"acme/{name}")
    assert cfg == weights.read_hf_config(path)
    a = weights.load_hf(f"acme/{name}", M.make_model(cfg))
    b = weights.load_hf(path, M.make_model(cfg))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert prompts.chat_of(load_tokenizer(f"acme/{name}")).end in ("<|eot_id|>", "<|im_end|>")
