"""HF checkpoints (Gemma2, Llama, Qwen2) <-> params, and Orbax params for `tpt convert`.

Loading is sharded from birth: every device shard is read straight from the safetensors
files with `jax.make_array_from_callback`, slicing the HF tensor to just the rows and
columns that shard needs, so no host or device ever holds the whole model. Names, shapes
and the architecture are checked up front from metadata alone, with one-line errors.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tpt_jax import distributed, faults, io
from tpt_jax.config import TptError
from tpt_jax.config_io import from_dict
from tpt_jax.gemma import hub, manifest
from tpt_jax.gemma.config import FAMILIES, ModelConfig
from tpt_jax.gemma.model import Gemma2, abstract_params, as_dtype, param_shardings

# ----------------------------------------------------------------------------- config.json


def read_hf_config(ckpt_dir: str) -> ModelConfig:
    """config.json (as transformers writes it) -> ModelConfig, rejecting other architectures."""
    ckpt_dir = hub.resolve(ckpt_dir, "checkpoint")  # a Hub id -> its cached snapshot
    where = f"{ckpt_dir}/config.json"
    raw = io.read_json(where)
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise TptError(f"{where}: model_type {family!r} is not supported (supported: "
                       f"{', '.join(FAMILIES)})")
    gemma = family == "gemma2"
    act = raw.get("hidden_activation") or raw.get("hidden_act") or (
        "gelu_pytorch_tanh" if gemma else "silu")
    if act not in (("gelu_pytorch_tanh", "gelu_tanh") if gemma else ("silu",)):
        raise TptError(f"{where}: {'hidden_activation' if gemma else 'hidden_act'} {act!r} is not "
                       f"{family}'s "
                       f"{'gelu_pytorch_tanh' if gemma else 'silu'}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads") + (("head_dim",) if gemma else ())
    for key in required + (("head_dim",) if raw.get("head_dim") is not None else ()):
        if isinstance(raw.get(key), bool) or not isinstance(raw.get(key), int):
            raise TptError(f"{where}: field {key!r} is missing or not an integer")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // max(1, raw["num_attention_heads"])
    layer_types = raw.get("layer_types")
    local = lambda i: gemma and i % 2 == 0
    if layer_types is not None and (
            not isinstance(layer_types, list) or len(layer_types) != raw["num_hidden_layers"]
            or any(t != ("sliding_attention" if local(i) else "full_attention")
                   for i, t in enumerate(layer_types))):
        raise TptError(f"{where}: layer_types must " + (
            "alternate sliding/full starting with sliding, as in Gemma2" if gemma
            else "all be full_attention (sliding-window layers are not supported)"))
    if raw.get("use_sliding_window") or raw.get("mlp_bias"):
        key = "use_sliding_window" if raw.get("use_sliding_window") else "mlp_bias"
        raise TptError(f"{where}: {key} is true; not supported for {family}")
    tie = raw.get("tie_word_embeddings", gemma)
    if gemma and tie is False:
        raise TptError(f"{where}: tie_word_embeddings is false; Gemma2 ties the output embedding")
    if not isinstance(tie, bool):
        raise TptError(f"{where}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    bias = True if family == "qwen2" else raw.get("attention_bias", False)
    if not isinstance(bias, bool):
        raise TptError(f"{where}: field 'attention_bias' must be true or false, got {bias!r}")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise TptError(f"{where}: field 'rope_parameters' is not a mapping")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise TptError(f"{where}: rope_type {rope_type!r} is not supported (default, llama3)")
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(
            rope_scaling_factor=float(_number(rope, "factor", None, where)),
            rope_low_freq_factor=float(_number(rope, "low_freq_factor", None, where)),
            rope_high_freq_factor=float(_number(rope, "high_freq_factor", None, where)),
            rope_original_max_position=int(_number(rope, "original_max_position_embeddings",
                                                   None, where)))
    softcaps = dict(
        query_pre_attn_scalar=float(_number(raw, "query_pre_attn_scalar", head_dim, where)),
        sliding_window=int(_number(raw, "sliding_window", None, where, True) or 4096),
        attn_logit_softcap=_number(raw, "attn_logit_softcapping", 50.0, where, True),
        final_logit_softcap=_number(raw, "final_logit_softcapping", 30.0, where, True),
    ) if gemma else dict(query_pre_attn_scalar=float(head_dim), sliding_window=None,
                         attn_logit_softcap=None, final_logit_softcap=None)
    cfg = ModelConfig(
        vocab_size=raw["vocab_size"], embed_dim=raw["hidden_size"],
        hidden_dim=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"], num_kv_heads=raw["num_key_value_heads"],
        head_dim=head_dim, **softcaps,
        rope_theta=float(_number(rope if "rope_theta" in rope else raw, "rope_theta", 10000.0,
                                 where)),
        rms_norm_eps=float(_number(raw, "rms_norm_eps", 1e-6, where)),
        family=family, attention_bias=bias, tie_embeddings=tie, **scaling)
    cfg.validate(where)
    return cfg


def _number(raw: dict, key: str, default: Any, where: str, none_ok: bool = False) -> Any:
    """raw[key] (or `default`) as a finite number; anything else is a one-line error."""
    value = raw.get(key, default)
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise TptError(f"{where}: field {key!r} must be a number, got {value!r}")
    return value


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x


def hf_config_dict(cfg: ModelConfig, dtype: str) -> dict:
    """config.json for `cfg`, as transformers writes it for the family."""
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    common = {
        "model_type": cfg.family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": dtype,
        "dtype": dtype}
    if not cfg.gemma:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.family]
        extra = ({"attention_bias": cfg.attention_bias, "mlp_bias": False} if cfg.family == "llama"
                 else {"use_sliding_window": False})
        return {"architectures": [arch], **common, "hidden_act": "silu",
                "max_position_embeddings": (
                    cfg.rope_original_max_position * int(cfg.rope_scaling_factor)
                    if cfg.rope_scaling_factor else 32768),
                "rope_scaling": None if cfg.rope_scaling_factor is None else rope,
                "layer_types": ["full_attention"] * cfg.num_layers, **extra}
    return {
        "architectures": ["Gemma2ForCausalLM"], **common,
        "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar),
        "sliding_window": cfg.sliding_window, "attn_logit_softcapping": cfg.attn_logit_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "max_position_embeddings": 8192, "attention_bias": False,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                        for i in range(cfg.num_layers)],
    }


# ----------------------------------------------------------------------------- name mapping

# Our leaf (under a layer) -> (HF suffix, kind). Kinds say how the HF matrix maps to ours.
_LAYER_TENSORS = {
    ("attn", "q"): ("self_attn.q_proj.weight", "heads_in"),
    ("attn", "k"): ("self_attn.k_proj.weight", "heads_in"),
    ("attn", "v"): ("self_attn.v_proj.weight", "heads_in"),
    ("attn", "o"): ("self_attn.o_proj.weight", "heads_out"),
    ("mlp", "gate"): ("mlp.gate_proj.weight", "transpose"),
    ("mlp", "up"): ("mlp.up_proj.weight", "transpose"),
    ("mlp", "down"): ("mlp.down_proj.weight", "transpose"),
    ("pre_attn_norm", "scale"): ("input_layernorm.weight", "same"),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", "same"),
    ("pre_ffw_norm", "scale"): ("pre_feedforward_layernorm.weight", "same"),
    ("post_ffw_norm", "scale"): ("post_feedforward_layernorm.weight", "same"),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "bias_heads"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "bias_heads"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "bias_heads"),
}
# Llama and Qwen2 have no post-norms; HF calls their pre-MLP norm post_attention_layernorm.
_LLAMA_TENSORS = {**_LAYER_TENSORS,
                  ("pre_ffw_norm", "scale"): ("post_attention_layernorm.weight", "same")}
_SUB = {"local": 0, "global": 1}


def _hf_shape(kind: str, ours: tuple) -> tuple:
    if kind == "heads_in":  # ours [D, N, H] <- HF [N*H, D]
        return (ours[1] * ours[2], ours[0])
    if kind == "heads_out":  # ours [N, H, D] <- HF [D, N*H]
        return (ours[2], ours[0] * ours[1])
    if kind == "transpose":
        return (ours[1], ours[0])
    if kind == "bias_heads":  # ours [N, H] <- HF [N*H]
        return (ours[0] * ours[1],)
    return tuple(ours)


def _norm_slices(index: tuple, shape: tuple) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _read_block(sl, kind: str, ours_shape: tuple, rng: list) -> np.ndarray:
    """Read from HF tensor slice-handle `sl` exactly the block of our layout in `rng`."""
    if kind == "same":
        return sl[tuple(slice(a, b) for a, b in rng)]
    if kind == "transpose":
        (a0, a1), (b0, b1) = rng
        return sl[b0:b1, a0:a1].T
    if kind == "heads_in":  # ours [D, N, H]
        (d0, d1), (n0, n1), (h0, h1) = rng
        H = ours_shape[2]
        block = sl[n0 * H:n1 * H, d0:d1].T.reshape(d1 - d0, n1 - n0, H)
        return block[:, :, h0:h1]
    if kind == "heads_out":  # ours [N, H, D]
        (n0, n1), (h0, h1), (d0, d1) = rng
        H = ours_shape[1]
        block = sl[d0:d1, n0 * H:n1 * H].T.reshape(n1 - n0, H, d1 - d0)
        return block[:, h0:h1, :]
    if kind == "bias_heads":  # ours [N, H]
        (n0, n1), (h0, h1) = rng
        H = ours_shape[1]
        return sl[n0 * H:n1 * H].reshape(n1 - n0, H)[:, h0:h1]
    raise ValueError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if kind == "transpose":
        return x.T
    if kind == "bias_heads":
        return x.reshape(-1)
    return x


def _leaf_spec(path: tuple, cfg: ModelConfig) -> tuple[str, Optional[str]]:
    """Our param path -> (kind, HF name template with {layer}), or (kind, name)."""
    if path == ("embedding",):
        return "same", "model.embed_tokens.weight"
    if path == ("lm_head",):
        return "same", "lm_head.weight"
    if path == ("final_norm", "scale"):
        return "same", "model.norm.weight"
    table = _LAYER_TENSORS if cfg.gemma else _LLAMA_TENSORS
    if path[0] == "layers" and tuple(path[2:]) in table:
        suffix, kind = table[tuple(path[2:])]
        return kind, "model.layers.{layer}." + suffix
    raise KeyError(f"no HF name for parameter {'/'.join(path)}")


def _paths(tree: Any) -> list[tuple[tuple, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(k.key for k in kp), leaf) for kp, leaf in flat]


def _unflatten(items: dict) -> dict:
    out: dict = {}
    for path, leaf in items.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


# ----------------------------------------------------------------------------- import


class _Tensors:
    """Lazy view of all tensors in a checkpoint directory (single or sharded safetensors)."""

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        index = os.path.join(ckpt_dir, "model.safetensors.index.json")
        single = os.path.join(ckpt_dir, "model.safetensors")
        if os.path.exists(index):
            weight_map = io.read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) for f in weight_map.values()):
                raise TptError(f"{index}: no weight_map of tensor names to file names")
            files = {n: os.path.join(ckpt_dir, f) for n, f in weight_map.items()}
        elif os.path.exists(single):
            files = None
        else:
            raise TptError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")
        self._handles: dict[str, Any] = {}
        if files is None:
            names = self._open(single).keys()
            files = {n: single for n in names}
        self.files = files

    def _open(self, fname: str):
        if fname not in self._handles:
            if not os.path.exists(fname):
                raise TptError(f"{self.dir}: shard {os.path.basename(fname)} is missing")
            try:
                self._handles[fname] = safe_open(fname, framework="np")
            except Exception as e:  # safetensors raises its own types for corrupt headers
                raise TptError(f"{fname}: not a readable safetensors file ({e})") from None
        return self._handles[fname]

    def slice(self, name: str):
        if name not in self.files:
            raise TptError(f"{self.dir}: missing tensor {name}")
        return self._open(self.files[name]).get_slice(name)

    def shape(self, name: str) -> tuple:
        return tuple(self.slice(name).get_shape())


def _stage_local(ckpt_dir: str) -> str:
    """Hub ids resolve to their cached snapshot; gs:// checkpoints are copied to a local temp
    dir (safetensors needs a file)."""
    ckpt_dir = hub.resolve(ckpt_dir, "checkpoint")
    if not io.is_remote(ckpt_dir):
        return ckpt_dir
    local = tempfile.mkdtemp(prefix="tpt-hf-")
    for f in io.path(ckpt_dir).iterdir():
        if f.name.endswith((".json", ".safetensors", ".model")):
            f.copy(io.path(local) / f.name)
    return local


def load_hf(ckpt_dir: str, model: Gemma2, mesh=None, rules=None) -> Any:
    """Read an HF checkpoint (Gemma2, Llama, Qwen2) into params for `model` (sharded if `mesh`
    is given)."""
    local = _stage_local(ckpt_dir)
    file_cfg = read_hf_config(local)
    if file_cfg != model.cfg:
        diff = [f.name for f in dataclasses.fields(ModelConfig)
                if getattr(file_cfg, f.name) != getattr(model.cfg, f.name)]
        raise TptError(f"{ckpt_dir}: config.json differs from the model config in {', '.join(diff)}")
    tensors = _Tensors(local)
    abstract = abstract_params(model)
    shardings = param_shardings(model, mesh, rules) if mesh is not None else None
    pairs = model.cfg.num_layers // 2
    dtype = as_dtype(model.param_dtype)

    plan = []  # (path, shape, kind, [hf names per stacked row] or name)
    for path, leaf in _paths(abstract):
        kind, template = _leaf_spec(path, model.cfg)
        if path[0] == "layers":
            names = [template.format(layer=2 * p + _SUB[path[1]]) for p in range(pairs)]
            per = leaf.shape[1:]
        else:
            names, per = [template], leaf.shape
        want = _hf_shape(kind, per)
        for name in names:
            got = tensors.shape(name)
            if got != want:
                raise TptError(f"{ckpt_dir}: tensor {name} has shape {got}, expected {want}")
        plan.append((path, leaf.shape, kind, names))

    def make(path, shape, kind, names, sharding):
        stacked = path[0] == "layers"

        def cb(index):
            rng = _norm_slices(index, shape)
            if stacked:
                rows = [_read_block(tensors.slice(names[p]), kind, shape[1:], rng[1:])
                        for p in range(*rng[0])]
                block = np.stack(rows) if rows else np.zeros((0,), np.float32)
            else:
                block = _read_block(tensors.slice(names[0]), kind, shape, rng)
            return np.asarray(block).astype(dtype)

        if sharding is None:
            return jnp.asarray(cb(tuple(slice(None) for _ in shape)))
        return jax.make_array_from_callback(shape, sharding, cb)

    flat_shard = dict(_paths(shardings)) if shardings is not None else {}
    return _unflatten({p: make(p, s, k, n, flat_shard.get(p)) for p, s, k, n in plan})


# ----------------------------------------------------------------------------- export


def _host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(params: Any, cfg: ModelConfig, out_dir: str, dtype: str = "float32",
            max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write params as an HF checkpoint that `AutoModelForCausalLM.from_pretrained` loads.
    Every process must call it (arrays are gathered); only process 0 writes."""
    np_dtype = np.dtype(as_dtype(dtype))
    tensors: dict[str, np.ndarray] = {}
    for path, leaf in _paths(params):
        kind, template = _leaf_spec(path, cfg)
        if path[0] == "layers":
            for p in range(leaf.shape[0]):
                name = template.format(layer=2 * p + _SUB[path[1]])
                tensors[name] = _to_hf(kind, _host(leaf[p])).astype(np_dtype)
        else:
            tensors[template] = _to_hf(kind, _host(leaf)).astype(np_dtype)
    if jax.process_index() != 0:
        return
    local = tempfile.mkdtemp(prefix="tpt-export-") if io.is_remote(out_dir) else out_dir
    os.makedirs(local, exist_ok=True)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = np.ascontiguousarray(tensors[name])
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(local, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(local, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.nbytes for t in tensors.values())
        io.write_json_atomic(os.path.join(local, "model.safetensors.index.json"),
                             {"metadata": {"total_size": total}, "weight_map": weight_map})
    io.write_json_atomic(os.path.join(local, "config.json"), hf_config_dict(cfg, dtype))
    if local != out_dir:
        for f in os.listdir(local):
            io.path(os.path.join(local, f)).copy(io.path(out_dir) / f, overwrite=True)
        shutil.rmtree(local, ignore_errors=True)


# ----------------------------------------------------------------------------- Orbax params


FILES = "files.json"  # {relative path: size} of every file under params/, written last


def save_params(params: Any, cfg: ModelConfig, out_dir: str) -> None:
    """Params-only Orbax checkpoint plus model.json (the model config) and files.json (the size
    of every file written), so a damaged checkpoint is caught before Orbax reads it."""
    import orbax.checkpoint as ocp
    target = io.path(out_dir)
    if not io.is_remote(out_dir):
        target = io.path(os.path.abspath(out_dir))
    distributed.barrier("tpt-params-save")  # Orbax syncs with gloo collectives on CPU
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target / "params", params, force=True)
        faults.point("params-save")  # the write is in flight (Orbax: temporary dir, rename)
    faults.point("params-saved")
    if jax.process_index() == 0:
        io.write_json_atomic(target / "model.json", dataclasses.asdict(cfg))
        manifest.write(target / "params", target / FILES)


def check_files(ckpt_dir: str) -> None:
    """A missing or cut file under params/ is a one-line error here, before Orbax reads it."""
    manifest.check(io.path(ckpt_dir) / "params", io.path(ckpt_dir) / FILES, f"{ckpt_dir}: params")


def load_params(ckpt_dir: str, model: Gemma2, mesh=None, rules=None) -> Any:
    """Restore params written by `save_params`, directly into their shardings."""
    import orbax.checkpoint as ocp
    target = io.path(ckpt_dir if io.is_remote(ckpt_dir) else os.path.abspath(ckpt_dir))
    if not (target / "params").exists():
        raise TptError(f"{ckpt_dir}: no Orbax params checkpoint (expected {ckpt_dir}/params)")
    check_files(ckpt_dir)
    abstract = abstract_params(model)
    if mesh is not None:
        shardings = param_shardings(model, mesh, rules)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    distributed.barrier("tpt-params-restore")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(target / "params", abstract)
    except Exception as e:
        raise TptError(f"{ckpt_dir}: cannot restore params ({str(e).splitlines()[0][:200]})") from None


def read_model_json(ckpt_dir: str) -> ModelConfig:
    """The ModelConfig save_params wrote; unknown keys and wrong types are one line."""
    where = f"{ckpt_dir}/model.json"
    cfg = from_dict(ModelConfig, io.read_json(where), where)
    cfg.validate(where)
    return cfg
