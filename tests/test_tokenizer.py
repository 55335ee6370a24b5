"""Tokenizers (sentencepiece, HF, builtin cache, vocab check) and prompt templates."""
import pytest

from tpt_jax import prompts
from tpt_jax.config import ConfigError, TptError
from tpt_jax.data import seed_solutions, synthetic_split
from tpt_jax.data.builtin_tokenizer import BUILTIN_VOCAB_SIZE, builtin_tokenizer, load_tokenizer
from tpt_jax.gemma.tokenizer import (HFTokenizer, SentencePieceTokenizer, check_vocab,
                                     train_sentencepiece)

TEXTS = ["Question: Mia has 17 apples. She buys 5 more.\nAnswer: buys 5: <<17+5=22>>22\n#### 22",
         "Question: Sam has 40 pens. He gives half to Tom.\nAnswer: gives half: <<40/2=20>>20\n#### 20",
         "Question: Ava has 3 cards. She triples them.\nAnswer: triples: <<3*3=9>>9\n#### 9"] * 5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def builtin(cache_dir):
    return builtin_tokenizer(cache_dir=cache_dir)


def test_train_sentencepiece_is_deterministic_with_gemma_ids(tmp_path):
    a = train_sentencepiece(TEXTS, 120, tmp_path / "a.model")
    b = train_sentencepiece(TEXTS, 120)
    assert a == b == (tmp_path / "a.model").read_bytes()
    tok = SentencePieceTokenizer(tmp_path / "a.model")
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert [tok.piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
    assert tok.vocab_size <= 120


def test_sentencepiece_round_trip_and_single_digit_tokens(tmp_path):
    tok = SentencePieceTokenizer(train_sentencepiece(TEXTS, 120))
    for text in TEXTS[:3]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # newlines and spaces survive
        assert 1 not in ids and 2 not in ids
    assert tok.encode("x", add_bos=True)[0] == 2
    digits = [tok.piece(i) for i in tok.encode("<<17+5=22>>")]
    assert digits == ["<<", "1", "7", "+", "5", "=", "2", "2", ">>"]
    assert tok.decode([2] + tok.encode("#### 22") + [1, 0, 0]) == "#### 22"


def test_builtin_tokenizer_is_cached_and_covers_the_task(builtin, cache_dir, tmp_path):
    files = list(cache_dir.glob("builtin-*.model"))
    assert len(files) == 1 and files[0].read_bytes() == builtin.proto
    again = builtin_tokenizer(cache_dir=cache_dir)
    assert again.proto == builtin.proto and str(files[0]) in again.name
    assert builtin.vocab_size <= BUILTIN_VOCAB_SIZE
    fresh = builtin_tokenizer(cache_dir=tmp_path)  # retrained elsewhere: same bytes
    assert fresh.proto == builtin.proto
    for r in synthetic_split("test", 50) + seed_solutions(50):
        for tmpl in ("plain", "zero-shot"):
            p = prompts.format_prompt(tmpl, r["question"])
            c = prompts.format_completion(tmpl, r["answer"])
            ids = builtin.encode(p + c)
            assert 3 not in ids, (p + c)  # no unknown pieces
            assert builtin.decode(ids) == p + c
            assert builtin.encode(p) + builtin.encode(c) == ids  # prompt/completion split is clean


def test_synthetic_sequences_are_short(builtin):
    recs = synthetic_split("train", 1000) + synthetic_split("test", 300)
    p_len = max(len(builtin.encode(prompts.format_prompt("plain", r["question"]), add_bos=True))
                for r in recs)
    c_len = max(len(builtin.encode(prompts.format_completion("plain", r["answer"]))) + 1
                for r in recs)
    assert p_len <= 48 and c_len <= 64, (p_len, c_len)


def test_load_tokenizer_specs(builtin, tmp_path):
    (tmp_path / "m.model").write_bytes(builtin.proto)
    assert isinstance(load_tokenizer(str(tmp_path / "m.model")), SentencePieceTokenizer)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(builtin.proto)
    assert load_tokenizer(str(d)).encode("Mia has 3") == builtin.encode("Mia has 3")
    with pytest.raises(TptError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TptError, match="not a sentencepiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TptError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))


def test_hf_tokenizer_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "two": 4, "plus": 5, "three": 6}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                                eos_token="<eos>", bos_token="<bos>",
                                                unk_token="<unk>")
    fast.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(str(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 7)
    assert tok.encode("two plus three", add_bos=True) == [2, 4, 5, 6]
    assert tok.decode([2, 4, 5, 6, 1]) == "two plus three"


def test_check_vocab(builtin):
    check_vocab(builtin, 256)
    check_vocab(builtin, builtin.vocab_size)
    with pytest.raises(TptError) as e:
        check_vocab(builtin, builtin.vocab_size - 1, "model.vocab_size")
    msg = str(e.value)
    assert "\n" not in msg and str(builtin.vocab_size) in msg and "model.vocab_size" in msg


# ----------------------------------------------------------------------------- prompts


def test_prompt_templates_render():
    q = "Mia has 3 pens. She buys 2 more. How many pens does Mia have now?"
    assert prompts.format_prompt("plain", q + "  ") == f"Question: {q}\nAnswer:"
    zs = prompts.format_prompt("zero-shot", q)
    assert zs.startswith("<start_of_turn>user\nSolve the following math problem step by step.")
    assert zs.endswith(f"\n\n{q}<end_of_turn>\n<start_of_turn>model\n")
    assert "#### <answer>" in zs
    shots = [{"question": "A?", "answer": "a\n#### 1"}, {"question": "B?", "answer": "#### 2"},
             {"question": "C?", "answer": "#### 3"}]
    assert prompts.format_prompt("few-shot:2", q, shots) == (
        "Question: A?\nAnswer: a\n#### 1\n\nQuestion: B?\nAnswer: #### 2\n\n"
        f"Question: {q}\nAnswer:")
    assert prompts.format_prompt("few-shot", q, shots * 2).count("Question:") == 5
    with pytest.raises(ConfigError, match="needs 4 worked examples"):
        prompts.format_prompt("few-shot", q, shots)
    assert prompts.format_completion("plain", "x\n#### 1\n") == " x\n#### 1"
    assert prompts.format_completion("zero-shot", "x\n#### 1") == "x\n#### 1"


def test_template_names_and_stops():
    assert prompts.parse_template("few-shot:8") == ("few-shot", 8)
    assert prompts.num_shots("few-shot") == prompts.DEFAULT_SHOTS
    assert prompts.num_shots("plain") == 0
    for bad in ("chat", "few-shot:0", "few-shot:x", "plain:2"):
        with pytest.raises(ConfigError):
            prompts.parse_template(bad)
    assert prompts.stop_strings("zero-shot") == ["<end_of_turn>"]
    assert prompts.stop_strings("few-shot:3") == ["\nQuestion:"]
    text = " buys 2: <<3+2=5>>5\n#### 5\n\nQuestion: next"
    assert prompts.cut_at_stop(text, prompts.stop_strings("plain")) == (
        " buys 2: <<3+2=5>>5\n#### 5\n", True)
    assert prompts.cut_at_stop("no stop", ["\nQuestion:"]) == ("no stop", False)
    recs = [{"id": str(i), "question": f"q{i}", "answer": f"#### {i}", "x": 1} for i in range(6)]
    assert prompts.pick_shots(recs, 2) == [{"id": "0", "question": "q0", "answer": "#### 0"},
                                           {"id": "1", "question": "q1", "answer": "#### 1"}]
