"""Each family's chat markers and stop tokens come from its tokenizer's own chat template: the
zero-shot prompt tpt builds tokenizes to what transformers' `apply_chat_template` gives."""
import pytest

from tpt_jax import prompts
from tpt_jax.config import TptError
from tpt_jax.data.builtin_tokenizer import load_tokenizer
from tpt_jax.gemma import export
from tpt_jax.gemma.tokenizer import HFTokenizer

# Llama-3-8B-Instruct's template; Qwen2.5's without its tool-calling branches.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + "
    "messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are "
    "Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}{{- '<|im_start|>' + "
    "message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
WORDS = sorted(set((prompts.INSTRUCTION + " what is two plus three ? ! 5 ####").split()))
FAMILIES = {
    # name: (template, special tokens, bos, eos, pad)
    "llama": (LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>"],
              "<|begin_of_text|>", "<|eot_id|>", None),
    "qwen2": (QWEN25_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              None, "<|im_end|>", "<|endoftext|>"),
}


def save_tokenizer(path, name):
    """A word-level HF tokenizer with the family's special tokens and chat template; "!" is
    id 0 (as in Llama 3, whose tokenizer has no pad token)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    template, specials, bos, eos, pad = FAMILIES[name]
    vocab = {w: i for i, w in enumerate(["!", "<unk>"] + [w for w in WORDS if w != "!"]
                                        + specials)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>",
        additional_special_tokens=specials)
    fast.chat_template = template
    fast.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zero_shot_prompt_is_the_chat_template(name, tmp_path):
    hf = save_tokenizer(tmp_path, name)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    chat = prompts.chat_of(tok)
    assert chat.end == FAMILIES[name][3] and "<start_of_turn>" not in chat.user + chat.model
    question = "what is two plus three ?"
    text = prompts.format_prompt("zero-shot", question, chat=chat)
    want = hf.apply_chat_template(
        [{"role": "user", "content": f"{prompts.INSTRUCTION}\n\n{question}"}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.encode(text, add_bos=True) == list(want)
    assert prompts.stop_strings("zero-shot", chat) == [chat.end]
    assert export.stop_ids(tok) == [hf.convert_tokens_to_ids(chat.end)]  # eos is the end


def test_llama_markers_and_ids(tmp_path):
    save_tokenizer(tmp_path, "llama")
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat == prompts.Chat("<|start_header_id|>user<|end_header_id|>\n\n",
                                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                                    "<|eot_id|>")
    assert tok.encode("5", add_bos=True)[0] == tok.bos_id
    assert tok.decode(tok.encode("5 ! ####")) == "5 ! ####"  # id 0 is text, not padding


def test_qwen_has_no_bos(tmp_path):
    save_tokenizer(tmp_path, "qwen2")
    tok = load_tokenizer(str(tmp_path))
    assert tok.bos_id is None and tok.encode("5", add_bos=True) == tok.encode("5")
    assert tok.chat.user.startswith("<|im_start|>system\nYou are Qwen")
    assert tok.chat.model == "<|im_end|>\n<|im_start|>assistant\n"


def test_gemma_markers_without_a_template(tmp_path):
    """A tokenizer without a chat template keeps Gemma's markers (the builtin and test ones)."""
    hf = save_tokenizer(tmp_path, "llama")
    hf.chat_template = None
    hf.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    assert prompts.chat_of(load_tokenizer(str(tmp_path / "plain"))) == prompts.GEMMA_CHAT


def test_broken_template_is_one_line(tmp_path):
    hf = save_tokenizer(tmp_path, "llama")
    hf.chat_template = "{{ messages[0]['content'] }}"  # no end-of-turn marker
    hf.save_pretrained(tmp_path / "bad")
    with pytest.raises(TptError, match=r"chat template does not show the user message once and "
                                       r"end the model's turn with a marker$"):
        prompts.chat_of(load_tokenizer(str(tmp_path / "bad")))


def test_the_date_in_llama_templates_is_pinned(tmp_path):
    """Llama 3.2+ templates write today's date unless given one: the markers (and so every
    prompt) must not change from day to day."""
    hf = save_tokenizer(tmp_path, "llama")
    hf.chat_template = (
        "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
        "{%- endif %}{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nToday Date: "
        "{{ date_string }}<|eot_id|>" + LLAMA3_TEMPLATE.replace("bos_token + content", "content"))
    hf.save_pretrained(tmp_path / "dated")
    chat = prompts.chat_of(load_tokenizer(str(tmp_path / "dated")))
    assert chat.user.startswith("<|start_header_id|>system<|end_header_id|>\n\nToday Date: "
                                "26 Jul 2024<|eot_id|><|start_header_id|>user")
