"""The project's error types: what the CLI prints on one line, never as a traceback."""
from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import sys
from typing import Any, Iterator, Optional


class TptError(Exception):
    """An expected, user-facing error: the CLI prints its message on one line and exits 2."""


class ConfigError(TptError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


# How Orbax/TensorStore report a full disk: `ValueError: RESOURCE_EXHAUSTED: Error writing ...
# at local file "DIR": ... No space left on device [os_error_code='28']` (RESOURCE_EXHAUSTED
# alone is also XLA's out-of-memory).
_FULL_TEXT = ("No space left on device", "os_error_code='28'")
_QUOTED_PATH = re.compile(r'(?:local file|Failed writing:) "([^"]+)"')


def disk_full(e: BaseException, where: str = "") -> Optional[TptError]:
    """A one-line TptError for a full disk (ENOSPC, or Orbax's RESOURCE_EXHAUSTED) anywhere in
    `e`'s cause chain, naming the directory written to (else `where`); None for other errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            target = os.path.dirname(str(e.filename)) if e.filename else where
            return _full(target)
        text = str(e)
        if any(t in text for t in _FULL_TEXT):
            found = _QUOTED_PATH.search(text)
            return _full(_visible_dir(found.group(1)) if found else where)
        e = e.__cause__ or e.__context__
    return None


def _visible_dir(p: str) -> str:
    """The directory a user knows: Orbax's temporary `N.orbax-checkpoint-tmp/...` folders cut
    off, so `.../r00/train/checkpoints` rather than the half-written step inside it."""
    parts = p.rstrip("/").split("/")
    cut = next((i for i, part in enumerate(parts) if ".orbax-checkpoint-tmp" in part), None)
    return "/".join(parts[:cut]) if cut is not None else os.path.dirname(p.rstrip("/"))


def _full(directory: str) -> TptError:
    return TptError(f"disk full: no space left on the device of {directory or 'the output'}; "
                    f"free space and run the same command again (finished work is kept)")


@contextlib.contextmanager
def disk_full_as_error(where: str = "") -> Iterator[None]:
    """Turn a full disk inside the block into its one-line TptError. Writes abandoned by the
    error (Orbax's background coroutines) are collected now: left to the interpreter's exit,
    they fail with `ImportError: sys.meta_path is None` tracebacks."""
    try:
        yield
    except TptError:
        raise
    except Exception as e:
        full = disk_full(e, where)
        if full is None:
            raise
        del e
        gc.collect()
        raise full from None


def quiet_disk_full() -> None:
    """Keep a full disk to the CLI's one line: Orbax logs its own tracebacks of it, and the
    writes a failed save abandoned end later on a closed event loop (or at the interpreter's
    exit), where Python prints what they raise as 'Exception ignored' tracebacks."""
    logging.getLogger("absl").addFilter(_not_disk_full)
    sys.unraisablehook = _unraisable


def _not_disk_full(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (any(t in record.getMessage() for t in _FULL_TEXT)
                or (error is not None and disk_full(error) is not None))


def _unraisable(u: Any) -> None:
    if not any(t in str(u.exc_value) for t in _ABANDONED):
        sys.__unraisablehook__(u)


_ABANDONED = ("Event loop is closed", "Python is likely shutting down")
