"""Think: n sampled reasoning traces per question, written as resumable JSONL shards.

Questions are split into shards of `shard_size` (in dataset order); each shard's samples are
written atomically to `samples-00000.jsonl`, `samples-00001.jsonl`, ... as soon as they are all
in. The shards go through one generate call (`Sampler.stream`; budget mode, whose waves depend
on a shard's samples, calls per shard): the next shard's samples start in the slots one shard's
last traces leave, where a call a shard would idle them. A rerun skips the shards that exist,
so an interrupted run samples only the missing ones and every (question, sample) appears
exactly once. Because each sample's randomness comes from (seed, question id, sample index),
the resumed run writes what an uninterrupted one would have (the tokens early stop's cancelled
rows drew before they stopped depend on the schedule, so decoded.json may differ a little).
`think.json` in the same folder records the settings that decide the samples; resuming with
different ones is an error rather than a silent mix.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import re
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np

from tpt_jax import faults
from tpt_jax import io as tio
from tpt_jax import prompts as P
from tpt_jax.stages import answers, budget
from tpt_jax.stages.completions import complete, complete_groups
from tpt_jax.stages import prune as PR
from tpt_jax.config import ConfigError, PruneConfig, ThinkConfig, TptError
from tpt_jax.engine import Sampler, SamplingConfig
from tpt_jax.engine.contract import DRAWN
from tpt_jax.engine.sampler import (PAGE_SIZE, check_share, pool_pages, prompt_buckets,
                                    resolve_attention, row_shards)

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"^samples-(\d{5})\.jsonl$")
MANIFEST = "think.json"
DECODED = "decoded.json"  # tokens each shard's sampling drew, cancelled and preempted included


def shard_name(k: int) -> str:
    return f"samples-{k:05d}.jsonl"


def sampling_config(cfg: ThinkConfig) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens).validate()


def stop_strings(cfg: ThinkConfig, template: str, chat: P.Chat = P.GEMMA_CHAT) -> list[str]:
    """The template's stop strings plus the configured ones (order kept, no repeats)."""
    out: list[str] = []
    for s in P.stop_strings(template, chat) + list(cfg.stop):
        if s and s not in out:
            out.append(s)
    return out


def make_sampler(model, tokenizer, cfg: ThinkConfig, mesh=None, params: Any = None) -> Sampler:
    """A sampler for `tokenizer`'s EOS/pad ids with think.batch_size decode slots (continuous
    batching: a finished row's slot takes the next sample at once). Reuse one sampler for
    several calls (`Samplers`) to keep its compiled programs and buffers."""
    if cfg.max_prompt_tokens < 1:
        raise ConfigError(f"think.max_prompt_tokens must be >= 1, got {cfg.max_prompt_tokens}")
    sampler = Sampler(model, params, mesh, rows=cfg.batch_size,
                      max_prompt_tokens=cfg.max_prompt_tokens, eos_id=tokenizer.eos_id,
                      pad_id=tokenizer.pad_id, attention=cfg.attention,
                      kv_cache_gb=cfg.kv_cache_gb, kv_cache_share=cfg.kv_cache_share)
    sampler.check_kv(cfg.max_new_tokens)
    return sampler


def check_cache(model, cfg: ThinkConfig, mesh=None) -> None:
    """think.attention, think.kv_cache_gb and think.kv_cache_share for this model, backend
    and mesh: one-line errors before any work (a page size that does not divide the prompt
    buckets, a KV budget too small for one row at its longest, a budget for a dense cache, a
    share of free memory on a backend that does not report it)."""
    attention = resolve_attention(cfg.attention)
    check_share(attention, cfg.kv_cache_share, cfg.kv_cache_gb, mesh)
    pool_pages(model, attention, PAGE_SIZE, prompt_buckets(cfg.max_prompt_tokens),
               cfg.kv_cache_gb, cfg.max_new_tokens, shards=row_shards(mesh, cfg.batch_size))


class Samplers:
    """The samplers of a run, one per model shape and slot setting: Think, Eval, synthesis and
    other-model sources of every round sample through them, so programs are compiled and
    buffers allocated once, and weights are copied into the sampling layout only when they
    change (`Sampler.update_params`)."""

    def __init__(self, tokenizer, mesh=None):
        self.tokenizer, self.mesh = tokenizer, mesh
        self._held: dict = {}

    def get(self, model, params: Any, cfg: ThinkConfig) -> Sampler:
        """The sampler for `model` with think.batch_size slots, holding `params`."""
        key = (model.cfg, model.dtype, model.param_dtype, cfg.batch_size, cfg.max_prompt_tokens)
        if key not in self._held:
            self._held[key] = make_sampler(model, self.tokenizer, cfg, self.mesh)
        sampler = self._held[key]
        sampler.update_params(params)
        return sampler

    def release(self, model) -> None:
        """Free the samplers of `model` (its weights and caches), e.g. a source model whose
        Think is over; compiled programs stay cached."""
        for key in [k for k in self._held if k[:3] == (model.cfg, model.dtype,
                                                       model.param_dtype)]:
            del self._held[key]

    @property
    def layout_copies(self) -> int:
        return sum(s.layout_copies for s in self._held.values())


def fit_prompts(encoded: Sequence[list[int]], max_prompt_tokens: int, policy: str,
                keep_first: int = 1) -> tuple[list[Optional[list[int]]], list[int]]:
    """Apply the long-prompt policy to encoded prompts -> (prompts, indices of long ones).
    "truncate" keeps the first `keep_first` tokens (BOS) and the last ones up to the limit;
    "skip" gives None for a long prompt."""
    if policy not in ("truncate", "skip"):
        raise ConfigError(f"think.long_prompts must be truncate or skip, got {policy!r}")
    out: list[Optional[list[int]]] = []
    long_idx = []
    for i, ids in enumerate(encoded):
        if len(ids) <= max_prompt_tokens:
            out.append(list(ids))
            continue
        long_idx.append(i)
        if policy == "skip":
            out.append(None)
        else:
            head = list(ids[:min(keep_first, max_prompt_tokens - 1)])
            out.append(head + list(ids[len(ids) - (max_prompt_tokens - len(head)):]))
    return out, long_idx


# ----------------------------------------------------------------------------- resumable run


def _manifest(cfg: ThinkConfig, questions: Sequence[dict], template: str, source: str,
              stops: Sequence[str], early: Optional[PruneConfig] = None) -> dict:
    """What decides the samples (batch_size does not: samples are independent of slots),
    including the Prune settings an early stop or budget mode follows (`early`)."""
    ids = hashlib.sha256("\x00".join(str(q["id"]) for q in questions).encode()).hexdigest()[:16]
    keep = ("n", "temperature", "top_k", "top_p", "max_new_tokens", "max_prompt_tokens",
            "shard_size", "seed", "long_prompts", "n_max", "budget_tokens")
    rule = ("strategy", "max_per_question", "calculator_check", "min_chars", "max_chars",
            "max_tokens", "answer_fallback")
    return {**{k: getattr(cfg, k) for k in keep}, "stop": list(stops), "template": template,
            "source": source, "questions": len(questions), "question_ids_sha": ids,
            "stop_when_selected": None if early is None else {k: getattr(early, k)
                                                              for k in rule}}


def early_stop(cfg: ThinkConfig, prune: Optional[PruneConfig]) -> Optional[int]:
    """The k of Think's exact early stop (`prune.stop_cap`), or None when it is off (a log
    line says why when the strategy needs every sample)."""
    if prune is None or not cfg.stop_when_selected:
        return None
    cap, why = PR.stop_cap(prune)
    if cap is None:
        log.info("think: early stop is off: prune.strategy %s needs every sample (%s)",
                 prune.strategy, why)
    return cap


def stop_rule(prune: PruneConfig, cap: int, questions: Sequence[dict]) -> PR.StopRule:
    """The rule for one shard's questions; a question Prune keeps nothing for (no usable gold
    answer) or whose id Prune would merge with another's never stops early."""
    ids = collections.Counter(PR.norm_id(q["id"]) for q in questions)
    golds = [answers.parse_gold(q.get("answer")) if ids[PR.norm_id(q["id"])] == 1 else None
             for q in questions]
    return PR.StopRule(prune, cap, golds)


def _check_manifest(out_dir: str, want: dict, extra: Optional[dict] = None) -> None:
    """Refuse a folder made with other settings; write the manifest (with `extra`, counts that
    are not compared) when there is none."""
    path = tio.path(out_dir) / MANIFEST
    have = None
    if path.exists():
        try:
            have = tio.read_json(path)
        except TptError as e:  # damaged: the shards are still checked one by one
            log.info("think: %s; writing it again with this run's settings", e)
    if have is not None:
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise TptError(f"{out_dir} holds samples made with {k}={have.get(k)!r}, but this run "
                           f"has {k}={want[k]!r}; use another --out or delete the folder")
    elif jax.process_index() == 0:
        tio.write_json_atomic(path, {**want, **(extra or {})})


def _done_shards(out_dir: str, count: int) -> list[bool]:
    """Which shards exist, as process 0 sees them (broadcast, so every host agrees)."""
    root = tio.path(out_dir)
    done = np.array([(root / shard_name(k)).exists() for k in range(count)], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return [bool(d) for d in done]


def _remove_partial_shards(out_dir: str) -> None:
    """Delete shard files a killed run left half-written (`.samples-NNNNN.jsonl.tmp-*`, the
    temporary names of atomic writes); complete shards are never touched."""
    if jax.process_index() != 0:
        return
    for p in tio.path(out_dir).glob(".samples-*.jsonl.tmp-*"):
        log.info("think: removing %s, left by an interrupted write", p)
        p.unlink()


def decoded_tokens(out_dir: str) -> int:
    """Tokens Think drew for a samples folder: per shard, as recorded when it was sampled
    (cancelled samples' included; not those of rows the paged cache preempted and drew again,
    which depend on the pool's size), else its records' tokens."""
    root = tio.path(out_dir)
    drawn = _read_decoded(root)
    names = sorted(p.name for p in root.iterdir() if SHARD_RE.match(p.name))
    return sum(drawn[name]["tokens"] - drawn[name].get("preempted_tokens", 0)
               if name in drawn else
               sum(int(r.get("tokens") or 0) for _, r in tio.read_jsonl(root / name))
               for name in names)


def read_samples(out_dir: str) -> list[dict]:
    """Every sample record in a Think folder, shard by shard."""
    root = tio.path(out_dir)
    if not root.exists():
        raise TptError(f"{out_dir}: no samples folder")
    names = sorted(p.name for p in root.iterdir() if SHARD_RE.match(p.name))
    return [rec for name in names for _, rec in tio.read_jsonl(root / name)]


def think(params: Any, model, tokenizer, questions: Sequence[dict], cfg: ThinkConfig,
          out_dir: Optional[str] = None, mesh=None, *, template: str = "zero-shot",
          shots: Optional[Sequence[dict]] = None, source: str = "model", progress: bool = True,
          sampler: Optional[Sampler] = None, prune: Optional[PruneConfig] = None) -> list[dict]:
    """Sample cfg.n traces for each question ({id, question, ...}) -> sample records
    {id, sample, source, prompt, completion, finish, tokens}, in question then sample order.

    With `out_dir`, records go to JSONL shards of cfg.shard_size questions and existing shards
    are reused (resume). `sampler` (from `make_sampler` or `Samplers`, for this model and
    think.batch_size) keeps compiled programs and buffers across calls; it is given `params`.
    With `prune` (the round's Prune settings) and think.stop_when_selected, a question's
    samples stop once Prune's selection can no longer change (`early_stop`): it then has
    samples 0..m-1 for some m <= n, and Prune keeps exactly what it would from all n. With
    think.budget_tokens, the questions Prune's rule has not settled get more samples, up to
    think.n_max, while the round's budget lasts (`budget`)."""
    from tqdm.auto import tqdm

    sampling = sampling_config(cfg)
    if cfg.n < 1 or cfg.shard_size < 1:
        raise ConfigError("think.n and think.shard_size must be >= 1")
    seen = set()
    for q in questions:
        if q["id"] in seen:
            raise TptError(f"question id {q['id']!r} appears twice; ids must be unique")
        seen.add(q["id"])
    chat = P.chat_of(tokenizer)  # the model's own turn markers
    stops = stop_strings(cfg, template, chat)
    texts = [P.format_prompt(template, q["question"], shots, chat) for q in questions]
    encoded, long_idx = fit_prompts([tokenizer.encode(t, add_bos=True) for t in texts],
                                    cfg.max_prompt_tokens, cfg.long_prompts)
    long_info = {}
    if long_idx:
        verb = "skipped" if cfg.long_prompts == "skip" else "truncated"
        long_info = {"long_prompts_" + verb: len(long_idx),
                     "long_prompt_ids": [str(questions[i]["id"]) for i in long_idx[:20]]}
        log.warning("think: %d of %d prompts are longer than think.max_prompt_tokens %d and were "
                    "%s (think.long_prompts=%s), e.g. %s", len(long_idx), len(questions),
                    cfg.max_prompt_tokens, verb, cfg.long_prompts,
                    ", ".join(long_info["long_prompt_ids"][:3]))
    shards = [range(a, min(a + cfg.shard_size, len(questions)))
              for a in range(0, len(questions), cfg.shard_size)]
    # the questions that get samples, per shard (a skipped long prompt gets none)
    shards = [[i for i in shard if encoded[i] is not None] for shard in shards]
    reused: dict[int, list[dict]] = {}
    cap = early_stop(cfg, prune)
    settle = budget.check(cfg, prune, sum(len(s) for s in shards))  # k, in budget mode
    most = cfg.n if settle is None else cfg.n_max  # samples a question may have
    if out_dir is not None:
        _check_manifest(out_dir, _manifest(cfg, questions, template, source, stops,
                                           None if cap is None and settle is None else prune),
                        long_info)
        _remove_partial_shards(out_dir)
        for k, exists in enumerate(_done_shards(out_dir, len(shards))):
            recs = _read_shard(out_dir, k, [questions[i]["id"] for i in shards[k]], most,
                               cap is not None or settle is not None) if exists else None
            if recs is not None:
                reused[k] = recs
    done = [k in reused for k in range(len(shards))]
    if any(shard and not d for shard, d in zip(shards, done)):
        if sampler is None:
            sampler = make_sampler(model, tokenizer, cfg, mesh)
        sampler.update_params(params)

    total = sum(len(s) for s in shards) * cfg.n
    initial = sum(len(s) for s, d in zip(shards, done) if d) * cfg.n
    # samples as they finish; off on other processes and when stderr is not a terminal
    bar = tqdm(total=total, initial=initial, unit="sample", desc="think", dynamic_ncols=True,
               disable=True if not progress or jax.process_index() != 0 else None)
    share = None if settle is None else budget.shares(cfg.budget_tokens,
                                                      [len(s) for s in shards])
    by_shard = dict(reused)  # shard -> its records
    parts: dict[int, list] = {}  # shard sampled now -> [(a generate call's Stats, its prompts)]
    todo = [k for k, d in enumerate(done) if not d]
    if settle is None:
        sampled = _stream_shards(sampler, tokenizer, questions, texts, encoded, shards, todo,
                                 cfg, sampling, stops, bar, prune, cap)
    else:
        sampled = _budget_shards(sampler, tokenizer, questions, texts, encoded, shards, todo,
                                 cfg, sampling, stops, bar, prune, cap, settle, share)
    try:
        for k, outs, part in sampled:
            parts[k] = part
            recs = [{"id": questions[i]["id"], "sample": j, "source": source, "prompt": texts[i],
                     **o} for i, per_q in zip(shards[k], outs) for j, o in enumerate(per_q)]
            if out_dir is not None and jax.process_index() == 0:
                _record_decoded(out_dir, parts)
                tio.write_jsonl_atomic(tio.path(out_dir) / shard_name(k), recs)
                faults.point("shard-written")
            by_shard[k] = recs
    finally:
        bar.close()
    if out_dir is not None and parts and jax.process_index() == 0:
        _record_decoded(out_dir, parts)  # with cancelled rows freed after their shard was written
    records = [r for k in range(len(shards)) for r in by_shard[k]]
    calls = list({id(c): c for part in parts.values() for c, _ in part}.values())
    used = sum(c.tokens for c in calls)  # tokens drawn
    offered = sum(c.slots * c.decode_steps for c in calls)  # slot-steps run
    skipped = sum(c.cancelled for c in calls)  # samples cancelled
    preempted = sum(c.preempted for c in calls)  # rows the paged cache preempted
    redrawn = sum(c.preempted_tokens for c in calls)  # the tokens they had drawn
    if out_dir is not None:
        log.info("think: %d samples for %d questions in %s (%d shards, %d reused%s%s)",
                 len(records), len(questions), out_dir, len(shards), sum(done),
                 "".join(f", {v} {k.replace('_', ' ')}" for k, v in long_info.items()
                         if isinstance(v, int)),
                 f"; decode slots busy {used / offered:.0%}" if offered else "")
        if preempted:
            log.info("think: the KV page pool ran out %d times: the newest rows were started "
                     "again (%d tokens drawn twice, %.1f%% of those drawn; a larger "
                     "think.kv_cache_gb avoids it)", preempted, redrawn,
                     100 * redrawn / max(used, 1))
        if settle is not None:
            counts = collections.Counter(r["id"] for r in records).values()
            log.info("think: budget mode: %d samples, %d to %d a question; the shards sampled "
                     "now decoded %d of their %d budgeted tokens", len(records),
                     min(counts, default=0), max(counts, default=0), used - redrawn,
                     sum(share[k] for k in range(len(shards)) if not done[k]))
        elif cap is not None:
            log.info("think: early stop (prune.strategy %s) left %d of %d samples undrawn, "
                     "%d of them cancelled after they had started", prune.strategy,
                     total - len(records), total, skipped)
    return records


def _stream_shards(sampler: Sampler, tokenizer, questions: Sequence[dict], texts: list[str],
                   encoded: list, shards: list, todo: list[int], cfg: ThinkConfig,
                   sampling: SamplingConfig, stops: list[str], bar,
                   prune: Optional[PruneConfig], cap: Optional[int]) -> Iterator[tuple]:
    """Shards `todo` in one generate call, so the next shard fills the slots while one shard's
    longest rows finish -> yields (k, records per question, [(the call's Stats, shard k's
    prompts in it)]) as each shard is complete: n samples a question, fewer where early stop
    (`cap`) settles a question."""
    flat = [i for k in todo for i in shards[k]]
    if not flat:  # every shard left is empty (its prompts were skipped)
        for k in todo:
            yield k, [], []
        return
    sizes = [len(shards[k]) for k in todo]
    bounds = np.cumsum([0, *sizes]).tolist()
    rule = None if cap is None else stop_rule(prune, cap, [questions[i] for i in flat])
    for g, outs in complete_groups(sampler, tokenizer, [texts[i] for i in flat],
                                   [str(questions[i]["id"]) for i in flat], sampling, cfg.n,
                                   cfg.seed, stops, sizes, progress=bar.update,
                                   encoded=[encoded[i] for i in flat],
                                   needed=None if rule is None else rule.needed):
        yield todo[g], outs, [(sampler.stats, range(bounds[g], bounds[g + 1]))]


def _budget_shards(sampler: Sampler, tokenizer, questions: Sequence[dict], texts: list[str],
                   encoded: list, shards: list, todo: list[int], cfg: ThinkConfig,
                   sampling: SamplingConfig, stops: list[str], bar,
                   prune: Optional[PruneConfig], cap: Optional[int], settle: int,
                   share: list[int]) -> Iterator[tuple]:
    """Budget mode, shard by shard (a wave depends on the shard's samples before it): yields
    (k, records per question, [(each generate call's Stats, None: all its prompts)])."""
    for k in todo:
        shard = shards[k]
        if not shard:
            yield k, [], []
            continue
        ids = [str(questions[i]["id"]) for i in shard]
        rule = stop_rule(prune, cap or settle, [questions[i] for i in shard])
        outs = complete(sampler, tokenizer, [texts[i] for i in shard], ids, sampling, cfg.n,
                        cfg.seed, stops, progress=bar.update,
                        encoded=[encoded[i] for i in shard],
                        needed=None if cap is None else rule.needed)
        calls = [sampler.stats]
        waves = budget.Waves(rule, cfg.n_max, share[k], cfg.max_new_tokens)
        waves.add(range(len(shard)), outs, sampler.stats.sampled_tokens)
        wave = waves.next()
        while wave:
            bar.total += len(wave)
            more = complete(sampler, tokenizer, [texts[shard[q]] for q in wave],
                            [ids[q] for q in wave], sampling, 1, cfg.seed, stops,
                            progress=bar.update, encoded=[encoded[shard[q]] for q in wave],
                            first_sample=[len(waves.drawn[q]) for q in wave])
            calls.append(sampler.stats)
            waves.add(wave, more, sampler.stats.sampled_tokens)
            wave = waves.next()
        yield k, waves.drawn, [(c, None) for c in calls]


def _record_decoded(out_dir: str, parts: dict) -> None:
    """Note the tokens each shard sampled now drew (`parts`: shard -> [(a generate call's
    Stats, the shard's prompts in it, None: all)]), before the shard itself is written (a
    rerun that samples the shard again writes it again)."""
    drawn = _read_decoded(tio.path(out_dir))
    for k, part in parts.items():
        counts = [c.drawn(prompts) for c, prompts in part]
        drawn[shard_name(k)] = {key: sum(x[key] for x in counts) for key in DRAWN}
    tio.write_json_atomic(tio.path(out_dir) / DECODED, drawn)


def _read_decoded(root) -> dict:
    """decoded.json of a samples folder; a damaged one counts as absent (one warning): the
    shards it covered then count their records' tokens, the samples kept, not those cancelled."""
    path = root / DECODED
    if not path.exists():
        return {}
    try:
        drawn = tio.read_json(path, dict)
    except TptError as e:
        log.warning("think: %s; its shards count the tokens of the samples they keep", e)
        return {}
    return drawn


def _read_shard(out_dir: str, k: int, ids: list, n: int,
                prefix: bool = False) -> Optional[list[dict]]:
    """A finished shard's records, or None when it is damaged (cut, garbage, empty, or not
    exactly samples 0..n-1 of each of its questions; 0..m-1, 1 <= m <= n, with early stop or
    budget mode, whose n is think.n_max):
    it is then sampled again, to the same records."""
    where = tio.path(out_dir) / shard_name(k)
    try:
        recs = [r for _, r in tio.read_jsonl(where)]
    except TptError as e:
        log.info("think: %s; sampling that shard again", e)
        return None
    have = collections.Counter(r.get("id") for r in recs)
    want = {(i, j) for i in ids for j in range(have[i] if prefix else n)}
    pairs = [(r.get("id"), r.get("sample")) for r in recs]
    if len(pairs) != len(want) or set(pairs) != want or not all(1 <= have[i] <= n for i in ids):
        log.info("think: %s does not hold exactly samples 0..%d of its %d questions; sampling "
                 "it again", where, n - 1, len(ids))
        return None
    return recs

