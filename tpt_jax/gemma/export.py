"""HF exports that transformers loads whole, and `tpt convert`.

`export_hf` writes the weights (`weights.save_hf`), the tokenizer files and a generation
config, so `AutoModelForCausalLM.from_pretrained(dir)` plus `AutoTokenizer.from_pretrained(dir)`
generate what tpt's sampler does: same prompt ids (BOS first), same stop ids.
"""
from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


def export_hf(params: Any, model_cfg: ModelConfig, tokenizer_source: Any, out_dir: str,
              dtype: str = "float32") -> None:
    """Weights + tokenizer + generation_config.json in `out_dir` (local or gs://).
    `tokenizer_source`: a loaded tokenizer, or what `load_tokenizer` takes (None / "builtin", a
    .model file, an HF dir or Hub id). Every process must call it (weights are gathered);
    process 0 writes."""
    weights.save_hf(params, model_cfg, out_dir, dtype=dtype)
    if jax.process_index() != 0:
        return
    loaded = tokenizer_source is not None and not isinstance(tokenizer_source, str)
    tok = tokenizer_source if loaded else T.load_tokenizer(tokenizer_source)
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
    """EOS, and Gemma's <end_of_turn> when the tokenizer has it as one piece (chat prompts)."""
    ids = [tok.eos_id]
    turn = tok.encode("<end_of_turn>")
    if len(turn) == 1 and turn[0] not in ids and turn[0] != getattr(tok, "unk_id", T.GEMMA_UNK):
        ids.append(turn[0])
    return ids


def save_generation_config(tok: T.Tokenizer, out_dir: str) -> None:
    from transformers import GenerationConfig
    eos = stop_ids(tok)
    GenerationConfig(bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                     eos_token_id=eos[0] if len(eos) == 1 else eos).save_pretrained(out_dir)


# ----------------------------------------------------------------------------- CLI


def add_cli(parser) -> None:
    parser.add_argument("src", help="source: HF checkpoint dir (local, gs:// or Hub id "
                        "ORG/NAME[@REV]) for --to orbax; Orbax params dir for --to hf")
    parser.add_argument("dst", help="destination directory (local or gs://)")
    parser.add_argument("--to", choices=["orbax", "hf"], required=True,
                        help="orbax: HF safetensors -> Orbax params; hf: Orbax params -> HF")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the written weights")
    parser.add_argument("--tokenizer", help="--to hf: also write this tokenizer's files and a "
                        "generation config (sentencepiece .model, HF dir, Hub id or 'builtin')")
    parser.set_defaults(func=_convert)


def _convert(args) -> int:
    from tpt_jax.gemma.model import make_model
    io.check_writable_dir(args.dst, "destination")
    if args.to == "orbax":
        cfg = weights.read_hf_config(args.src)
        model = make_model(cfg, param_dtype=args.dtype)
        weights.save_params(weights.load_hf(args.src, model), cfg, args.dst)
    else:
        cfg = weights.read_model_json(args.src)
        params = weights.load_params(args.src, make_model(cfg))
        if args.tokenizer:
            export_hf(params, cfg, args.tokenizer, args.dst, dtype=args.dtype)
        else:
            weights.save_hf(params, cfg, args.dst, dtype=args.dtype)
    log.info("wrote %s (%s)", args.dst, args.to)
    return 0
