"""`tpt think`: n sampled reasoning traces per question of a JSONL dataset, written as
resumable shards by `stages.think.think`."""
from __future__ import annotations

import logging

import jax

from tpt_jax import io as tio
from tpt_jax import prompts as P
from tpt_jax.config import (ATTENTIONS, ConfigError, PruneConfig, ThinkConfig, TptError,
                             validate_budget)
from tpt_jax.stages import budget
from tpt_jax.stages.think import check_cache, sampling_config, think

log = logging.getLogger(__name__)


def add_cli(parser) -> None:
    d = ThinkConfig()
    parser.add_argument("--dataset", required=True, help="JSONL with id, question (and answer)")
    parser.add_argument("--checkpoint", help="HF checkpoint dir (Gemma2, Llama, Qwen2; "
                        "config.json) or Orbax params dir (model.json); local or gs://")
    parser.add_argument("--model", help="model preset with random weights (smoke tests) when "
                        "no --checkpoint is given")
    parser.add_argument("--tokenizer", default="builtin",
                        help="sentencepiece .model, HF tokenizer dir, or 'builtin'")
    parser.add_argument("--out", required=True, help="output folder for samples-NNNNN.jsonl")
    parser.add_argument("--template", default="zero-shot", help="prompt template (prompts.py)")
    parser.add_argument("--source", help="model name stored in each record (default: checkpoint)")
    parser.add_argument("--n", type=int, default=d.n, help="samples per question")
    parser.add_argument("--n-max", type=int, help="budget mode (with --budget-tokens): samples "
                        "a question may get while it has no correct one (first-correct)")
    parser.add_argument("--budget-tokens", type=int, help="budget mode: tokens all questions' "
                        "samples may decode; needs each question's `answer`")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="1 = off")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--long-prompts", default=d.long_prompts, choices=["truncate", "skip"],
                        help="prompts over --max-prompt-tokens: keep BOS + the last tokens, or "
                             "skip the question (counted either way)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="decode slots: samples decoded at once (continuous batching)")
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="questions per shard")
    parser.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--attention", default=d.attention, choices=list(ATTENTIONS),
                        help="decode KV cache (think.attention; auto: paged on a GPU/TPU)")
    parser.add_argument("--kv-cache-gb", type=float,
                        help="paged: the page pool's GB, all devices together")
    parser.add_argument("--kv-cache-share", type=float,
                        help="paged: the page pool's share of each device's free memory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = rest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cli)


def _load_model(args, mesh):
    from tpt_jax.gemma import model as M
    from tpt_jax.gemma import weights
    from tpt_jax.gemma.config import model_preset
    from tpt_jax.gemma.sharding import SAMPLE_RULES
    if args.checkpoint:
        root = tio.path(args.checkpoint)
        if (root / "config.json").exists():
            cfg = weights.read_hf_config(weights._stage_local(args.checkpoint))
            model = M.make_model(cfg, args.dtype, args.dtype)
            return model, weights.load_hf(args.checkpoint, model, mesh, SAMPLE_RULES)
        if (root / "model.json").exists():
            model = M.make_model(weights.read_model_json(args.checkpoint), args.dtype, args.dtype)
            return model, weights.load_params(args.checkpoint, model, mesh, SAMPLE_RULES)
        raise TptError(f"{args.checkpoint}: neither an HF checkpoint (config.json) nor Orbax "
                       f"params (model.json)")
    if not args.model:
        raise TptError("give --checkpoint (or --model PRESET for random weights)")
    model = M.make_model(model_preset(args.model), args.dtype, args.dtype)
    return model, M.init_params(model, jax.random.key(args.seed), mesh, SAMPLE_RULES)


def _cli(args) -> int:
    from tpt_jax.gemma.sharding import make_mesh, parse_mesh
    from tpt_jax.data.builtin_tokenizer import load_tokenizer
    from tpt_jax.gemma.tokenizer import check_vocab

    tio.check_writable_dir(args.out, "--out")
    cfg = ThinkConfig(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                      batch_size=args.batch_size, stop=list(args.stop),
                      shard_size=args.shard_size, seed=args.seed, long_prompts=args.long_prompts,
                      n_max=args.n_max, budget_tokens=args.budget_tokens,
                      attention=args.attention, kv_cache_gb=args.kv_cache_gb,
                      kv_cache_share=args.kv_cache_share)
    for name in ("n", "max_new_tokens", "max_prompt_tokens", "batch_size", "shard_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    sampling_config(cfg)
    validate_budget(cfg, "--")
    P.parse_template(args.template)
    skips = tio.Skips()
    questions = []
    for lineno, r in tio.read_jsonl(args.dataset, skips, required=("id", "question")):
        if not isinstance(r["question"], str) or not r["question"].strip():
            skips.add("empty question" if isinstance(r["question"], str) else
                      "question not text", f"{args.dataset}:{lineno}")
            continue
        questions.append(r)
    if skips.total():
        log.warning("%s: skipped %s", args.dataset, skips.summary())
    if args.limit is not None:
        questions = questions[:args.limit]
    if not questions:
        raise TptError(f"{args.dataset}: no questions")
    prune = PruneConfig() if cfg.budget_tokens is not None else None  # first-correct's verifier
    budget.check(cfg, prune, len(questions), "--")
    mesh = make_mesh(parse_mesh(args.mesh))
    tokenizer = load_tokenizer(args.tokenizer)
    model, params = _load_model(args, mesh)
    check_vocab(tokenizer, model.cfg.vocab_size)
    check_cache(model, cfg, mesh)
    source = args.source or (args.checkpoint.rstrip("/").split("/")[-1] if args.checkpoint
                             else args.model)
    recs = think(params, model, tokenizer, questions, cfg, args.out, mesh,
                 template=args.template, source=source, progress=not args.no_progress,
                 prune=prune)
    stopped = sum(r["finish"] == "stop" for r in recs)
    print(f"think: {len(recs)} samples for {len(questions)} questions in {args.out} "
          f"({stopped} stopped, {len(recs) - stopped} hit max_new_tokens)")
    return 0
