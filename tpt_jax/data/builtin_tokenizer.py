"""The builtin tokenizer: a small BPE model trained on the synthetic task's text, and
`load_tokenizer`, which knows it by name.

Training is deterministic (one thread, no sampling), and the model file is cached by a hash of
its recipe, so every run and every machine gets the same ids. It lives here, not in `gemma/`,
because its corpus is the synthetic task in the prompt templates' shapes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from tpt_jax import prompts
from tpt_jax.config import TptError
from tpt_jax.data.synthetic import synthetic_split
from tpt_jax.gemma.tokenizer import (SentencePieceTokenizer, Tokenizer, read_tokenizer,
                                     train_sentencepiece)

BUILTIN_VOCAB_SIZE = 256
BUILTIN_RECIPE_VERSION = 1  # bump when the corpus or trainer options change


def builtin_corpus(seed: int = 0) -> list[str]:
    """The builtin tokenizer's training text: synthetic problems in the shapes the prompt
    templates produce (plain and chat), so every template tokenizes without unknown pieces."""
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
    return read_tokenizer(spec)
