"""Files: local and gs:// paths alike, atomic writes, JSONL with counted, reported skips.

Every artifact is written atomically (temporary name, then rename) so a killed run never
leaves a half-written file that a resume would trust.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any, BinaryIO, Iterable, Iterator, Optional

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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
        raise
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


def open_bytes(p: str | os.PathLike) -> BinaryIO:
    """A file opened for reading bytes; a missing or unreadable one is a one-line TptError."""
    try:
        return path(p).open("rb")
    except FileNotFoundError:
        raise TptError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise TptError(f"{p}: is a directory, not a file") from None
    except PermissionError:
        raise TptError(f"{p}: permission denied") from None
    except OSError as e:
        raise TptError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None


def read_bytes(p: str | os.PathLike) -> bytes:
    with open_bytes(p) as f:
        return f.read()


def decode(data: bytes, where: str) -> str:
    """UTF-8 text (a leading BOM is dropped); other bytes are a TptError naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = 1 + data.count(b"\n", 0, e.start)
        raise TptError(f"{where}: not UTF-8 text at line {line} (byte 0x{data[e.start]:02x})"
                       ) from None


def read_text(p: str | os.PathLike) -> str:
    """The whole file as UTF-8 text; every reader of user files goes through here."""
    return decode(read_bytes(p), str(p))


def parse_json(text: str, where: str) -> Any:
    """json.loads with every failure (syntax, a 5000-digit integer, deep nesting) one line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TptError(f"{where}: invalid JSON at line {e.lineno} ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise TptError(f"{where}: invalid JSON ({str(e).splitlines()[0][:100]})") from None


def read_json(p: str | os.PathLike, kind: Optional[type] = dict) -> Any:
    """A JSON file whose top level is a `kind` (None: anything)."""
    obj = parse_json(read_text(p), str(p))
    if kind is not None and not isinstance(obj, kind):
        raise TptError(f"{p}: expected a JSON {_JSON_NAMES.get(kind, kind.__name__)}, got "
                       f"{_JSON_NAMES.get(type(obj), type(obj).__name__)}")
    return obj


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "true/false", type(None): "null"}


def check_writable_dir(p: str | os.PathLike, what: str) -> None:
    """Refuse, before anything is written, an output directory that is a file, lies under a
    file, or cannot be created or written; writes nothing (gs:// paths are not checked)."""
    if is_remote(p):
        return
    if os.path.exists(p) and not os.path.isdir(p):
        raise TptError(f"{what} {p} is a file, not a directory")
    _check_creatable(os.path.abspath(p), p, what)


def check_writable_file(p: str | os.PathLike, what: str) -> None:
    """An output file: not a directory, and its directory can be made and written."""
    if is_remote(p):
        return
    if os.path.isdir(p):
        raise TptError(f"{what} {p} is a directory, not a file")
    _check_creatable(os.path.dirname(os.path.abspath(p)), p, what)


def _check_creatable(directory: str, p: str | os.PathLike, what: str) -> None:
    """`directory` exists and is writable, or its nearest existing ancestor is."""
    base = directory
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise TptError(f"{what} {p}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TptError(f"{what} {p}: directory {base} is not writable")


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
    """Yield (line_number, record), reading line by line (sample files can be large). Lines
    that are not UTF-8 or not JSON objects, and records missing `required` fields, are counted
    in `skips` with their line numbers (or raise a one-line TptError if no `skips`)."""
    with open_bytes(p) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{p}:{lineno}"
            rec, reason, detail = _json_line(raw, where)
            if not reason and not isinstance(rec, dict):
                reason = "not a JSON object"
                detail = f"expected a JSON object, got {type(rec).__name__}"
            if not reason:
                missing = [k for k in required if k not in rec]
                if missing:
                    reason = detail = f"missing field {missing[0]!r}"
            if not reason:
                yield lineno, rec
            elif skips is None:
                raise TptError(f"{where}: {detail}")
            else:
                skips.add(reason, where)


def _json_line(raw: bytes, where: str) -> tuple[Any, str, str]:
    """(value, "", "") or (None, skip reason, error detail) for one JSONL line."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, "not UTF-8", f"not UTF-8 text (byte 0x{raw[e.start]:02x})"
    try:
        return json.loads(text), "", ""
    except json.JSONDecodeError as e:
        return None, "malformed JSON", f"malformed JSON ({e.msg})"
    except (ValueError, RecursionError) as e:  # a 5000-digit integer, deep nesting
        return None, "malformed JSON", f"malformed JSON ({str(e).splitlines()[0][:100]})"
