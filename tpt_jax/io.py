"""Files: local and gs:// paths alike, atomic writes, JSONL with counted, reported skips.

Every artifact is written atomically (temporary name, then rename) so a killed run never
leaves a half-written file that a resume would trust.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any, Iterable, Iterator, Optional

from etils import epath

from tpt_jax.config import TptError


def path(p: str | os.PathLike) -> epath.Path:
    """A path object that works for local paths and gs:// URLs."""
    return epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
    return str(p).startswith(("gs://", "s3://"))


def write_text_atomic(p: str | os.PathLike, text: str) -> None:
    """Write to a temporary sibling, then rename (rename is atomic on local filesystems)."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_remote(target):
        tmp.write_text(text)
        tmp.rename(target)  # GCS: copy + delete; readers never see a partial object
        return
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def write_json_atomic(p: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(p, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_jsonl_atomic(p: str | os.PathLike, records: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False, default=_jsonable) for r in records]
    write_text_atomic(p, "".join(line + "\n" for line in lines))
    return len(lines)


def _jsonable(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(p: str | os.PathLike) -> Any:
    q = path(p)
    try:
        return json.loads(q.read_text())
    except FileNotFoundError:
        raise TptError(f"{p}: file not found") from None
    except json.JSONDecodeError as e:
        raise TptError(f"{p}: invalid JSON at line {e.lineno} ({e.msg})") from None


@dataclasses.dataclass
class Skips:
    """Counted, reported skips: reason -> list of 'file:line' locations."""

    by_reason: dict = dataclasses.field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.by_reason.setdefault(reason, []).append(where)

    def counts(self) -> dict:
        return {r: len(w) for r, w in sorted(self.by_reason.items())}

    def total(self) -> int:
        return sum(len(w) for w in self.by_reason.values())

    def summary(self, limit: int = 5) -> str:
        """One line per reason with the first few locations, for logs and stats files."""
        parts = []
        for reason, where in sorted(self.by_reason.items()):
            shown = ", ".join(where[:limit]) + (" ..." if len(where) > limit else "")
            parts.append(f"{len(where)} {reason} ({shown})")
        return "; ".join(parts)

    def to_json(self, limit: int = 20) -> dict:
        return {r: {"count": len(w), "where": w[:limit]} for r, w in sorted(self.by_reason.items())}


def read_jsonl(p: str | os.PathLike, skips: Optional[Skips] = None,
               required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record). Malformed lines and records missing `required` fields are
    counted in `skips` with their line numbers (or raise a one-line TptError if no `skips`)."""
    q = path(p)
    if not q.exists():
        raise TptError(f"{p}: file not found")
    with q.open("r") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if skips is None:
                    raise TptError(f"{where}: malformed JSON ({e.msg})") from None
                skips.add("malformed JSON", where)
                continue
            if not isinstance(rec, dict):
                if skips is None:
                    raise TptError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                skips.add("not a JSON object", where)
                continue
            missing = [k for k in required if k not in rec]
            if missing:
                if skips is None:
                    raise TptError(f"{where}: missing field {missing[0]!r}")
                skips.add(f"missing field {missing[0]!r}", where)
                continue
            yield lineno, rec
