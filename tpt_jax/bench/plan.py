"""`tpt plan`: per-device memory of a config's train step and sample step, before any TPU.

    tpt plan configs/gemma2_9b_gsm8k.yaml --devices 32 --mesh 1,8,4

Both programs are compiled ahead of time (`jax.jit(...).lower(...).compile()`) for N simulated
CPU devices, from abstract inputs (`ShapeDtypeStruct`s carrying their shardings), so nothing
the size of the model is ever allocated. XLA's `memory_analysis()` of each compiled program
gives the per-device bytes of its arguments, outputs, donated (aliased) buffers and
temporaries; the parameter, optimizer-state and KV-cache parts are the sizes of their shards.

- **train**: one optimizer step (`train.Stepper`): f32 master params + Adam state (the donated
  train state), the [grad_accum, batch / grad_accum, max_length] batch, and the temporaries
  (activations, gradients, remat as configured). The round loop also keeps the params it
  passed in alive during training: counted as `held`.
- **sample**: one compiled static Think batch (`decode.generate`): the sampling-layout params
  (tensor-parallel, replicated over data/fsdp), the donated KV cache of `think.batch_size`
  rows x (max_prompt_tokens + max_new_tokens), and the temporaries, among them the prefill
  cache of the batch's prompts. Think's continuous batching keeps the same decode cache (one
  row per slot) and, in place of that prefill cache, a prompt store of the same size, so this
  program bounds it too. The round loop keeps the trainer's params alive meanwhile: `held`.

Peak per device = arguments + outputs - aliased + temporaries + code. On CPU devices the
temporaries come from XLA:CPU's buffer assignment, which overstates a TPU's: XLA:CPU runs bf16
matmuls in f32 and keeps f32 copies of the bf16-cast weights (for Think, outside the decode
loop: about the size of the f32 weights). Argument, output and state sizes are exact.
`--tpu v5e:2x4` (any TYPE:topology libtpu knows) compiles with the real TPU compiler instead,
on this machine, no TPU needed (libtpu must be installed): then the temporaries are the TPU's.
"tight" means more than 90% of the device's HBM (the runtime needs some for itself). CPU-device
plans are also compared with an 80 GB and a 141 GB GPU (`gpu80`, `gpu141`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Optional

import numpy as np

from tpt_jax.config import ConfigError, MeshConfig, RunConfig, TptError

log = logging.getLogger(__name__)

GiB = 1024 ** 3
# HBM per chip (GiB), as Google documents each generation.
TPU_HBM_GIB = {"v5e": 16, "v4": 32, "v6e": 32, "v5p": 95}
# Memory per GPU (GiB) as the cards report it: an "80 GB" H100 has 81,559 MiB, a 141 GB H200
# 143,771 MiB. Plans compiled for CPU devices are compared with both kinds too.
GPU_HBM_GIB = {"gpu80": 79.6, "gpu141": 140.4}
TIGHT = 0.9  # above this share of HBM a fit is "tight"


# ----------------------------------------------------------------------------- bytes


def shard_bytes(tree: Any) -> int:
    """Bytes per device of a tree of arrays / ShapeDtypeStructs with (named) shardings: the
    largest shard (the one a device holds; shards are equal when dimensions divide)."""
    import jax
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def total_bytes(tree: Any) -> int:
    import jax
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_stats(compiled) -> dict:
    """XLA's per-device memory analysis of a compiled program, plus the derived peak."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] \
        + out["generated_code"]
    return out


def fits(nbytes: int, hbm_gib: Optional[dict] = None) -> dict:
    """{tpu type: "yes" | "tight" | "no"} for `nbytes` per device (HBM GiB per device)."""
    out = {}
    for name, gib in (hbm_gib or TPU_HBM_GIB).items():
        cap = gib * GiB
        out[name] = "no" if nbytes > cap else ("tight" if nbytes > TIGHT * cap else "yes")
    return out


# ----------------------------------------------------------------------------- devices


def cpu_devices(n: int) -> Optional[list]:
    """N CPU devices, or None when this process's JAX already started with fewer (then
    `tpt plan` runs itself again in a fresh process with N devices)."""
    import jax
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # never touch (maybe busy) accelerators
        jax.config.update("jax_num_cpu_devices", n)
    try:
        devices = jax.devices("cpu")
    except RuntimeError:
        return None
    return devices[:n] if len(devices) >= n else None


def tpu_devices(topology: str) -> tuple[list, str, float]:
    """Devices of a TPU topology such as "v5e:2x4" or "v5p:2x4x4", described (not attached) by
    libtpu, so the real TPU compiler plans for it on a machine without TPUs. Returns (devices,
    TPU type, HBM GiB per device)."""
    import importlib.util
    kind, _, shape = topology.partition(":")
    try:
        chips = math.prod(int(d) for d in shape.split("x"))
    except ValueError:
        chips = 0
    if kind not in TPU_HBM_GIB or chips < 1:
        raise ConfigError(f"--tpu must be TYPE:AxB[xC] with TYPE one of {', '.join(TPU_HBM_GIB)} "
                          f"(e.g. v5e:2x4, v5p:2x4x4), got {topology!r}")
    if importlib.util.find_spec("libtpu") is None:
        raise TptError("--tpu compiles with the TPU compiler in libtpu, which is not installed "
                       "(pip install 'jax[tpu]'); without it, plan on CPU devices (--devices N)")
    import jax
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # describe TPUs, never attach to (busy) ones
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off Cloud TPU
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # plans may run side by side
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu rejects the name or the shape
        raise TptError(f"libtpu cannot describe TPU topology {topology!r}: "
                       f"{str(e).strip().splitlines()[0][:200]}") from None
    return list(devices), kind, TPU_HBM_GIB[kind] * chips / len(devices)


# ----------------------------------------------------------------------------- programs


def _with_sharding(shapes: Any, shardings: Any) -> Any:
    import jax
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def plan_train(cfg: RunConfig, model, mesh) -> dict:
    """Compile one train step for `cfg.train` (batch_size, max_length, grad_accum, remat)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tpt_jax.gemma.sharding import TRAIN_RULES, use_rules
    from tpt_jax.stages.train_step import Stepper, check_batch

    tc = cfg.train
    micro = check_batch(tc, mesh)
    stepper = Stepper(model, tc, mesh)  # not Stepper.get: nothing to keep for later
    state = stepper.abstract_state()
    T = tc.max_length  # the longest row a batch can have (packed rows always have it)
    batch = {k: jax.ShapeDtypeStruct((tc.grad_accum, micro, T),
                                     jnp.float32 if k == "weights" else jnp.int32,
                                     sharding=stepper.batch_sh[k]) for k in stepper.keys}
    sched = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P()))
    t0 = time.perf_counter()
    with use_rules(mesh, TRAIN_RULES):
        compiled = stepper._train.lower(state, batch, sched).compile()
    stats = memory_stats(compiled)
    params = shard_bytes(state["params"])
    parts = {"params": params, "opt_state": shard_bytes(state["opt_state"]),
             "batch": shard_bytes(batch)}
    return _program("train", stats, parts, held=params, compile_s=time.perf_counter() - t0,
                    shape={"batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
                           "max_length": T, "remat": tc.remat},
                    params_total=total_bytes(state["params"]))


def plan_sample(cfg: RunConfig, model, mesh) -> dict:
    """Compile one Think batch: think.batch_size rows, the largest prompt bucket
    (max_prompt_tokens) and max_new_tokens, n samples per prompt sharing one prefill."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from tpt_jax.engine import cache as C, layout as L, programs as PR
    from tpt_jax.engine.sampler import prompt_buckets
    from tpt_jax.gemma import model as M
    from tpt_jax.gemma.sharding import SAMPLE_RULES, TRAIN_RULES, logical_to_spec, use_rules
    from tpt_jax.stages.think import sampling_config

    tk = cfg.think
    sampling = sampling_config(tk)
    group = min(tk.n, tk.batch_size)
    prompts = tk.batch_size // group
    rows = prompts * group
    bucket = prompt_buckets(tk.max_prompt_tokens)[-1]
    length = C.cache_length(bucket + sampling.max_new_tokens)

    train_params = _with_sharding(M.abstract_params(model),
                                  M.param_shardings(model, mesh, TRAIN_RULES))
    # the layout switch Think does first, as on an accelerator (no transposed unembedding)
    switch = jax.jit(functools.partial(L.split_layers, cfg=model.cfg, transpose=False),
                     out_shardings=L.layout_shardings(model, mesh, SAMPLE_RULES, False))
    lowered = switch.lower(train_params)
    switch_compiled = lowered.compile()
    sp = _with_sharding(lowered.out_info, switch_compiled.output_shardings)

    cache = _with_sharding(
        jax.eval_shape(lambda: C.init_cache(model.cfg, rows, length, model.dtype)),
        C.cache_shardings(model.cfg, rows, length, mesh, SAMPLE_RULES))

    def arg(shape, dtype, logical):
        spec = logical_to_spec(logical, SAMPLE_RULES, mesh, shape)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    args = (arg((prompts, bucket), jnp.int32, ("act_batch", None)),
            arg((prompts, bucket), jnp.int32, ("act_batch", None)),
            arg((rows,), jnp.int32, ("act_batch",)), arg((rows,), jnp.int32, ("act_batch",)),
            arg((rows,), jnp.int32, ("act_batch",)))
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    prog = PR.Program(sampling, group, (1,), (), 0)
    fn = PR.compiled(model.cfg, model.dtype, model.param_dtype)["generate"]
    t0 = time.perf_counter()
    with use_rules(mesh, SAMPLE_RULES):
        compiled = fn.lower(sp, cache, *args, seed, prog=prog).compile()
    stats = memory_stats(compiled)
    parts = {"params": shard_bytes(sp), "kv_cache": shard_bytes(cache)}
    return _program("sample", stats, parts, held=shard_bytes(train_params),
                    compile_s=time.perf_counter() - t0,
                    shape={"rows": rows, "samples_per_prompt": group,
                           "max_prompt_tokens": bucket, "max_new_tokens": sampling.max_new_tokens,
                           "cache_length": length},
                    switch=memory_stats(switch_compiled),
                    kv_rows_per_gb=kv_rows_per_gb(model, bucket, sampling.max_new_tokens))


def kv_rows_per_gb(model, bucket: int, max_new: int) -> dict:
    """Rows whose KV cache fits in 1e9 bytes (all devices together): the dense cache reserves
    cache_length(bucket + max_new) columns a slot (keys, values, positions) whatever the row's
    length; the paged cache holds a row by its live pages, so per GB it holds at least
    `paged_at_limit` rows (each in whole pages for prompt + max_new - 1 columns, the longest
    prompt's included), and as many more as traces stop before their limit and samples share
    their prompt's pages (`tpt bench sample --lengths` measures that)."""
    from tpt_jax.engine import cache as C
    from tpt_jax.engine.paged import pool_bytes
    from tpt_jax.engine.sampler import PAGE_SIZE
    dense = C.cache_bytes(model.cfg, 1, C.cache_length(bucket + max_new), model.dtype)
    pages = -(-(bucket + max_new - 1) // PAGE_SIZE)
    paged = pool_bytes(model.cfg, pages, PAGE_SIZE, model.dtype)
    return {"dense": round(1e9 / dense, 2), "paged_at_limit": round(1e9 / paged, 2),
            "page_size": PAGE_SIZE}


def _program(name: str, stats: dict, parts: dict, held: int, compile_s: float, **extra) -> dict:
    temp = stats["temp"]
    total = stats["peak"] + held
    return {"program": name, "xla": stats, "parts": {**parts, "temp": temp}, "peak": stats["peak"],
            "held": held, "total": total, "compile_s": round(compile_s, 1), **extra}


# ----------------------------------------------------------------------------- the plan


def apply_shape_overrides(cfg: RunConfig, mesh: Optional[MeshConfig] = None,
                          batch: Optional[int] = None, seq: Optional[int] = None,
                          rows: Optional[int] = None) -> RunConfig:
    """The config with the plan's command-line overrides (mesh, train batch/length, think rows)."""
    train, think = cfg.train, cfg.think
    if batch is not None:
        if batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {batch}")
        train = dataclasses.replace(train, batch_size=batch)
    if seq is not None:
        if seq < 2:
            raise ConfigError(f"--seq must be >= 2, got {seq}")
        train = dataclasses.replace(train, max_length=seq)
    if rows is not None:
        if rows < 1:
            raise ConfigError(f"--rows must be >= 1, got {rows}")
        think = dataclasses.replace(think, batch_size=rows)
    return dataclasses.replace(cfg, mesh=mesh or cfg.mesh, train=train, think=think)


def make_plan(cfg: RunConfig, devices: Optional[int] = None,
              programs: tuple = ("train", "sample"), tpu: Optional[str] = None) -> dict:
    """Compile the programs of `cfg` for `devices` CPU devices, or for the devices of TPU
    topology `tpu` (e.g. "v5e:2x4", with libtpu's compiler); returns the plan as JSON data."""
    from tpt_jax.gemma.config import model_preset
    from tpt_jax.gemma.model import make_model
    from tpt_jax.gemma.sharding import make_mesh

    if tpu:
        devs, kind, hbm = tpu_devices(tpu)
        if devices is not None and devices != len(devs):
            raise ConfigError(f"--devices {devices} does not match TPU topology {tpu} "
                              f"({len(devs)} devices)")
        hbm_gib = {kind: hbm}
    else:
        devs = cpu_devices(devices)
        if devs is None:
            raise TptError(f"this process has fewer than {devices} CPU devices; set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before "
                           f"JAX starts (the tpt plan command does this itself)")
        hbm_gib = {**TPU_HBM_GIB, **GPU_HBM_GIB}
    mcfg = model_preset(cfg.model)
    mesh = make_mesh(cfg.mesh, devs)
    model = make_model(mcfg, cfg.dtype, cfg.param_dtype, cfg.train.remat)
    out = {"model": cfg.model, "params": mcfg.param_count(), "devices": len(devs),
           "compiler": f"tpu {tpu}" if tpu else "cpu", "mesh": dict(mesh.shape),
           "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "hbm_gib": hbm_gib,
           "programs": {}}
    for name in programs:
        t0 = time.perf_counter()
        try:
            p = (plan_train if name == "train" else plan_sample)(cfg, model, mesh)
            p["fits"] = fits(p["total"], hbm_gib)
        except Exception as e:  # the TPU compiler refuses a program that cannot fit its HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            p = {"program": name, "total": None, "fits": {k: "no" for k in hbm_gib},
                 "error": str(e).strip().splitlines()[0].split("RESOURCE_EXHAUSTED: ")[-1]}
        out["programs"][name] = p
        log.info("%s: compiled in %.1f s", name, time.perf_counter() - t0)
    totals = [p["total"] for p in out["programs"].values()]
    out["total"] = None if None in totals else max(totals)
    out["fits"] = ({k: "no" for k in hbm_gib} if out["total"] is None
                   else fits(out["total"], hbm_gib))
    return out


def _unit(plan: dict) -> tuple[str, int]:
    """GiB, or MiB for plans too small to read in GiB (tiny test models)."""
    small = plan["total"] is not None and plan["total"] < GiB / 4
    return ("MiB", 1024 ** 2) if small else ("GiB", GiB)


def format_plan(plan: dict) -> str:
    """Human-readable table: GiB per device for each program, and the TPU types it fits."""
    mesh = plan["mesh"]
    compiler = plan.get("compiler", "cpu")
    by = "XLA:CPU" if compiler == "cpu" else f"XLA:TPU for {compiler.split()[-1]}"
    lines = [f"{plan['model']} ({plan['params'] / 1e9:.2f}B params), {plan['devices']} devices, "
             f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}, "
             f"compute {plan['dtype']}, params {plan['param_dtype']}, compiled by {by}"]
    for p in plan["programs"].values():
        if "error" in p:
            lines.append(f"  {p['program']}: does not compile: {p['error']}")
            continue
        s = p["shape"]
        if p["program"] == "train":
            lines.append(f"  train: batch {s['batch_size']} (grad_accum {s['grad_accum']}) x "
                         f"{s['max_length']} tokens, remat {s['remat']}")
        else:
            kv = p["kv_rows_per_gb"]
            lines.append(f"  sample: {s['rows']} rows ({s['samples_per_prompt']} per prompt) x "
                         f"cache {s['cache_length']} ({s['max_prompt_tokens']} prompt + "
                         f"{s['max_new_tokens']} new); KV rows per GB: dense {kv['dense']:g}, "
                         f"paged {kv['paged_at_limit']:g} at the limit and more by live "
                         f"length (pages of {kv['page_size']})")
    names = list(plan["hbm_gib"])
    unit, scale = _unit(plan)
    _gib = lambda n: f"{n / scale:.2f}"
    head = [f"{unit}/device", "params", "opt state", "KV cache", "temp", "peak", "+held", "total",
            *[f"{n} {plan['hbm_gib'][n]:g}G" for n in names]]
    rows = []
    for p in plan["programs"].values():
        if "error" in p:
            rows.append([p["program"], *["-"] * 7, *[p["fits"][n] for n in names]])
            continue
        parts = p["parts"]
        rows.append([p["program"], _gib(parts["params"]),
                     _gib(parts["opt_state"]) if "opt_state" in parts else "-",
                     _gib(parts["kv_cache"]) if "kv_cache" in parts else "-",
                     _gib(parts["temp"]), _gib(p["peak"]), _gib(p["held"]), _gib(p["total"]),
                     *[p["fits"][n] for n in names]])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    ok = [n for n in names if plan["fits"][n] != "no"]
    fit = ", ".join(f"{n} ({plan['fits'][n]})" for n in ok) if ok else "none"
    lines.append(f"fits: {fit}")
    return "\n".join(lines)
