"""Hugging Face Hub ids where a checkpoint or tokenizer directory is accepted.

`resolve("google/gemma-2-2b-it", "checkpoint")` (or a Llama 3.x / Qwen2 id) downloads (or finds
in the cache) only the files that kind needs and returns the local snapshot directory;
`ORG/NAME@REVISION` pins a branch, tag or commit. `HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE=1` (cache only) and `HF_TOKEN` are read
when called, not at import, so a test or a shell can change them. A local directory of the same
name wins over an id, and gs:// paths pass through unchanged.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

from tpt_jax.config import TptError
from tpt_jax.gemma.config import FAMILIES

# Files fetched per kind (safetensors only: tpt never reads .bin or .gguf weights).
PATTERNS = {
    "checkpoint": ["config.json", "generation_config.json", "model.safetensors",
                   "model-*.safetensors", "model.safetensors.index.json"],
    "tokenizer": ["tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                  "special_tokens_map.json", "added_tokens.json", "config.json"],
}
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_](@[\w./-]+)?$")
_RESOLVED: dict = {}  # (id, kind, cache dir, offline) -> local dir: one Hub call per process


def is_hub_id(text: Optional[str]) -> bool:
    """`ORG/NAME` or `ORG/NAME@REV` that is not an existing local path (a local dir wins)."""
    if not text or str(text).startswith(("gs://", "s3://", ".", "/", "~")):
        return False
    return bool(_ID.match(str(text))) and not os.path.exists(str(text))


def cache_dir() -> str:
    """The hub cache as huggingface_hub would pick it, from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(path_or_id: Optional[str], what: str = "checkpoint") -> Optional[str]:
    """A local directory for `path_or_id`: unchanged unless it is a Hub id, else the snapshot
    with the files `what` ("checkpoint" or "tokenizer") needs. Errors are one line naming the id."""
    if not is_hub_id(path_or_id):
        return path_or_id
    key = (path_or_id, what, cache_dir(), offline())
    if key not in _RESOLVED:
        local = _download(path_or_id, what)
        if what == "checkpoint":
            check_supported(path_or_id, local)
        _RESOLVED[key] = local
    return _RESOLVED[key]


def _download(hub_id: str, what: str) -> str:
    from huggingface_hub import errors, snapshot_download
    repo, _, revision = hub_id.partition("@")
    rev = revision or "main"
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=PATTERNS[what],
                                 cache_dir=cache_dir(), local_files_only=offline(),
                                 token=os.environ.get("HF_TOKEN") or None)
    except errors.GatedRepoError:
        raise TptError(f"{what} {hub_id}: gated model; accept its license on the model's Hub page "
                       f"and set HF_TOKEN to a token of that account") from None
    except errors.RepositoryNotFoundError:
        raise TptError(f"{what} {hub_id}: no such model on the Hugging Face Hub (or a private "
                       f"one: set HF_TOKEN), and no local directory of that name") from None
    except errors.RevisionNotFoundError:
        raise TptError(f"{what} {hub_id}: the Hub repository has no revision {rev!r}") from None
    except errors.IncompleteSnapshotError:
        raise TptError(f"{what} {hub_id}: the cached snapshot in {cache_dir()} is incomplete; "
                       f"download it again with network access") from None
    except errors.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1 allows the cache only" if offline()
               else "the Hub could not be reached")
        raise TptError(f"{what} {hub_id}: no such local path, and revision {rev!r} of that Hub "
                       f"id is not in the Hugging Face cache ({cache_dir()}): {why}; download "
                       f"it once online (or set HF_HOME to the cache that has it)") from None
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TptError(f"{what} {hub_id}: download failed ({first})") from None


def check_supported(hub_id: str, local: str) -> None:
    """A Hub checkpoint must be of a supported family; say so with the id, not the snapshot
    path."""
    where = os.path.join(local, "config.json")
    if not os.path.exists(where):
        raise TptError(f"checkpoint {hub_id}: the repository has no config.json")
    if not any(f.endswith(".safetensors") for f in os.listdir(local)):
        where = "the cached snapshot" if offline() else "the repository"
        raise TptError(f"checkpoint {hub_id}: {where} has no safetensors weights ({local})")
    try:
        with open(where, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError):
        raise TptError(f"checkpoint {hub_id}: config.json is not a JSON object") from None
    if model_type not in FAMILIES:
        raise TptError(f"checkpoint {hub_id}: model_type is {model_type!r}; not a supported "
                       f"model ({', '.join(FAMILIES)})")
