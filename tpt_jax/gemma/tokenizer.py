"""Tokenizers: SentencePiece models (local or gs://), HF tokenizer dirs, and training a
SentencePiece model with Gemma's ids.

SentencePiece models follow Gemma's id layout (pad=0, eos=1, bos=2; unk=3 for the builtin); HF
tokenizers give their own ids (Gemma's as fallback), and one without a BOS token (Qwen) gets
none. `encode` never adds BOS/EOS unless asked: the sampler and trainer decide where those go.
An HF tokenizer's `chat` holds the turn markers of its chat template, which zero-shot prompts
use (`prompts.Chat`). The builtin tokenizer (trained on the synthetic
task's text) and `load_tokenizer` live in `data.builtin_tokenizer`, above the data they need.
"""
from __future__ import annotations

import functools
import io
import os
import tempfile
from pathlib import Path
from typing import Optional, Protocol, Sequence

from tpt_jax import io as tio
from tpt_jax.config import TptError
from tpt_jax.gemma import hub
from tpt_jax.prompts import Chat

GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK = 0, 1, 2, 3
# Atomic pieces: newlines carry the solution's line structure; chat markers and the calculator
# and answer markers must never be split or merged with their neighbours.
SPECIAL_PIECES = ["\n", "<start_of_turn>", "<end_of_turn>", "<<", ">>", "####"]


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: Optional[int]  # None: the tokenizer has no BOS (Qwen)

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model, from a file path (local or gs://) or serialized bytes."""

    def __init__(self, model: str | os.PathLike | bytes, name: Optional[str] = None):
        import sentencepiece as spm

        if isinstance(model, bytes):
            proto, self.name = model, name or "<bytes>"
        else:
            self.name = name or str(model)
            proto = tio.read_bytes(model)
        self.proto = proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception:  # sentencepiece raises bare RuntimeError/OSError on bad protos
            raise TptError(f"tokenizer {self.name}: not a sentencepiece model") from None
        self.vocab_size = self.sp.vocab_size()
        self.pad_id = _or(self.sp.pad_id(), GEMMA_PAD)
        self.eos_id = _or(self.sp.eos_id(), GEMMA_EOS)
        self.bos_id = _or(self.sp.bos_id(), GEMMA_BOS)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        specials = (self.pad_id, self.bos_id, self.eos_id)
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class HFTokenizer:
    """`transformers.AutoTokenizer` from a local dir (or gs:// dir, copied locally first).

    For real checkpoints; ids come from the tokenizer, Gemma's values as fallback for pad and
    eos. A tokenizer without a BOS token gets none (`bos_id` None), as HF encodes for Qwen."""

    def __init__(self, directory: str | os.PathLike):
        from transformers import AutoTokenizer

        self.name = str(directory)
        local = _local_dir(directory)
        try:
            self.tok = AutoTokenizer.from_pretrained(local)
        except Exception as e:  # tokenizers raises bare Exception on a corrupt tokenizer.json
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TptError(f"tokenizer {directory}: cannot load HF tokenizer ({first})") from None
        self.vocab_size = len(self.tok)
        self.pad_id = _or(self.tok.pad_token_id, GEMMA_PAD)
        self.eos_id = _or(self.tok.eos_token_id, GEMMA_EOS)
        self.bos_id = self.tok.bos_token_id
        # only ids the tokenizer really has as pad/bos/eos are dropped when decoding (Llama 3
        # has no pad token, and id 0, Gemma's pad, is "!" there)
        self._specials = {i for i in (self.tok.pad_token_id, self.tok.bos_token_id,
                                      self.tok.eos_token_id) if i is not None}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in self._specials])

    @functools.cached_property
    def chat(self) -> Optional[Chat]:
        """The turn markers of the tokenizer's chat template (None without one), found by
        rendering a one-question conversation with placeholders for the messages."""
        if not getattr(self.tok, "chat_template", None):
            return None
        q, a = "QQ7QUESTION7QQ", "AA7ANSWER7AA"
        # Llama 3.2+ templates write today's date into the system turn unless given one: pin
        # it (Llama 3.1's own default), so prompts do not change from one day to the next
        fixed = {"date_string": "26 Jul 2024"}
        try:
            prompt = self.tok.apply_chat_template([{"role": "user", "content": q}],
                                                  tokenize=False, add_generation_prompt=True,
                                                  **fixed)
            turn = self.tok.apply_chat_template([{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}],
                                                tokenize=False, **fixed)
        except Exception as e:  # jinja raises its own types for template errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise TptError(f"tokenizer {self.name}: cannot render its chat template ({first})"
                           ) from None
        if prompt.count(q) != 1 or turn.count(a) != 1 or not turn.split(a)[1].strip():
            raise TptError(f"tokenizer {self.name}: its chat template does not show the user "
                           f"message once and end the model's turn with a marker")
        user, model = prompt.split(q)
        bos = self.tok.bos_token
        if bos and user.startswith(bos):  # the sampler and trainer add BOS as an id
            user = user[len(bos):]
        return Chat(user=user, model=model, end=turn.split(a)[1].strip())


def _or(value: Optional[int], default: int) -> int:
    return default if value is None or value < 0 else int(value)


def _local_dir(directory: str | os.PathLike) -> str:
    """HF loaders read local files only; copy a gs:// tokenizer dir (small files) to a temp dir."""
    if not tio.is_remote(directory):
        if not Path(directory).is_dir():
            raise TptError(f"tokenizer {directory}: directory not found")
        return str(directory)
    src = tio.path(directory)
    if not src.exists():
        raise TptError(f"tokenizer {directory}: not found")
    dst = Path(tempfile.mkdtemp(prefix="tpt-tokenizer-"))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "config")):
            (dst / f.name).write_bytes(f.read_bytes())
    return str(dst)


# ----------------------------------------------------------------------------- builtin


def train_sentencepiece(texts: Sequence[str], vocab_size: int,
                        out_path: Optional[str | os.PathLike] = None) -> bytes:
    """Train a deterministic BPE sentencepiece model with Gemma's special-id layout.

    pad=0, eos=1, bos=2, unk=3; digits split into single tokens (arithmetic is per digit);
    newlines and whitespace kept exactly (identity normalization), so decode(encode(t)) == t for
    any text made of characters seen in training. `vocab_size` is an upper bound: a small corpus
    yields fewer pieces. Returns the model bytes; writes them atomically to `out_path` if given."""
    import sentencepiece as spm

    if not texts:
        raise TptError("train_sentencepiece: no training text")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", pad_id=GEMMA_PAD, eos_id=GEMMA_EOS, bos_id=GEMMA_BOS,
            unk_id=GEMMA_UNK, user_defined_symbols=SPECIAL_PIECES, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, hard_vocab_limit=False, character_coverage=1.0,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as e:
        raise TptError(f"train_sentencepiece: {str(e).strip().splitlines()[-1]}") from None
    proto = buf.getvalue()
    if out_path is not None:
        target = tio.path(out_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        tmp.write_bytes(proto)
        tmp.rename(target)
    return proto


def read_tokenizer(spec: str) -> Tokenizer:
    """A sentencepiece model file (local or gs://), or a directory (or Hub id): HF tokenizer
    files, else a `tokenizer.model`. The builtin tokenizer is `data.builtin_tokenizer`'s."""
    spec = hub.resolve(spec, "tokenizer")  # a Hub id -> its cached tokenizer files
    p = tio.path(spec)
    if not p.exists():
        raise TptError(f"tokenizer {spec}: not found (give a sentencepiece .model file, an HF "
                       f"tokenizer directory, or 'builtin')")
    if p.is_dir():
        names = {f.name for f in p.iterdir()}
        if names & {"tokenizer.json", "tokenizer_config.json"}:
            return HFTokenizer(spec)
        if "tokenizer.model" in names:
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise TptError(f"tokenizer {spec}: directory has no tokenizer.json, "
                       f"tokenizer_config.json or tokenizer.model")
    return SentencePieceTokenizer(spec)


def check_vocab(tok: Tokenizer, model_vocab_size: int, where: str = "model.vocab_size") -> None:
    """A tokenizer whose ids reach past the embedding table would index out of range silently
    on accelerators; fail early with the two numbers instead."""
    if tok.vocab_size > model_vocab_size:
        raise TptError(f"tokenizer {getattr(tok, 'name', '')} has {tok.vocab_size} tokens but "
                       f"{where} is {model_vocab_size}; use a model with vocab_size >= "
                       f"{tok.vocab_size} or a smaller tokenizer".replace("tokenizer  ", "tokenizer "))
