"""HF exports load whole in transformers and generate what tpt's sampler generates."""
import json
import os


from tpt_jax.gemma import export, model as M, weights
from tpt_jax import engine as S
from tpt_jax.data.builtin_tokenizer import builtin_tokenizer, load_tokenizer

WORDS = "one two three plus is the answer <end_of_turn>".split()


def gemma_like_hf_tokenizer(path):
    """Word-level HF tokenizer with Gemma's ids (pad 0, eos 1, bos 2) that adds BOS like Gemma's."""
    import tokenizers
    import transformers
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    core.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>").save_pretrained(path)


def test_export_generates_like_the_sampler(tmp_path):
    """Greedy tokens of the export through transformers == tpt's sampler, prompts tokenized by
    the exported tokenizer == tpt's ids (BOS first); the stop ids come from generation_config."""
    import torch
    from conftest import make_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = str(tmp_path / "src")
    make_hf_checkpoint(src, seed=3, embed_std=0.02)  # small embeddings: varied continuations
    gemma_like_hf_tokenizer(tmp_path / "tok")
    cfg = weights.read_hf_config(src)
    model = M.make_model(cfg)
    params = weights.load_hf(src, model)
    out = str(tmp_path / "export")
    tok = load_tokenizer(str(tmp_path / "tok"))
    export.export_hf(params, cfg, tok, out)
    gen = json.loads(open(os.path.join(out, "generation_config.json")).read())
    assert (gen["bos_token_id"], gen["pad_token_id"], gen["eos_token_id"]) == (2, 0, [1, 11])

    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    sampler = S.Sampler(model, params, rows=2, max_prompt_tokens=16,
                        eos_id=export.stop_ids(tok))
    prompts = ["two plus three is", "the answer is one plus one"]
    ours = sampler.generate([tok.encode(p, add_bos=True) for p in prompts],
                            S.SamplingConfig(max_new_tokens=12))
    seen = set()
    for p, gens in zip(prompts, ours):
        ids = hf_tok(p, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == tok.encode(p, add_bos=True)
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        ref = [t for t in ref.tolist() if t not in (1, 11)]  # HF keeps the stop token
        assert gens[0].tokens == ref
        seen.update(ref)
    assert len(seen) > 4, "degenerate reference output"


def test_sentencepiece_export_tokenizes_like_tpt(tmp_path):
    from transformers import AutoTokenizer
    tok = builtin_tokenizer(tmp_path / "cache")
    export.save_tokenizer(tok, str(tmp_path))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["Question: Mia has 8 apples.\nShe gets 3 more. <<8+3=11>>\n#### 11",
                 "<start_of_turn>user\n12 + 30?<end_of_turn>\n"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text, add_bos=True)
    assert export.stop_ids(tok) == [tok.eos_id, tok.encode("<end_of_turn>")[0]]
