"""Device mesh and logical-axis rules: one model definition, two layouts.

Parameters and activations are annotated with logical axis names (`vocab`, `embed`,
`q_heads`, ...). A rules table maps each name to mesh axes. Training uses FSDP + tensor
parallelism; sampling keeps weights tensor-parallel and replicated over the batch axes, so
the decode loop never all-gathers weights. Switching layouts is one `jax.device_put`.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tpt_jax.config import ConfigError, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

# Parameters shard over fsdp (the embed dim) and tensor (heads, mlp, vocab).
TRAIN_RULES: Rules = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_batch", BATCH),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", BATCH),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)

# Sampling: weights tensor-parallel only (no per-step all-gather), rows data-parallel.
SAMPLE_RULES: Rules = tuple((name, None) if name == "embed" else (name, axes)
                            for name, axes in TRAIN_RULES)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Mesh (data, fsdp, tensor) from config; one axis may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh {sizes}: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                          f"{math.prod(sizes)} devices, but {len(devices)} are available")
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # non-TPU topologies: plain reshape is fine
        dev_array = np.asarray(devices).reshape(sizes)
    return Mesh(dev_array, MESH_AXES)


def mesh_axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: Sequence[Optional[str]], rules: Rules, mesh: Mesh,
                    shape: Optional[Sequence[int]] = None) -> P:
    """PartitionSpec for one array. A mesh axis is used at most once per array; a dimension
    that does not divide evenly by its mesh axes stays replicated (logged once at debug)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        if isinstance(axes, str):
            axes = (axes,)
        if axes:
            axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and shape is not None and shape[i] % mesh_axis_size(mesh, axes):
            log.debug("dim %d (%s, size %d) not divisible by %s: replicated", i, name, shape[i], axes)
            axes = ()
        if axes:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def tree_shardings(logical_tree: Any, rules: Rules, mesh: Mesh, shapes: Any = None) -> Any:
    """Map a tree of logical-axis tuples (leaves: tuples of names) to NamedShardings."""
    is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    if shapes is None:
        return jax.tree.map(lambda lg: NamedSharding(mesh, logical_to_spec(lg, rules, mesh)),
                            logical_tree, is_leaf=is_leaf)
    return jax.tree.map(lambda lg, s: NamedSharding(mesh, logical_to_spec(lg, rules, mesh, s.shape)),
                        logical_tree, shapes, is_leaf=is_leaf)


# Activation constraints read the active (mesh, rules) from a context variable, set by
# `use_rules` around tracing. Outside it (plain single-device calls) they are no-ops.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("tpt_sharding", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules]:
    """The (mesh, rules) `use_rules` set for the tracing under way."""
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError("no sharding rules are active (trace under use_rules)")
    return active


def constrain(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the active rules (all platforms)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def parse_mesh(text: str) -> MeshConfig:
    """`--mesh data,fsdp,tensor` of the commands that take one."""
    try:
        d, f, t = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--mesh must be three integers data,fsdp,tensor, got {text!r}") from None
    return MeshConfig(data=d, fsdp=f, tensor=t)
