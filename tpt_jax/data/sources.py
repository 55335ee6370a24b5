"""Dataset records from every source, in one shape: {"id", "question", "answer"}.

Sources: `synthetic` (built in, no download), `gsm8k` (HF hub `openai/gsm8k`/`main`, or local
JSONL via train_path/test_path), `math` (`problem`/`solution` fields, hub or JSONL), `jsonl` (any
file; field names from the config) and `tfds` (tensorflow_datasets by name).

Ids are stable: `<source>-<split>-<row:05d>` with the row index in the source (the 0-based line
number for files, so hub and file copies of GSM8K give the same ids), or the record's own `id`.
Unusable rows are never dropped silently: they are counted per reason with their locations,
logged, and handed back through `skips`; a source with no usable rows is a one-line TptError.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Optional

from tpt_jax import io as tio
from tpt_jax.config import DataConfig, TptError
from tpt_jax.data import synthetic

log = logging.getLogger(__name__)

GSM8K_HUB = ("openai/gsm8k", "main")
LOCAL_GSM8K_HINT = "data.train_path/data.test_path (e.g. ../shared/data/gsm8k/train.jsonl)"


def _text(value: Any) -> Optional[str]:
    """Strings as they are; numbers as their text (a JSONL answer may be 18); else None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars (tfds)
        return _text(value.item())
    return None


def _fields(cfg: DataConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Field names to look for, in order. MATH-style data names them problem/solution."""
    q, a = (cfg.question_field,), (cfg.answer_field,)
    if cfg.source == "math":
        q, a = q + ("problem",), a + ("solution",)
    return q, a


def _records(rows: Iterable[tuple[int, str, dict]], cfg: DataConfig, prefix: str,
             skips: tio.Skips) -> Iterator[dict]:
    """(row index, location, raw row) -> clean records; bad rows go to `skips`."""
    q_names, a_names = _fields(cfg)
    seen: set[str] = set()
    for row, where, raw in rows:
        q_key = next((k for k in q_names if k in raw), None)
        a_key = next((k for k in a_names if k in raw), None)
        if q_key is None:
            skips.add(f"missing field {q_names[0]!r}", where)
            continue
        if a_key is None:
            skips.add(f"missing field {a_names[0]!r}", where)
            continue
        question, answer = _text(raw[q_key]), _text(raw[a_key])
        if question is None or answer is None:
            skips.add("question/answer not text", where)
            continue
        if not question.strip():
            skips.add("empty question", where)
            continue
        if not answer.strip():
            skips.add("empty answer", where)
            continue
        rid = _text(raw.get("id")) if "id" in raw and cfg.source != "gsm8k" else None
        rid = rid.strip() if rid and rid.strip() else f"{prefix}-{row:05d}"
        if rid in seen:
            skips.add("duplicate id", where)
            continue
        seen.add(rid)
        yield {"id": rid, "question": question, "answer": answer}


def _jsonl_rows(path: str, skips: tio.Skips) -> Iterator[tuple[int, str, dict]]:
    for lineno, rec in tio.read_jsonl(path, skips=skips):
        yield lineno - 1, f"{path}:{lineno}", rec


def _hub_rows(name: str, config: Optional[str], split: str) -> Iterator[tuple[int, str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth, unknown split: all mean "not loadable here"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TptError(f"cannot load {name}{'/' + config if config else ''} split {split!r} "
                       f"from the Hugging Face hub ({first}); for offline use set "
                       f"{LOCAL_GSM8K_HINT}") from None
    for i, row in enumerate(ds):
        yield i, f"{name}[{split}] row {i}", dict(row)


def _tfds_rows(name: str, split: str) -> Iterator[tuple[int, str, dict]]:
    import tensorflow_datasets as tfds

    try:
        ds = tfds.as_numpy(tfds.load(name, split=split))
    except Exception as e:  # missing TF, unknown dataset, not prepared offline
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TptError(f"cannot load tfds dataset {name!r} split {split!r} ({first})") from None
    for i, row in enumerate(ds):
        yield i, f"tfds {name}[{split}] row {i}", dict(row)


def _path_for(cfg: DataConfig, split: str) -> Optional[str]:
    return {"train": cfg.train_path, "test": cfg.test_path}.get(split)


def _limit(cfg: DataConfig, split: str) -> Optional[int]:
    return {"train": cfg.train_limit, "test": cfg.test_limit}.get(split)


def _take(records: Iterator[dict], n: Optional[int]) -> list[dict]:
    out = []
    for r in records:
        if n is not None and len(out) >= n:
            break
        out.append(r)
    return out


def load_split(cfg: DataConfig, split: str, skips: Optional[tio.Skips] = None) -> list[dict]:
    """Records of one split ("train" | "test"; hub/tfds sources accept any split name).

    The first `train_limit`/`test_limit` usable rows, in source order. Skipped rows are logged
    and added to `skips` when one is given (the round loop stores them with its stats)."""
    skips = skips if skips is not None else tio.Skips()
    before = skips.total()
    n = _limit(cfg, split)
    if cfg.source == "synthetic":
        if split not in ("train", "test"):
            raise TptError(f"data.source synthetic has splits train and test, not {split!r}")
        size = cfg.synthetic_train if split == "train" else cfg.synthetic_test
        recs = synthetic.synthetic_split(split, min(size, n) if n else size, cfg.seed)
        return [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in recs]

    path = _path_for(cfg, split)
    prefix = f"{cfg.source}-{split}"
    if path:
        rows, where = _jsonl_rows(path, skips), path
    elif cfg.source in ("gsm8k", "math"):
        if cfg.source == "gsm8k":
            name, config = cfg.hf_name or GSM8K_HUB[0], cfg.hf_config or GSM8K_HUB[1]
        elif cfg.hf_name:
            name, config = cfg.hf_name, cfg.hf_config
        else:
            raise TptError(f"data.source math needs data.hf_name or data.{split}_path")
        rows, where = _hub_rows(name, config, split), f"{name}[{split}]"
    elif cfg.source == "tfds":
        if not cfg.tfds_name:
            raise TptError("data.source tfds needs data.tfds_name")
        rows, where = _tfds_rows(cfg.tfds_name, split), f"tfds {cfg.tfds_name}[{split}]"
    elif cfg.source == "jsonl":
        raise TptError(f"data.source jsonl has no file for split {split!r}: set "
                       f"data.{split}_path")
    else:
        raise TptError(f"unknown data.source {cfg.source!r}")

    records = _take(_records(rows, cfg, prefix, skips), n)
    if skips.total() > before:
        log.warning("%s: skipped %d unusable rows: %s", where, skips.total() - before,
                    skips.summary())
    if not records:
        detail = f": {skips.summary()}" if skips.total() > before else ": no rows"
        raise TptError(f"{where}: no usable records{detail}")
    return records


def load_seed(cfg: DataConfig, skips: Optional[tio.Skips] = None) -> list[dict]:
    """Worked solutions for the round-0 fine-tune: `seed_path` JSONL if set, else the synthetic
    task's own seed set, else none (a real checkpoint starts from its own ability)."""
    if cfg.seed_path:
        skips = skips if skips is not None else tio.Skips()
        seed_cfg = DataConfig(source="jsonl", question_field=cfg.question_field,
                              answer_field=cfg.answer_field)
        before = skips.total()
        recs = list(_records(_jsonl_rows(cfg.seed_path, skips), seed_cfg, "seed", skips))
        if skips.total() > before:
            log.warning("%s: skipped %d unusable rows: %s", cfg.seed_path,
                        skips.total() - before, skips.summary())
        if not recs:
            raise TptError(f"{cfg.seed_path}: no usable seed records")
        return recs
    if cfg.source == "synthetic":
        return [{"id": r["id"], "question": r["question"], "answer": r["answer"]}
                for r in synthetic.seed_solutions(cfg.seed_size, cfg.seed)]
    return []


def seed_examples(cfg: DataConfig, template: str, shots: Optional[list] = None,
                  chat=None) -> list[dict]:
    """Seed solutions as training examples (the record format Prune writes and Train reads);
    `chat`: the trained model's turn markers (`prompts.chat_of(tokenizer)`), Gemma's if None."""
    from tpt_jax import prompts

    chat = chat or prompts.GEMMA_CHAT
    return [{"id": r["id"], "sample": 0, "source": "seed",
             "prompt": prompts.format_prompt(template, r["question"], shots, chat),
             "completion": prompts.format_completion(template, r["answer"])}
            for r in load_seed(cfg)]
