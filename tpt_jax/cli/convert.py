"""`tpt convert`: HF safetensors checkpoints to Orbax params and back (optionally with a
tokenizer and generation config, so transformers loads the result whole)."""
from __future__ import annotations

import logging

from tpt_jax import io

log = logging.getLogger(__name__)


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
    from tpt_jax.data.builtin_tokenizer import load_tokenizer
    from tpt_jax.gemma import weights
    from tpt_jax.gemma.export import export_hf
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
            export_hf(params, cfg, load_tokenizer(args.tokenizer), args.dst, dtype=args.dtype)
        else:
            weights.save_hf(params, cfg, args.dst, dtype=args.dtype)
    log.info("wrote %s (%s)", args.dst, args.to)
    return 0
