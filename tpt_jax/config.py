"""The run's configuration: its sections as dataclasses, their validation, per-round configs.

Model presets live in `gemma/config.py`; building dataclasses from YAML and overrides in
`config_io.py`. Impossible values are a `ConfigError` that names the offending key; the CLI
prints it (and every other `TptError`) on one line, never as a traceback.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


from tpt_jax.config_io import apply_overrides, from_dict, read_yaml, resolve_config_path, to_dict
from tpt_jax.errors import ConfigError, TptError  # noqa: F401 (TptError: imported from here)
from tpt_jax.gemma.config import MODEL_PRESETS
from tpt_jax.prompts import parse_template


# ----------------------------------------------------------------------------- run sections


@dataclasses.dataclass
class MeshConfig:
    """Device mesh shape. One axis may be -1: it takes all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


DATA_SOURCES = ("synthetic", "gsm8k", "math", "jsonl", "tfds")


@dataclasses.dataclass
class DataConfig:
    """Where questions come from. `source`: synthetic | gsm8k | math | jsonl | tfds."""

    source: str = "synthetic"
    train_path: Optional[str] = None  # local/gs:// JSONL; for gsm8k: offline alternative to the hub
    test_path: Optional[str] = None
    hf_name: Optional[str] = None  # e.g. openai/gsm8k
    hf_config: Optional[str] = None
    tfds_name: Optional[str] = None
    question_field: str = "question"
    answer_field: str = "answer"
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    seed: int = 0
    # Round-0 worked solutions (JSONL question/answer); the synthetic source has its own.
    seed_path: Optional[str] = None
    seed_size: int = 200  # synthetic: how many seed worked solutions
    synthetic_train: int = 2000  # synthetic: split sizes (limits still apply)
    synthetic_test: int = 500


LONG_PROMPTS = ("truncate", "skip")
ATTENTIONS = ("auto", "dense", "paged", "pallas")


@dataclasses.dataclass
class ThinkConfig:
    """Sampling traces for the training questions."""

    n: int = 4
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    max_new_tokens: int = 1500
    max_prompt_tokens: int = 512
    batch_size: int = 32  # rows (prompts x n) per compiled decode batch
    stop: list = dataclasses.field(default_factory=list)
    shard_size: int = 256  # questions per JSONL shard (the resume unit)
    seed: int = 0
    # Prompts over max_prompt_tokens: "truncate" (keep BOS + the last tokens) or "skip" the
    # question; either way they are counted in the samples folder's think.json and logged.
    long_prompts: str = "truncate"
    # Exact early stop (`tpt run`): a question's later samples are skipped once Prune's
    # selection can no longer change (first-correct, max-k: k candidates at the lowest
    # indices); off, with a log line, for strategies that need every sample (dedup, rft).
    stop_when_selected: bool = True
    # Decode KV cache: "dense" (each slot reserves prompt + max_new_tokens columns), "paged"
    # (rows take pages as they grow; attention reads only the pages a chunk reaches), "pallas"
    # (paged, read by JAX's Pallas paged-attention kernel; GPU or TPU only), "auto" (dense on
    # CPU, so its figures stay; paged on a GPU/TPU). Where the mesh splits the slots over
    # devices, the page pool is split with them (each device holds its own slots' pages).
    attention: str = "auto"
    # paged: the page pool, all devices together (None: every slot at its longest). Rows are
    # held by their live pages, so with a budget think.batch_size (the slots) may exceed what
    # it holds at full length: when running rows outgrow it, the newest is preempted and
    # started again.
    kv_cache_gb: Optional[float] = None
    # paged, instead of kv_cache_gb: the pool takes this share of each device's free memory,
    # measured when the sampler first samples (its weights placed); GPU and TPU only.
    kv_cache_share: Optional[float] = None
    # Budget mode (tpt_jax/stages/budget.py), both or neither: after think.n samples of every
    # question, the questions Prune's rule has not settled (first-correct, max-k) get one more
    # sample a wave, those whose samples cost the fewest tokens first, up to n_max each, while
    # the round's budget of decoded tokens lasts.
    n_max: Optional[int] = None
    budget_tokens: Optional[int] = None


# Prune strategy steps, joined with "+" (e.g. "all-correct+dedup-text"); rft = calculator +
# dedup-equations. Order in the string does not matter: filters, then dedup, then caps.
PRUNE_STEPS = ("first-correct", "all-correct", "max-k", "dedup-text", "dedup-equations",
               "calculator", "rft", "influence")
# influence: after the rest, keep the top influence_fraction by gradient similarity to
# influence_targets seed examples (tpt_jax/methods/influence.py; needs the model, so `tpt run` only).


@dataclasses.dataclass
class PruneConfig:
    """Which correct samples become training examples."""

    strategy: str = "first-correct"
    max_per_question: Optional[int] = None  # the K of max-k (also caps any strategy)
    calculator_check: bool = False  # every <<lhs=rhs>> must evaluate right (RFT)
    max_examples: Optional[int] = 2000  # cap per round (TPT: 2,000); random subset by seed
    seed: int = 0
    min_chars: Optional[int] = None  # length limits on the completion
    max_chars: Optional[int] = None
    max_tokens: Optional[int] = None  # on the sample's `tokens` field
    answer_fallback: bool = False  # accept the last number when no answer marker is found
    metrics_k: Optional[list] = None  # k for pass@k/maj@k/diversity@k; None: 1, 2, 4, ... n
    # The `influence` step (LESS-style gradient similarity, tpt_jax/methods/influence.py).
    influence_fraction: float = 0.5  # share of the candidates kept
    influence_targets: int = 64  # target examples drawn from the seed/dev set
    influence_dim: int = 1024  # random projection size
    influence_params: list = dataclasses.field(
        default_factory=lambda: ["layers/*/attn", "layers/*/mlp"])  # path patterns
    influence_layer: int = -1  # which local/global pair of the stacked layers (-1: last)
    influence_batch: int = 8  # examples per compiled gradient step


@dataclasses.dataclass
class TrainConfig:
    """Supervised fine-tuning (TPT defaults)."""

    learning_rate: float = 1e-6
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1600
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    eval_every: int = 0  # 0 = only at the end
    eval_fraction: float = 0.0
    keep_checkpoints: int = 2
    save_every: int = 0  # 0 = only at the end
    remat: str = "none"  # none | full | dots
    pack: bool = False  # rows hold several examples (batch_size then counts rows)
    loss_chunk: int = 8192  # vocabulary rows per cross-entropy chunk
    loss_bucket: int = 64  # project only trained positions, padded to a multiple (0 = all)
    seed: int = 0
    no_decay: list = dataclasses.field(default_factory=lambda: ["norm"])  # path substrings
    length_bucket: int = 128  # unpacked rows pad to a multiple of this (fewer compiled shapes)
    log_every: int = 10
    async_checkpoint: bool = True
    use_best: bool = True  # return the params with the lowest eval loss (when evaluated)


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation after each round."""

    split: str = "test"
    greedy: bool = True
    n: int = 0  # sampled Pass@k uses n samples per question (0 = greedy only)
    k: list = dataclasses.field(default_factory=lambda: [1])
    temperature: float = 0.7
    max_new_tokens: int = 1500
    limit: Optional[int] = None


SYNTH_STAGES = ("grade-school", "middle-school", "high-school", "competition", "mixed")


@dataclasses.dataclass
class SynthesizeConfig:
    """New problems written by the model from seed texts, labelled by majority vote
    (tpt_jax/methods/synthesize.py); they join the round's Think and Prune as synthetic questions."""

    enabled: bool = False
    per_round: int = 100  # seed texts (= problems written) per round
    seeds: str = "train"  # train (the training questions) | JSONL path with `text`/`question`
    stage: str = "grade-school"  # grade-school | middle-school | high-school | competition | mixed
    n_votes: int = 8  # sampled solutions per new problem
    threshold: float = 0.5  # share of the n votes the majority answer needs
    max_new_tokens: int = 256  # for writing a problem
    temperature: float = 0.8
    seed: int = 0


@dataclasses.dataclass
class SourceConfig:
    """One more model that samples in Think (tpt_jax/methods/multimodel.py)."""

    name: str = "other"  # the `source` of its sample records
    model: str = "test-tiny"  # preset (architecture) when no checkpoint says otherwise
    checkpoint: Optional[str] = None  # Orbax params dir, HF dir or Hub id; None: random
    n: Optional[int] = None  # samples per question; None: compute-matched to think.n
    # Its own tokenizer (dir or Hub id) when it is of another family than the trained model:
    # it samples with its own chat template, and its samples are re-tokenized for training.
    tokenizer: Optional[str] = None


@dataclasses.dataclass
class SourcesConfig:
    """Who samples: the trained model (self) and/or other models; pooled or separate Prune."""

    self: bool = True
    models: list = dataclasses.field(default_factory=list)  # of SourceConfig mappings
    pool: str = "pooled"  # pooled (RFT-U: one Prune, dedup across models) | separate


@dataclasses.dataclass
class TrackingConfig:
    """Experiment tracking (tpt_jax/loop/tracking.py); changing it never changes results."""

    tensorboard: bool = True  # event files under the run dir's tb/
    wandb_project: Optional[str] = None  # also log to W&B (when `wandb` is installed)
    wandb_entity: Optional[str] = None


@dataclasses.dataclass
class RunConfig:
    """A whole TPT run: model, mesh, data, and each stage's settings."""

    model: str = "test-tiny"  # preset name
    checkpoint: Optional[str] = None  # HF checkpoint: local or gs:// dir, or Hub id ORG/NAME[@REV]
    tokenizer: Optional[str] = None  # sentencepiece model / HF tokenizer dir / Hub id
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    prompt: str = "zero-shot"
    rounds: int = 3
    init_from: str = "previous"  # previous (TPT) | base (RFT, ReST-EM)
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    think: ThinkConfig = dataclasses.field(default_factory=ThinkConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    synthesize: SynthesizeConfig = dataclasses.field(default_factory=SynthesizeConfig)
    sources: SourcesConfig = dataclasses.field(default_factory=SourcesConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    # Per-round changes: {round: partial config}, e.g. {2: {think: {n: 8}}}.
    per_round: dict = dataclasses.field(default_factory=dict)


def validate_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int,
                      where: str = "") -> None:
    """How tokens are drawn: the checks shared by ThinkConfig and the sampler's own config."""
    if temperature < 0:
        raise ConfigError(f"{where}temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"{where}top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{where}top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ConfigError(f"{where}max_new_tokens must be >= 1, got {max_new_tokens}")


def validate_run(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that a type check cannot express."""
    if cfg.model not in MODEL_PRESETS and cfg.checkpoint is None:
        raise ConfigError(f"model: unknown preset {cfg.model!r} and no checkpoint given; known "
                          f"presets: {', '.join(MODEL_PRESETS)}")
    if cfg.init_from not in ("previous", "base"):
        raise ConfigError(f"init_from must be 'previous' or 'base', got {cfg.init_from!r}")
    if cfg.rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {cfg.rounds}")
    for name in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, name)
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{name} must be a positive size or -1, got {v}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh: at most one axis may be -1")
    for dt in ("dtype", "param_dtype"):
        if getattr(cfg, dt) not in ("float32", "bfloat16"):
            raise ConfigError(f"{dt} must be float32 or bfloat16, got {getattr(cfg, dt)!r}")
    t = cfg.think
    if t.n < 1:
        raise ConfigError(f"think.n must be >= 1, got {t.n}")
    validate_sampling(t.temperature, t.top_k, t.top_p, t.max_new_tokens, "think.")
    if t.batch_size < 1 or t.shard_size < 1 or t.max_prompt_tokens < 1:
        raise ConfigError("think.batch_size, think.shard_size and think.max_prompt_tokens must be "
                          f">= 1, got {t.batch_size}, {t.shard_size} and {t.max_prompt_tokens}")
    if t.long_prompts not in LONG_PROMPTS:
        raise ConfigError(f"think.long_prompts must be truncate or skip, got {t.long_prompts!r}")
    if t.attention not in ATTENTIONS:
        raise ConfigError(f"think.attention must be one of {', '.join(ATTENTIONS)}, "
                          f"got {t.attention!r}")
    if t.kv_cache_gb is not None and (t.attention == "dense" or t.kv_cache_gb <= 0):
        raise ConfigError(f"think.kv_cache_gb must be > 0 and needs think.attention paged, "
                          f"pallas or auto, got {t.kv_cache_gb} with {t.attention}")
    if t.kv_cache_share is not None and (t.attention == "dense" or not 0 < t.kv_cache_share < 1
                                         or t.kv_cache_gb is not None):
        raise ConfigError(f"think.kv_cache_share must be in (0, 1), needs think.attention paged, "
                          f"pallas or auto and no think.kv_cache_gb, got {t.kv_cache_share} with "
                          f"{t.attention} and kv_cache_gb {t.kv_cache_gb}")
    if any(not isinstance(s, str) or not s for s in t.stop):
        raise ConfigError(f"think.stop must be a list of non-empty strings, got {t.stop!r}")
    validate_budget(t)
    tr = cfg.train
    if tr.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be > 0, got {tr.learning_rate}")
    if not 0 <= tr.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {tr.warmup_ratio}")
    if tr.batch_size < 1 or tr.grad_accum < 1 or tr.max_length < 2:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1, train.max_length >= 2")
    if tr.remat not in ("none", "full", "dots"):
        raise ConfigError(f"train.remat must be none, full or dots, got {tr.remat!r}")
    validate_train(tr, cfg.mesh)
    d = cfg.data
    if d.source not in DATA_SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {d.source!r}")
    if d.source == "jsonl" and not (d.train_path or d.test_path):
        raise ConfigError("data.source jsonl needs data.train_path and/or data.test_path")
    if d.source == "tfds" and not d.tfds_name:
        raise ConfigError("data.source tfds needs data.tfds_name")
    for name in ("train_limit", "test_limit"):
        if getattr(d, name) is not None and getattr(d, name) < 1:
            raise ConfigError(f"data.{name} must be >= 1 or null, got {getattr(d, name)}")
    for name in ("seed_size", "synthetic_train", "synthetic_test"):
        if getattr(d, name) < 1:
            raise ConfigError(f"data.{name} must be >= 1, got {getattr(d, name)}")
    parse_template(cfg.prompt)
    validate_prune(cfg.prune)
    validate_synthesize(cfg.synthesize)
    validate_sources(cfg.sources)
    for key in cfg.per_round:
        r = int(key) if isinstance(key, int) or str(key).isdigit() else -1
        if not 0 <= r <= cfg.rounds:
            raise ConfigError(f"per_round: key {key!r} is not a round number in 0..{cfg.rounds}")
        round_config(cfg, r)  # raises on a bad key or value inside
    if cfg.eval.n < 0 or any((not isinstance(k, int)) or k < 1 for k in cfg.eval.k):
        raise ConfigError("eval.n must be >= 0 and eval.k a list of positive integers")
    for name in ("wandb_project", "wandb_entity"):
        value = getattr(cfg.tracking, name)
        if value is not None and not str(value).strip():
            raise ConfigError(f"tracking.{name} must be a non-empty name or null, got {value!r}")
    return cfg


def validate_budget(t: ThinkConfig, where: str = "think.") -> None:
    """Budget mode's own fields (`where`: "think." in configs, "--" for `tpt think`'s flags);
    the checks that need the questions or Prune's strategy are `stages.budget.check`."""
    n, n_max, tokens, longest = (field_name(where, f) for f in
                                 ("n", "n_max", "budget_tokens", "max_new_tokens"))
    if (t.n_max is None) != (t.budget_tokens is None):
        raise ConfigError(f"{n_max} and {tokens} go together (budget mode): set both or "
                          f"neither, got {t.n_max} and {t.budget_tokens}")
    if t.n_max is not None and t.n_max < t.n:
        raise ConfigError(f"{n_max} must be >= {n} ({t.n}), got {t.n_max}")
    if t.budget_tokens is not None and t.budget_tokens < t.n * t.max_new_tokens:
        raise ConfigError(f"{tokens} must cover {n} samples of a question at {longest} "
                          f"({t.n * t.max_new_tokens}), got {t.budget_tokens}")


def field_name(where: str, field: str) -> str:
    """A field as the user wrote it: think.n_max in a config, --n-max on the command line."""
    return f"--{field.replace('_', '-')}" if where == "--" else where + field


def validate_prune(p: PruneConfig, where: str = "prune") -> PruneConfig:
    """Strategy steps known, max-k has its K, limits positive."""
    steps = [x.strip() for x in p.strategy.split("+")]
    for step in steps:
        if step not in PRUNE_STEPS:
            raise ConfigError(f"{where}.strategy: unknown step {step!r} in {p.strategy!r}; known: "
                              f"{', '.join(PRUNE_STEPS)} (join several with '+')")
    if "max-k" in steps and p.max_per_question is None:
        raise ConfigError(f"{where}.strategy max-k needs {where}.max_per_question")
    for name in ("max_per_question", "max_chars", "max_tokens"):
        if getattr(p, name) is not None and getattr(p, name) < 1:
            raise ConfigError(f"{where}.{name} must be >= 1 or null, got {getattr(p, name)}")
    for name in ("max_examples", "min_chars"):
        if getattr(p, name) is not None and getattr(p, name) < 0:
            raise ConfigError(f"{where}.{name} must be >= 0 or null, got {getattr(p, name)}")
    if p.metrics_k is not None and any(
            isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in p.metrics_k):
        raise ConfigError(f"{where}.metrics_k must be a list of positive integers, got {p.metrics_k}")
    if not 0 < p.influence_fraction <= 1:
        raise ConfigError(f"{where}.influence_fraction must be in (0, 1], got {p.influence_fraction}")
    for name in ("influence_targets", "influence_dim", "influence_batch"):
        if getattr(p, name) < 1:
            raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(p, name)}")
    if not p.influence_params or any(not isinstance(x, str) or not x for x in p.influence_params):
        raise ConfigError(f"{where}.influence_params must be a non-empty list of path patterns, "
                          f"got {p.influence_params!r}")
    return p


def validate_sources(so: SourcesConfig) -> None:
    """Turns `models` mappings into SourceConfigs; names unique, counts positive."""
    if so.pool not in ("pooled", "separate"):
        raise ConfigError(f"sources.pool must be pooled or separate, got {so.pool!r}")
    models, names = [], set()
    for i, m in enumerate(so.models):
        where = f"sources.models[{i}]"
        m = from_dict(SourceConfig, m, where) if isinstance(m, dict) else m
        if not isinstance(m, SourceConfig):
            raise ConfigError(f"{where}: expected a mapping, got {m!r}")
        if not m.name or m.name in names or m.name == "self" or "/" in m.name:
            raise ConfigError(f"{where}.name must be unique, not 'self', without '/', "
                              f"got {m.name!r}")
        if m.checkpoint is None and m.model not in MODEL_PRESETS:
            raise ConfigError(f"{where}.model: unknown preset {m.model!r} and no checkpoint")
        if m.n is not None and m.n < 1:
            raise ConfigError(f"{where}.n must be >= 1 or null (compute-matched), got {m.n}")
        names.add(m.name)
        models.append(m)
    so.models = models
    if not so.self and not models:
        raise ConfigError("sources.self is false and sources.models is empty: nobody samples")


def validate_synthesize(sy: SynthesizeConfig) -> None:
    if sy.stage not in SYNTH_STAGES:
        raise ConfigError(f"synthesize.stage must be one of {', '.join(SYNTH_STAGES)}, "
                          f"got {sy.stage!r}")
    for name in ("per_round", "n_votes", "max_new_tokens"):
        if getattr(sy, name) < 1:
            raise ConfigError(f"synthesize.{name} must be >= 1, got {getattr(sy, name)}")
    if not 0 < sy.threshold <= 1:
        raise ConfigError(f"synthesize.threshold must be in (0, 1], got {sy.threshold}")
    if sy.temperature < 0 or not sy.seeds:
        raise ConfigError("synthesize.temperature must be >= 0 and synthesize.seeds non-empty")


def validate_train(tr: TrainConfig, mesh: Optional[MeshConfig] = None) -> None:
    """Train fields; with a mesh whose sizes are all known, the batch split too (a mesh with
    a -1 axis is checked again when the devices are known)."""
    if tr.epochs <= 0:
        raise ConfigError(f"train.epochs must be > 0, got {tr.epochs}")
    if tr.weight_decay < 0 or (tr.clip_norm is not None and tr.clip_norm <= 0):
        raise ConfigError("train.weight_decay must be >= 0 and train.clip_norm > 0 or null")
    for name in ("loss_chunk", "length_bucket", "log_every"):
        if getattr(tr, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(tr, name)}")
    if tr.loss_bucket < 0:
        raise ConfigError(f"train.loss_bucket must be >= 0 (0 = off), got {tr.loss_bucket}")
    if tr.keep_checkpoints < 1 or tr.eval_every < 0 or tr.save_every < 0:
        raise ConfigError("train.keep_checkpoints must be >= 1, train.eval_every and "
                          "train.save_every >= 0")
    if not 0 <= tr.eval_fraction < 1:
        raise ConfigError(f"train.eval_fraction must be in [0, 1), got {tr.eval_fraction}")
    if tr.batch_size % tr.grad_accum:
        raise ConfigError(f"train.batch_size ({tr.batch_size}) must be divisible by "
                          f"train.grad_accum ({tr.grad_accum})")
    if mesh is not None and -1 not in (mesh.data, mesh.fsdp, mesh.tensor):
        micro, dp = tr.batch_size // tr.grad_accum, mesh.data * mesh.fsdp
        if micro % dp:
            raise ConfigError(f"train micro-batch (batch_size / grad_accum = {micro}) must be "
                              f"divisible by the data-parallel size mesh.data x mesh.fsdp = {dp}")


def round_config(cfg: RunConfig, r: int) -> RunConfig:
    """The config of round r: `per_round[r]` (a partial config) merged over the run's."""
    extra = cfg.per_round.get(r) or cfg.per_round.get(str(r))
    if not extra:
        return cfg
    data = dict(to_dict(cfg), per_round={})
    return validate_run(from_dict(RunConfig, _merge(data, extra), f"per_round.{r}"))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_run_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """YAML file (or configs/ name, default tiny_cpu) + dotted overrides -> validated RunConfig."""
    data = read_yaml(resolve_config_path(path or "tiny_cpu"))
    data = apply_overrides(data, overrides or [])
    return validate_run(from_dict(RunConfig, data, "config"))
