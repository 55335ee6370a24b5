"""Static batches, the reference path: each batch runs from one prefill to the end of its
longest row (`programs.generate`), `group` samples of a prompt sharing the prefill. It draws
the same tokens as continuous batching (same keys, cache layout and length) and is what the
tests and `tpt bench sample --static` compare against.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from tpt_jax.engine import programs as PR
from tpt_jax.engine.contract import Finished, Prompt, Request, Stats
from tpt_jax.engine.device import Device, left_pad


def batches(prompts: Sequence[Prompt], n: int, group: int, per_batch: int) -> list[list]:
    """Work items (prompt, first sample, count) grouped by bucket into batches of
    `per_batch` prompts."""
    items = sorted(((prompts[i].bucket, i, first, min(group, n - first))
                    for i in range(len(prompts)) for first in range(0, n, group)),
                   key=lambda w: w[0])  # stable
    out = []
    for bucket in sorted({w[0] for w in items}):
        its = [w[1:] for w in items if w[0] == bucket]
        out += [its[j:j + per_batch] for j in range(0, len(its), per_batch)]
    return out


def run_static(device: Device, prompts: Sequence[Prompt], n: int, prog: PR.Program, seed: int,
               stats: Stats) -> Iterator[list[Finished]]:
    """Every sample of every prompt, a list of finished samples per batch; the next batch is
    dispatched before the previous one is read."""
    g = prog.group
    per_batch = device.slots // g
    pending = None
    for batch in batches(prompts, n, g, per_batch) + [None]:
        launched = None
        if batch is not None:
            launched = (batch, launch(device, batch, prompts, per_batch, prog, seed))
        if pending is not None:
            yield collect(device, *pending, g, stats)
        pending = launched


def launch(device: Device, batch: list, prompts: Sequence[Prompt], per_batch: int,
           prog: PR.Program, seed: int):
    """Dispatch one batch: (prompt, first sample, count) per prompt; rows past the last item
    are padding (limit 0)."""
    g, bucket = prog.group, prompts[batch[0][0]].bucket
    tokens, positions = left_pad([prompts[i].tokens for i, _, _ in batch], per_batch, bucket,
                                 device.pad_id)
    hashes, samples, limits = (np.zeros(per_batch * g, np.int32) for _ in range(3))
    for p, (i, first, count) in enumerate(batch):
        hashes[p * g:(p + 1) * g] = prompts[i].id_hash
        samples[p * g:(p + 1) * g] = prompts[i].first_sample + first + np.arange(g)
        limits[p * g:p * g + count] = prompts[i].limit
    return device.generate(tokens, positions, hashes, samples, limits, prog, seed)


def collect(device: Device, batch: list, handle, g: int, stats: Stats) -> list[Finished]:
    tokens, drawn, stopped, logits, steps = device.read_static(handle)
    stats.decode_steps += steps
    out = []
    for p, (i, first, count) in enumerate(batch):
        for j in range(count):
            r, num = p * g + j, int(drawn[p * g + j])
            out.append(Finished(Request(i, first + j), tokens[r, :num], bool(stopped[r]),
                                None if logits is None else logits[r, :num]))
            stats.drew(i, num)
    return out
