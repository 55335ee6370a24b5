"""The sampling engine: n samples per prompt from one model, continuous batching over a fixed
set of decode slots. Stage code uses the front door only:

    sampler = Sampler(model, params, mesh, rows=32, max_prompt_tokens=512, eos_id=..., pad_id=...)
    gens = sampler.generate(prompts, SamplingConfig(temperature=0.7, max_new_tokens=512), n=4,
                            ids=question_ids, seed=0)      # [prompt][sample] -> Generation
    sampler.update_params(new_params)                      # next round: same programs, buffers
    sampler.generate(..., samples_needed=rule)             # early stop: rule(prompt, sample,
                                                           # generation) -> samples it needs
    for g, gens in sampler.stream(prompts, sampling, 4, sizes=[500, 500, 120]):
        ...                                                # one call, groups yielded as done

Inside, lowest first: `sampling` (settings, per-row keys), `cache` (KV cache layouts and
shardings), `pages` (the paged cache's host page table), `paged` (its page pool and
attention), `layout` (weights in the sampling layout, the forward over it), `programs` (the
compiled prefill / insert / chunk / static programs), `contract` (what host and device
exchange), `device` (weights, buffers, programs of one model), `scheduler` (the host side of
continuous batching), `static` (the reference path), `sampler` (the front door).
"""
from tpt_jax.engine.contract import Stats
from tpt_jax.engine.sampler import Generation, Sampler
from tpt_jax.engine.sampling import SamplingConfig

__all__ = ["Generation", "Sampler", "SamplingConfig", "Stats"]
