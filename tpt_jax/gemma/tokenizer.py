"""Tokenizers: SentencePiece models (local or gs://), HF tokenizer dirs, and the builtin one.

All of them follow Gemma's id layout (pad=0, eos=1, bos=2; unk=3 for the builtin), so the model,
sampler and trainer never special-case a tokenizer. `encode` never adds BOS/EOS unless asked:
the sampler and trainer decide where those go.

The builtin tokenizer is a small BPE model trained on the synthetic task's text. Training is
deterministic (one thread, no sampling), and the model file is cached by a hash of its recipe, so
every run and every machine gets the same ids.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Optional, Protocol, Sequence

from tpt_jax import io as tio
from tpt_jax.config import TptError
from tpt_jax.gemma import hub

GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK = 0, 1, 2, 3
BUILTIN_VOCAB_SIZE = 256
# Atomic pieces: newlines carry the solution's line structure; chat markers and the calculator
# and answer markers must never be split or merged with their neighbours.
SPECIAL_PIECES = ["\n", "<start_of_turn>", "<end_of_turn>", "<<", ">>", "####"]
BUILTIN_RECIPE_VERSION = 1  # bump when the corpus or trainer options change


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int

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

    For real Gemma2 checkpoints; ids come from the tokenizer, Gemma's values as fallback."""

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
        self.bos_id = _or(self.tok.bos_token_id, GEMMA_BOS)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        specials = (self.pad_id, self.bos_id, self.eos_id)
        return self.tok.decode([int(i) for i in ids if int(i) not in specials])


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


def builtin_corpus(seed: int = 0) -> list[str]:
    """The builtin tokenizer's training text: synthetic problems in the shapes the prompt
    templates produce (plain and chat), so every template tokenizes without unknown pieces."""
    from tpt_jax.stages import prompts
    from tpt_jax.data.synthetic import synthetic_split

    texts = []
    for r in synthetic_split("train", 1500, seed) + synthetic_split("test", 300, seed):
        texts.append(prompts.format_prompt("plain", r["question"])
                     + prompts.format_completion("plain", r["answer"]))
    for r in synthetic_split("seed", 50, seed):
        texts.append(prompts.format_prompt("zero-shot", r["question"]) + r["answer"])
    return texts


def default_cache_dir() -> Path:
    root = os.environ.get("TPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpt_jax")
    return Path(root)


def builtin_tokenizer(cache_dir: Optional[str | os.PathLike] = None,
                      vocab_size: int = BUILTIN_VOCAB_SIZE, seed: int = 0) -> SentencePieceTokenizer:
    """The synthetic task's tokenizer, trained once and cached by a hash of its recipe."""
    texts = builtin_corpus(seed)
    digest = hashlib.sha256("\x00".join(
        [f"v{BUILTIN_RECIPE_VERSION}", str(vocab_size)] + texts).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"builtin-{vocab_size}-{digest}.model"
    if path.is_file():
        try:
            return SentencePieceTokenizer(path, name=f"builtin ({path})")
        except TptError:
            pass  # a damaged cache file: retrain over it
    try:
        proto = train_sentencepiece(texts, vocab_size, path)
    except OSError:  # read-only cache dir: train in memory (deterministic, so same ids)
        proto = train_sentencepiece(texts, vocab_size)
    return SentencePieceTokenizer(proto, name=f"builtin ({path})")


def load_tokenizer(spec: Optional[str], cache_dir: Optional[str | os.PathLike] = None) -> Tokenizer:
    """`spec`: None or "builtin" -> the synthetic task's tokenizer; a sentencepiece model file
    (local or gs://); or a directory (or Hub id): HF tokenizer files, else a `tokenizer.model`."""
    if spec is None or spec == "builtin":
        return builtin_tokenizer(cache_dir)
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
