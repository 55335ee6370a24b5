"""Prompt texts to Think's sample records through the engine: each generation decoded, cut at
the first stop string, with why it ended and the tokens it drew."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

from tpt_jax import prompts as P
from tpt_jax.engine import Sampler, SamplingConfig


def complete(sampler: Sampler, tokenizer, prompt_texts: Sequence[str], ids: Sequence[str],
             sampling: SamplingConfig, n: int, seed: int, stops: Sequence[str],
             progress=None, encoded: Optional[Sequence[list[int]]] = None,
             needed=None, first_sample: Optional[Sequence[int]] = None) -> list[list[dict]]:
    """Sample n completions per prompt text -> [prompt][sample] dicts with completion (text cut
    at the first stop string), finish ("stop" | "length") and tokens (tokens drawn).
    `encoded` (the prompts as token ids, e.g. after `fit_prompts`) replaces encoding the texts.
    `needed(prompt, sample, record)` (e.g. `prune.StopRule.needed`) may end a prompt's
    sampling early (`Sampler.generate`'s samples_needed): it then gets fewer records.
    `first_sample` (one per prompt) continues each prompt's samples from that index."""
    out = []
    for _, group in complete_groups(sampler, tokenizer, prompt_texts, ids, sampling, n, seed,
                                    stops, [len(ids)], progress, encoded, needed, first_sample):
        out += group
    return out


def complete_groups(sampler: Sampler, tokenizer, prompt_texts: Sequence[str],
                    ids: Sequence[str], sampling: SamplingConfig, n: int, seed: int,
                    stops: Sequence[str], sizes: Sequence[int], progress=None,
                    encoded: Optional[Sequence[list[int]]] = None, needed=None,
                    first_sample: Optional[Sequence[int]] = None) -> Iterator[tuple[int, list]]:
    """`complete` for prompts in consecutive groups of `sizes` in one generate call
    (`Sampler.stream`): yields (group, its [prompt][sample] records) as each group is
    complete."""
    if encoded is None:
        encoded = [tokenizer.encode(t, add_bos=True) for t in prompt_texts]
    stop_tokens = [t for t in (tokenizer.encode(s) for s in stops) if t]
    until = None if needed is None else (
        lambda i, j, g: needed(i, j, sample_record(g, tokenizer, stops)))
    for g, gens in sampler.stream(encoded, sampling, n, sizes, ids=ids, seed=seed,
                                  progress=progress, stop_tokens=stop_tokens,
                                  samples_needed=until, first_sample=first_sample):
        yield g, [[sample_record(x, tokenizer, stops) for x in per_prompt] for per_prompt in gens]


def sample_record(g, tokenizer, stops: Sequence[str]) -> dict:
    """A generation as Think records it: text cut at the first stop string, why it ended,
    tokens drawn."""
    text, cut = P.cut_at_stop(tokenizer.decode(g.tokens), stops)
    return {"completion": text, "finish": "stop" if (cut or g.finish == "stop") else "length",
            "tokens": g.num_tokens}
