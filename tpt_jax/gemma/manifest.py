"""File-size manifests for Orbax directories, written once a save is complete.

A kill, a full disk or a careless copy can leave a checkpoint whose files are cut short. Orbax
reports that from inside its asynchronous reader as a storm of asyncio tracebacks; comparing
sizes with the manifest first turns it into one line naming the file.
"""
from __future__ import annotations

from typing import Any

from tpt_jax import io
from tpt_jax.errors import TptError


def file_sizes(root: Any, prefix: str = "") -> dict[str, int]:
    """Sizes of all files under root, by relative path (a walk by hand: epath has no `**` glob
    for gs:// paths)."""
    sizes: dict[str, int] = {}
    for p in io.path(root).iterdir():
        if p.is_dir():
            sizes.update(file_sizes(p, f"{prefix}{p.name}/"))
        else:
            sizes[prefix + p.name] = p.stat().length
    return sizes


def write(root: Any, manifest: Any) -> None:
    """Record the sizes of everything under `root` in the JSON file `manifest`."""
    io.write_json_atomic(manifest, file_sizes(root))


def check(root: Any, manifest: Any, label: str) -> None:
    """A one-line TptError for a file under `root` that is missing or differs in size from
    `manifest`; nothing to check when there is no manifest (an older or foreign checkpoint)."""
    if not io.path(manifest).exists():
        return
    want = io.read_json(manifest)
    if not isinstance(want, dict) or not all(isinstance(v, int) for v in want.values()):
        raise TptError(f"{manifest}: not a file-size manifest")
    got = file_sizes(root)
    for name, size in sorted(want.items()):
        if name not in got:
            raise TptError(f"{label}/{name} is missing")
        if got[name] != size:
            raise TptError(f"{label}/{name} has {got[name]} bytes, expected {size}")
