"""SFT data: tokenised examples, a deterministic epoch plan, and fixed-shape batches.

An example is `bos + prompt ids + completion ids + eos` (the prompt text already carries the
template); the loss covers the completion and the EOS, so the model learns to stop. Sequences
longer than `max_length` are cut at the end and counted.

A batch holds, per row, the model inputs (`tokens`, `positions`, `segments`) and the training
targets (`targets[t]` = the token after t, `weights[t]` = 1 where that token is trained on).
With `loss_bucket` > 0 the targets are compacted: `loss_pos[r, j]` is the position of row r's
j-th trained target, and `targets`/`weights` are [rows, K] with K the largest count rounded up
to the bucket, so the vocabulary projection skips prompt and padding positions.
Without packing each row is one example; with packing, consecutive examples share a row, each
its own attention segment with positions restarting at 0. Padding has position -1, segment 0
and weight 0. The loss is the weight-averaged cross-entropy over the whole batch, so a packed
batch and the same examples unpacked give the same loss.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Sequence

import numpy as np

from tpt_jax import io
from tpt_jax.config import TptError

log = logging.getLogger(__name__)
EXAMPLE_FIELDS = ("prompt", "completion")


@dataclasses.dataclass
class Encoded:
    tokens: np.ndarray  # int32 [n]
    trained: np.ndarray  # bool [n]: token i is a training target (completion or EOS)


@dataclasses.dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # cut at max_length (their EOS is lost)
    no_target: int = 0  # prompt alone fills max_length: nothing to train on, left out
    tokens: int = 0
    target_tokens: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def read_examples(p: str) -> list[dict]:
    """Training records (string `prompt` and `completion`) from JSONL; other rows are counted
    skips, and a file with none (a question/answer dataset, say) is one line naming it."""
    skips = io.Skips()
    records = []
    for lineno, r in io.read_jsonl(p, skips, required=EXAMPLE_FIELDS):
        if all(isinstance(r[k], str) for k in EXAMPLE_FIELDS):
            records.append(r)
        else:
            skips.add("prompt/completion not text", f"{p}:{lineno}")
    if skips.total():
        log.warning("%s: skipped %d records: %s", p, skips.total(), skips.summary())
    if not records:
        lacking = sum(n for reason, n in skips.counts().items() if reason.startswith("missing"))
        detail = f"{lacking} of {skips.total()} rows lack them" if lacking else (
            skips.summary() if skips.total() else "the file has no rows")
        raise TptError(f"{p}: no training examples: expected JSONL rows with string fields "
                       f"'prompt' and 'completion' (as tpt prune writes), {detail}")
    return records


def encode_example(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[Encoded, bool]:
    p = list(tokenizer.encode(prompt, add_bos=True))
    c = list(tokenizer.encode(completion)) + [tokenizer.eos_id]
    ids = np.asarray(p + c, np.int32)
    trained = np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)])
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], trained[:max_length]), truncated


def encode_examples(tokenizer, records: Sequence[dict], max_length: int
                    ) -> tuple[list[Encoded], EncodeStats]:
    """Tokenise training records (`prompt`, `completion`); examples with no trained token
    left after truncation are dropped and counted."""
    out, stats = [], EncodeStats()
    for i, rec in enumerate(records):
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
            raise TptError(f"training example {i} (id {rec.get('id')!r}) needs string fields "
                           f"'prompt' and 'completion'")
        enc, truncated = encode_example(tokenizer, rec["prompt"], rec["completion"], max_length)
        stats.truncated += int(truncated)
        if not enc.trained[1:].any():
            stats.no_target += 1
            continue
        out.append(enc)
        stats.examples += 1
        stats.tokens += len(enc.tokens)
        stats.target_tokens += int(enc.trained[1:].sum())
    return out, stats


def data_digest(examples: Sequence[Encoded]) -> str:
    """Hash of the tokenised data: a resume on different data is refused."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.tokens.tobytes())
        h.update(np.packbits(e.trained).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- plan


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def rows_for(order: Sequence[int], lengths: Sequence[int], pack: bool, max_length: int) -> list[list[int]]:
    """Rows of example indices: one each, or consecutive examples packed (next-fit)."""
    if not pack:
        return [[int(i)] for i in order]
    rows, row, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if row and used + n > max_length:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def make_plan(orders: Sequence[Sequence[int]], lengths: Sequence[int], batch_size: int, pack: bool,
              max_length: int, epochs: float) -> list[list[list[int]]]:
    """Batches (lists of rows) for `epochs` epochs, given one order per (started) epoch. Each
    epoch's last batch may be short; it is padded with empty rows when built."""
    plan = []
    for e, order in enumerate(orders):
        rows = rows_for(order, lengths, pack, max_length)
        batches = [rows[j:j + batch_size] for j in range(0, len(rows), batch_size)]
        frac = epochs - e
        if frac < 1:
            batches = batches[:math.ceil(frac * len(batches))]
        plan.extend(batches)
    return plan


def num_epoch_orders(epochs: float) -> int:
    return max(1, math.ceil(epochs))


# ----------------------------------------------------------------------------- batches

BATCH_KEYS = ("tokens", "positions", "segments", "targets", "weights", "loss_pos")


def row_length(batch: Sequence[Sequence[int]], lengths: Sequence[int], pack: bool,
               max_length: int, bucket: int) -> int:
    """Padded row length: packed rows use max_length; otherwise the longest row rounded up to
    a multiple of `bucket` (a few compiled shapes, not one per batch)."""
    if pack:
        return max_length
    longest = max((sum(int(lengths[i]) for i in row) for row in batch), default=1)
    return min(max_length, max(1, math.ceil(longest / bucket)) * bucket)


def build_batch(batch: Sequence[Sequence[int]], examples: Sequence[Encoded], rows: int, length: int,
                pad_id: int = 0, loss_bucket: int = 0) -> dict:
    """Numpy arrays [rows, length] for `batch` (a list of rows of example indices); rows past
    len(batch) are padding (weight 0). `loss_bucket` > 0 compacts the targets (see above)."""
    tokens = np.full((rows, length), pad_id, np.int32)
    positions = np.full((rows, length), -1, np.int32)
    segments = np.zeros((rows, length), np.int32)
    targets = np.zeros((rows, length), np.int32)
    weights = np.zeros((rows, length), np.float32)
    for r, row in enumerate(batch):
        at = 0
        for s, i in enumerate(row):
            e = examples[i]
            n = len(e.tokens)
            if at + n > length:
                raise ValueError(f"row {r} overflows length {length}")
            tokens[r, at:at + n] = e.tokens
            positions[r, at:at + n] = np.arange(n)
            segments[r, at:at + n] = s + 1
            targets[r, at:at + n - 1] = e.tokens[1:]
            weights[r, at:at + n - 1] = e.trained[1:]
            at += n
    out = {"tokens": tokens, "positions": positions, "segments": segments}
    out.update(compact_targets(targets, weights, loss_bucket))
    return out


def compact_targets(targets: np.ndarray, weights: np.ndarray, bucket: int) -> dict:
    """{targets, weights, loss_pos}: [rows, K] trained targets and their positions (K = the
    largest per-row count rounded up to `bucket`); bucket 0: all positions, K = length."""
    rows, length = targets.shape
    if bucket <= 0:
        pos = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
        return {"targets": targets, "weights": weights, "loss_pos": pos}
    counts = (weights > 0).sum(axis=1)
    k = min(length, max(1, math.ceil(int(counts.max(initial=0)) / bucket)) * bucket)
    pos = np.zeros((rows, k), np.int32)
    out_t = np.zeros((rows, k), np.int32)
    out_w = np.zeros((rows, k), np.float32)
    for r in range(rows):
        idx = np.flatnonzero(weights[r] > 0)
        pos[r, :len(idx)] = idx
        out_t[r, :len(idx)] = targets[r, idx]
        out_w[r, :len(idx)] = weights[r, idx]
    return {"targets": out_t, "weights": out_w, "loss_pos": pos}


def eval_plan(n: int, batch_size: int) -> list[list[list[int]]]:
    rows = [[i] for i in range(n)]
    return [rows[j:j + batch_size] for j in range(0, n, batch_size)]


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) records (at least 1 when fraction > 0), chosen by seed."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    k = min(len(records) - 1, max(1, round(fraction * len(records))))
    perm = np.random.default_rng([seed, 1 << 20]).permutation(len(records))
    held = set(perm[:k].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals


def lengths_of(examples: Sequence[Encoded]) -> np.ndarray:
    return np.asarray([len(e.tokens) for e in examples], np.int64)
