"""HF exports that transformers loads whole.

`export_hf` writes the weights (`weights.save_hf`), the tokenizer files and a generation
config, so `AutoModelForCausalLM.from_pretrained(dir)` plus `AutoTokenizer.from_pretrained(dir)`
generate what tpt's sampler does: same prompt ids (BOS first), same stop ids.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import jax

from tpt_jax import io
from tpt_jax.config import TptError
from tpt_jax.gemma.config import ModelConfig
from tpt_jax.gemma import tokenizer as T
from tpt_jax.gemma import weights
from tpt_jax.prompts import chat_of


def export_hf(params: Any, model_cfg: ModelConfig, tok: T.Tokenizer, out_dir: str,
              dtype: str = "float32") -> None:
    """Weights + tokenizer + generation_config.json in `out_dir` (local or gs://).
    Every process must call it (weights are gathered); process 0 writes."""
    weights.save_hf(params, model_cfg, out_dir, dtype=dtype)
    if jax.process_index() != 0:
        return
    local = tempfile.mkdtemp(prefix="tpt-export-tok-")
    try:
        save_tokenizer(tok, local)
        save_generation_config(tok, local)
        for f in os.listdir(local):
            io.path(os.path.join(local, f)).copy(io.path(out_dir) / f, overwrite=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def save_tokenizer(tok: T.Tokenizer, out_dir: str) -> None:
    """HF tokenizer files for `tok`. A SentencePiece model becomes a GemmaTokenizer (converted by
    transformers from tokenizer.model, which is kept too) that adds BOS, as tpt's prompts do."""
    from transformers import AutoTokenizer
    if isinstance(tok, T.HFTokenizer):
        tok.tok.save_pretrained(out_dir)
        return
    if not isinstance(tok, T.SentencePieceTokenizer):
        raise TptError(f"tokenizer {getattr(tok, 'name', tok)}: cannot export it as HF files")
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tok.proto)
    names = {k: tok.piece(getattr(tok, f"{k}_id")) for k in ("pad", "eos", "bos")}
    unk = tok.sp.unk_id()
    io.write_json_atomic(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        **{f"{k}_token": v for k, v in names.items()},
        **({"unk_token": tok.piece(unk)} if unk >= 0 else {})})
    try:
        AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)  # adds tokenizer.json
    except (OSError, ValueError) as e:
        raise TptError(f"tokenizer {tok.name}: transformers cannot convert it ({e})") from None


def stop_ids(tok: T.Tokenizer) -> list[int]:
    """EOS, and the chat's end of turn (Gemma's <end_of_turn>, Llama 3's <|eot_id|>, ...) when
    the tokenizer has it as one piece (chat prompts)."""
    ids = [tok.eos_id]
    turn = tok.encode(chat_of(tok).end)
    if len(turn) == 1 and turn[0] not in ids and turn[0] != getattr(tok, "unk_id", T.GEMMA_UNK):
        ids.append(turn[0])
    return ids


def save_generation_config(tok: T.Tokenizer, out_dir: str) -> None:
    from transformers import GenerationConfig
    eos = stop_ids(tok)
    GenerationConfig(bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                     eos_token_id=eos[0] if len(eos) == 1 else eos).save_pretrained(out_dir)
