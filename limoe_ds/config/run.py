"""The run configuration: a DeepSpeed JSON whose ``"limoe"`` block configures everything else.

    {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "optimizer": {...}, ...,
     "limoe": {"model": {"preset": "tiny", ...overrides}, "parallel": {...}, "data": {...},
               "train": {...}, "eval": {...}, "logging": {...}}}

Merge order: the file, then dotted ``--set key=value`` overrides (``data.train=/path``,
``train.steps=200``, ``model.moe.capacity_factor=1.25``; values parsed as YAML scalars/lists).
Everything is validated here, before any process group starts: unknown keys, wrong types (every
field against its annotation, ``config.typed``; DeepSpeed's keys, ``config.ds_keys``), batch
arithmetic against DeepSpeed's keys, the parallel layout against the world size, the model
(image size vs patch size), missing data. Errors are ``ConfigError`` naming the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from limoe_ds.compat.deepspeed import zero0_clipping_problem
from limoe_ds.config import ds_keys, typed
from limoe_ds.config.model import MODALITIES, ModelConfig, config_from_dict, get_preset
from limoe_ds.config.data import DataConfig, check_synthetic_name, is_synthetic
from limoe_ds.config.errors import ConfigError, check as _check


@dataclass(kw_only=True)
class ParallelConfig:
    expert_parallel_size: int = 1
    """Ranks that shard each MoE layer's experts (DeepSpeed-MoE); divides the data-parallel size."""
    tensor_parallel_size: int = 1
    """Megatron-style tensor parallelism of attention and the dense MLPs (megatron-core); tp
    consecutive ranks form a group (keep it within a node); divides num_heads and mlp_dim."""
    world_size: int | None = None
    """The number of ranks this config is written for (checked at start); None = any."""

    def __post_init__(self) -> None:
        for k in ("expert_parallel_size", "tensor_parallel_size"):
            v = getattr(self, k)
            _check(v >= 1, f"parallel.{k}", f"must be >= 1, got {v!r}")
        _check(self.world_size is None or self.world_size >= 1,
               "parallel.world_size", f"must be null or >= 1, got {self.world_size!r}")


LOSSES = ("softmax", "sigmoid")
LOSS_IMPLS = ("all_gather", "ring")
SIGMOID_BIAS_INIT = -10.0  # SigLIP's b at initialisation (big_vision, vmoe's contrastive project)


@dataclass(kw_only=True)
class ImageTowerInit:
    """``train.image_tower``: start the image tower from an exported model and, LiT-style (Zhai et
    al. 2022, open_clip's ``--lock-image``), lock it: its parameters get no gradient, no optimizer
    state and no weight decay, and stay bitwise as exported. A path alone means ``{"init": path}``."""

    init: str
    """An exported directory (tools/convert_checkpoint.py export) of a one- or two-tower model whose
    image tower (patch and position embedding, blocks, final norm, pooling, image head) has the
    configured image tower's shape: width, depth, heads, MLP, patches, embed_dim, experts, MoE layers."""
    lock: bool = True
    """Lock the image tower (False: only initialise it from ``init``, then train it)."""
    unlocked_groups: int = 0
    """With ``lock``: the last N of the tower's groups stay trainable (open_clip's
    ``--lock-image-unlocked-groups``). The groups, first to last: the embeddings (patch, position),
    blocks 0 .. depth-2, the last block with the final norm, the pooling with the image head."""
    dropless: bool = False
    """With ``lock``: the locked tower's MoE layers route dropless and without router noise, as
    ``load_pretrained`` does (each image's embedding is independent of its batch; compute varies per
    batch). Default false: they route at the configured capacity with noise, as in its training."""

    expects = "a path (an exported directory) or a mapping with 'init'"
    check_key = "train.image_tower"

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        return {"init": value} if isinstance(value, str) else value

    def __post_init__(self) -> None:
        _check(bool(self.init), "train.image_tower.init", "must be an exported directory")
        _check(self.unlocked_groups >= 0, "train.image_tower.unlocked_groups",
               f"must be >= 0, got {self.unlocked_groups}")
        _check(self.lock or (self.unlocked_groups == 0 and not self.dropless), "train.image_tower",
               "unlocked_groups and dropless apply to a locked tower; set lock=true or drop them")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int
    """Optimizer steps to train for (the LR schedule's length too)."""
    seed: int = 0
    """Seeds model init and router noise (per rank: seed + rank)."""
    run_dir: str = "runs/default"
    """Checkpoints, TensorBoard logs, metrics.jsonl and the resolved config go here."""
    save_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older complete ones are deleted after a successful save."""
    log_every: int = 10
    max_consecutive_nonfinite: int = 5
    """A non-finite loss skips the step; this many in a row stops the run."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (same router noise: RNG state is replayed)."""
    loss: str = "softmax"
    """The contrastive loss: 'softmax' (CLIP's symmetric InfoNCE, LIMoE's) or 'sigmoid' (SigLIP's
    pairwise loss with a learned bias, ``model.logit_bias_init``, -10 unless given). A classifier
    (``model.num_classes``, V-MoE): softmax cross-entropy, or per-class sigmoid cross-entropy."""
    loss_impl: str = "all_gather"
    """How the sigmoid loss reaches the other ranks' captions: 'all_gather' (B x W*B logits per
    rank) or 'ring' (the captions travel rank to rank, B x B at a time). Both exact."""
    image_tower: ImageTowerInit | None = None
    """Start the image tower from an export and lock it (LiT); two-tower models only. None = train
    from scratch."""
    watchdog_seconds: float = 600.0
    """A rank with no progress for this long (a hung data read, a stuck collective) ends the run
    with one error line naming its rank, step and wait (exit status 70); building the run, loading
    and saving checkpoints and evaluations get 4 times as long (limoe_ds.runtime.watchdog). 0 = off."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps!r}")
        for k in ("save_every", "log_every", "max_consecutive_nonfinite", "keep_last"):
            v = getattr(self, k)
            _check(v >= 0, f"train.{k}", f"must be >= 0, got {v!r}")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.loss in LOSSES, "train.loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        _check(self.loss_impl in LOSS_IMPLS, "train.loss_impl",
               f"must be one of {list(LOSS_IMPLS)}, got {self.loss_impl!r}")
        _check(self.loss_impl == "all_gather" or self.loss == "sigmoid", "train.loss_impl",
               f"{self.loss_impl!r} is a form of the sigmoid loss (train.loss=sigmoid); the softmax loss "
               f"normalises over all captions and uses 'all_gather'")
        _check(self.watchdog_seconds >= 0, "train.watchdog_seconds",
               f"must be a number of seconds >= 0 (0 = off), got {self.watchdog_seconds!r}")


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 0
    """Held-out contrastive loss every N steps (0 = only at the end)."""
    batch_size: int = 64
    """Per-rank evaluation batch size."""
    max_batches: int = 0
    """Cap on validation batches per evaluation (0 = the whole split)."""
    zero_shot: list[str] = field(default_factory=list)
    """Zero-shot classification sets (directories written by tools/build_mini_dataset.py: labelled
    image shards, classnames.txt, templates.txt, info.json)."""
    zero_shot_max_images: int = 0
    """Cap on the images of each zero-shot set per evaluation (0 = the whole set): the first records
    of each shard (of a class tree, the first files), the same images whatever the number of ranks.
    For quick evaluations; results on a capped set are not comparable with the whole set's."""
    compositional: list[str] = field(default_factory=list)
    """Compositional evaluations on held-out attribute combinations, drawn on the fly (no files):
    procedural source names, e.g. ["synthetic:scenes"] (limoe_ds.data.synthetic; docs/EVALUATION.md)."""
    compositional_scenes: int = 1000
    """Held-out scenes per compositional evaluation (half one object, half two)."""

    def __post_init__(self) -> None:
        for k in ("every", "batch_size", "max_batches", "zero_shot_max_images"):
            v = getattr(self, k)
            _check(v >= 0, f"eval.{k}", f"must be >= 0, got {v!r}")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        for i, name in enumerate(self.compositional):
            _check(is_synthetic(name), f"eval.compositional[{i}]",
                   f"must be a procedural source name such as 'synthetic:scenes', got {name!r}")
            check_synthetic_name(name, f"eval.compositional[{i}]")
        _check(len(set(self.compositional)) == len(self.compositional), "eval.compositional",
               f"lists a source twice: {self.compositional}")
        _check(self.compositional_scenes >= 2, "eval.compositional_scenes",
               f"must be >= 2 (one scene of each kind), got {self.compositional_scenes}")


WANDB_MODES = ("offline", "online", "disabled")


@dataclass(kw_only=True)
class WandbConfig:
    """``logging.wandb``: Weights & Biases beside TensorBoard (rank 0): every metrics.jsonl row,
    the expert figures and the alarms. ``offline`` (the default) writes the run under
    ``RUN_DIR/wandb`` and sends nothing (``wandb sync`` uploads it later); ``online`` needs the
    network and a login. A run resumed in the same run directory continues the same W&B run id."""

    project: str
    mode: str = "offline"
    entity: str | None = None
    name: str | None = None
    """The W&B run name; None: the run directory's name."""
    tags: list[str] = field(default_factory=list)

    check_key = "logging.wandb"

    def __post_init__(self) -> None:
        _check(bool(self.project.strip()), "logging.wandb.project", "must be a non-empty name")
        _check(self.mode in WANDB_MODES, "logging.wandb.mode", f"must be one of {', '.join(WANDB_MODES)}, "
               f"got {self.mode!r}")
        import importlib.util
        _check(self.mode == "disabled" or importlib.util.find_spec("wandb") is not None, "logging.wandb",
               "the wandb package is not installed: pip install wandb (or drop logging.wandb)")


@dataclass(kw_only=True)
class RouterCollapseConfig:
    """``logging.router_collapse``: the alarm that watches each log window's routing statistics
    (limoe_ds.moe.collapse) and warns when a modality's routing collapses in a MoE layer."""

    enabled: bool = True
    min_experts: dict[str, float] | float | None = field(
        default=None, metadata={"expects": "a number (both modalities), a mapping {\"image\": number, "
                                           "\"text\": number} or null"})
    """Warn when a modality's effective experts, exp(entropy of its mean routing), fall below this;
    None (or a modality left out) = that layer's S_m (model.moe.global_entropy_min_experts); 0 = never."""
    min_success: float = 0.5
    """Warn when a modality's routing success (tokens kept / routed) falls below this; 0 = never."""
    windows: int = 3
    """... for this many consecutive log windows (train.log_every steps each)."""

    def __post_init__(self) -> None:
        given = self.min_experts
        if given is not None and not isinstance(given, Mapping):
            given = {m: given for m in MODALITIES}
        if given is not None:
            unknown = set(given) - set(MODALITIES)
            _check(not unknown, "logging.router_collapse.min_experts",
                   f"unknown modality {sorted(unknown)}; use 'image' and/or 'text'")
            for m, v in given.items():
                _check(v >= 0, f"logging.router_collapse.min_experts.{m}", f"must be >= 0 (0 = never), got {v}")
            given = {m: float(v) for m, v in given.items()}
        self.min_experts = given
        _check(0 <= self.min_success <= 1, "logging.router_collapse.min_success",
               f"must be in [0, 1] (0 = never), got {self.min_success}")
        _check(self.windows >= 1, "logging.router_collapse.windows", f"must be >= 1, got {self.windows}")


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True
    router_collapse: RouterCollapseConfig = field(default_factory=RouterCollapseConfig)
    """The router-collapse alarm (docs/TRAINING.md)."""
    wandb: WandbConfig | None = None
    """Weights & Biases logging beside TensorBoard (None: off)."""


@dataclass(kw_only=True)
class RunConfig:
    """The resolved "limoe" block plus the DeepSpeed keys it was checked against."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig
    tokenizer: str | None = None
    """Path to tokenizer.json (tools/train_tokenizer.py); its vocabulary must fit model.vocab_size.
    Required unless the model reads captions as pixels (model.text_input='pixels', CLIPPO)."""
    train: TrainConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """The DeepSpeed JSON without the "limoe" block, batch keys and schedule completed."""

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        """k micro-batches per optimizer step (gradient caching when k > 1)."""
        return int(self.deepspeed.get("gradient_accumulation_steps", 1))

    @property
    def rank_batch_size(self) -> int:
        """Image-text pairs per rank per optimizer step: micro-batch x k (the loader's batch)."""
        return self.micro_batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        ds = d.pop("deepspeed")
        return {**ds, "limoe": d}


_SECTIONS = {f.name for f in dataclasses.fields(RunConfig)} - {"deepspeed"}


def model_config(d: Mapping[str, Any]) -> ModelConfig:
    """The \"limoe\" block's model section: a preset (``preset``) with overrides (``moe`` merged key by key),
    or a full model config."""
    _check(isinstance(d, Mapping), "model", f"must be a mapping (a section), got {typed.show(d)}; "
           "give {\"preset\": \"tiny\"} or the full model config")
    d = dict(d)
    preset = d.get("preset")
    _check(preset is None or isinstance(preset, str), "model.preset",
           f"must be a preset name (a string), got {typed.show(preset)}; e.g. \"tiny\"")
    preset = d.pop("preset", None)
    try:
        if preset is None:
            return config_from_dict(d)
        base = get_preset(preset).to_dict()
        if isinstance(d.get("moe"), Mapping) and base.get("moe") is not None:
            d["moe"] = _merge_moe(base["moe"], d["moe"])
        if isinstance(d.get("text_tower"), Mapping) and base.get("text_tower") is not None:
            # a two-tower preset's text tower, key by key (and its moe section too)
            text, given = dict(base["text_tower"]), dict(d["text_tower"])
            if isinstance(given.get("moe"), Mapping) and text.get("moe") is not None:
                given["moe"] = _merge_moe(text["moe"], given["moe"])
            d["text_tower"] = {**text, **given}
        return config_from_dict({**base, **d})
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(("model", "moe")) else f"model: {msg}") from None


def _merge_moe(preset: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's moe section with the given keys on top; the preset's S_m were derived from ITS
    expert counts: a new count (without S_m given) derives them for the new one."""
    moe = dict(preset)
    if {"num_experts", "text_experts"} & set(given) and "global_entropy_min_experts" not in given:
        moe["global_entropy_min_experts"] = None
    return {**moe, **given}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to the "limoe" block (``ds.KEY=value`` targets DeepSpeed's keys)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        _check("=" in item, "--set", f"expected KEY=VALUE, got {item!r}")
        dotted, value = item.split("=", 1)
        path = dotted.split(".")
        node = raw if path[0] == "ds" else raw.setdefault("limoe", {})
        path = path[1:] if path[0] == "ds" else path
        _check(all(path), "--set", f"bad key {dotted!r}")
        for p in path[:-1]:
            node = node.setdefault(p, {})
            _check(isinstance(node, dict), "--set", f"{dotted}: {p} is not a section")
        node[path[-1]] = yaml.safe_load(value) if value else ""
    return raw


def _check_batch_keys(ds: dict[str, Any], dp: int) -> None:
    """train_batch_size = micro * grad_accum * dp, stated once: missing keys are derived."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps", 1)
    _check(isinstance(micro, int) and micro >= 1, "train_micro_batch_size_per_gpu",
           "must be set to an int >= 1 (per-rank batch of image-text pairs)")
    # A contrastive loss needs all negatives in one step: plain accumulation would change the loss
    # (each micro-batch would see only its own negatives). gradient_accumulation_steps=k > 1 is
    # gradient caching instead (train.engine.grad_cached_step): the loss over all k micro-batches.
    _check(isinstance(gas, int) and not isinstance(gas, bool) and gas >= 1, "gradient_accumulation_steps",
           f"must be an int >= 1 (k > 1: gradient caching over k micro-batches), got {typed.show(gas)}")
    expected = micro * gas * dp
    got = ds.get("train_batch_size", expected)
    _check(got == expected, "train_batch_size",
           f"{got} != train_micro_batch_size_per_gpu ({micro}) x gradient_accumulation_steps ({gas}) x "
           f"data-parallel size ({dp}) = {expected}; fix one of them or drop train_batch_size")
    ds["train_batch_size"], ds["gradient_accumulation_steps"] = expected, gas


def _check_schedule(ds: dict[str, Any], steps: int) -> None:
    sched = ds.get("scheduler")
    if not sched:
        return
    params = sched.setdefault("params", {})
    total = params.get("total_num_steps")
    if total is None:
        if sched.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
            params["total_num_steps"] = steps
    else:
        _check(total == steps, "scheduler.params.total_num_steps",
               f"{total} != train.steps ({steps}); drop it (it is derived from train.steps) or make them equal")
    # Types and ranges: config.ds_keys; unset, DeepSpeed warms up for its default 1000 steps.
    default = dataclasses.fields(ds_keys.SCHEDULERS[sched["type"]])
    warm = params.get("warmup_num_steps", next(f.default for f in default if f.name == "warmup_num_steps"))
    _check(warm <= steps, "scheduler.params.warmup_num_steps",
           f"must be <= train.steps ({steps}), got {warm}" + ("" if "warmup_num_steps" in params else
                                                             " (DeepSpeed's default when it is not set)")
           + "; set a shorter warmup or train longer")


def _check_zero(ds: dict[str, Any], ep: int) -> None:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    _check(stage in (0, 1, 2), "zero_optimization.stage",
           f"{stage} is not supported: DeepSpeed's native MoE refuses ZeRO-3; use stage 1 or 2")
    problem = zero0_clipping_problem(ds, ep)
    _check(problem is None, "zero_optimization.stage", problem or "")


def _check_paths(cfg: RunConfig) -> None:
    _check(len(cfg.data.train) > 0, "data.train", "no training data; set data.train=/path/to/shards "
           "(the bundled set: python tools/build_mini_dataset.py, then data/mini/train)")
    for i, src in enumerate(cfg.data.train):
        _check_path_exists(src.paths, f"data.train[{i}]")
    if cfg.data.val is not None:
        _check_path_exists(cfg.data.val.paths, "data.val")
    for i, z in enumerate(cfg.eval.zero_shot):
        _check(Path(z, "classnames.txt").is_file(), f"eval.zero_shot[{i}]",
               f"{z!r} is not a zero-shot set (no classnames.txt); build one with tools/build_mini_dataset.py")
    _check(cfg.tokenizer is None or Path(cfg.tokenizer).is_file(), "tokenizer",
           f"{cfg.tokenizer!r} does not exist; train one with tools/train_tokenizer.py")


def _check_path_exists(paths: list[str], key: str) -> None:
    from limoe_ds.data.sources import expand_path
    for p in paths:
        if is_synthetic(p):  # a procedural source: drawn on the fly, no file (its name was checked)
            continue
        _check(any(os.path.exists(q) for q in expand_path(p)), key, f"{p!r} matches no file or directory")


def resolve(raw: dict[str, Any], *, world_size: int, check_paths: bool = True) -> RunConfig:
    """Validate a DeepSpeed JSON with its "limoe" block for ``world_size`` ranks."""
    _check(isinstance(raw, Mapping), "--deepspeed_config", "must be a JSON object (see ds_configs/tiny.json)")
    raw = copy.deepcopy(dict(raw))
    block = raw.pop("limoe", None)
    _check(isinstance(block, Mapping), "limoe",
           "the DeepSpeed config needs a \"limoe\" block (see ds_configs/tiny.json)")
    unknown = sorted(str(k) for k in set(block) - _SECTIONS)
    _check(not unknown, f"limoe.{unknown[0] if unknown else ''}",
           f"unknown section; valid ones are {sorted(_SECTIONS)}")
    sections: dict[str, Any] = {}
    annotations = typed.hints(RunConfig)
    for f in dataclasses.fields(RunConfig):  # every section type-checked against its annotation
        if f.name == "deepspeed":
            continue
        if f.name not in block:
            _check(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                   f"limoe.{f.name}", "is required")
            continue
        sections[f.name] = (model_config(block["model"]) if f.name == "model" else
                            typed.convert(annotations[f.name], block[f.name], f.name))
    cfg = RunConfig(**sections, deepspeed=raw)
    _check_loss(cfg)
    check_image_tower(cfg, check_paths)
    _check_router_collapse(cfg)
    if cfg.model.classifier:
        _check(cfg.tokenizer is None, "tokenizer",
               "a classifier (model.num_classes, V-MoE) reads image labels (.cls), not captions; drop the key")
    elif cfg.model.pixels:
        _check(cfg.tokenizer is None, "tokenizer",
               "a CLIPPO model (model.text_input='pixels') renders its captions and has no tokenizer; drop the key")
    else:
        _check(cfg.tokenizer is not None, "tokenizer",
               "is required; give the path of a tokenizer.json (tools/train_tokenizer.py; the bundled one: "
               "data/mini/tokenizer.json)")
    ds_keys.check(raw)
    train, parallel = cfg.train, cfg.parallel
    _check_layout(cfg, world_size)
    dp = world_size // parallel.tensor_parallel_size
    _check_batch_keys(raw, dp)
    if cfg.model.classifier:
        _check_classifier(cfg)
    _check_schedule(raw, train.steps)
    _check_zero(raw, parallel.expert_parallel_size)
    if check_paths:
        _check_paths(cfg)
    return cfg


def _check_loss(cfg: RunConfig) -> None:
    """The sigmoid loss trains a bias (model.logit_bias_init, SigLIP's -10 unless given); the softmax
    loss has none, so a bias given with it is a mistake, not a parameter to carry silently."""
    if cfg.model.classifier:  # V-MoE: softmax or sigmoid cross-entropy on class logits, no pair bias
        return
    if cfg.train.loss == "sigmoid":
        if cfg.model.logit_bias_init is None:
            cfg.model.logit_bias_init = SIGMOID_BIAS_INIT
        return
    _check(cfg.model.logit_bias_init is None, "model.logit_bias_init",
           f"is the sigmoid loss's bias, but train.loss is {cfg.train.loss!r}; set train.loss=sigmoid or drop it")


def _check_classifier(cfg: RunConfig) -> None:
    """A classifier (V-MoE, model.num_classes) trains on labelled images: no captions to encode, no
    text prompts to score."""
    _check(not cfg.eval.zero_shot, "eval.zero_shot",
           "a classifier has no text tower to score prompts; its held-out top-1 is data.val's (drop the key)")
    _check(not cfg.eval.compositional, "eval.compositional",
           "a classifier has no text tower to score captions; drop the key")
    _check(cfg.train.loss_impl == "all_gather", "train.loss_impl",
           "a classifier's cross-entropy is per sample and needs no exchange; drop the key")


def _check_router_collapse(cfg: RunConfig) -> None:
    """More effective experts than the model has would be an alarm at every window."""
    moe = cfg.model.any_moe
    for m, v in (cfg.logging.router_collapse.min_experts or {}).items():
        E = moe.pool_experts(m) if moe else 0
        key = "text_experts" if moe and E != moe.num_experts else "num_experts"
        _check(moe is None or v <= E, f"logging.router_collapse.min_experts.{m}",
               f"must be <= model.moe.{key}={E} (a modality spread evenly over every expert of its pool has "
               f"that many effective experts), got {v:g}")


IMAGE_TOWER_KEYS = ("image_size", "patch_size", "channels", "width", "depth", "num_heads", "mlp_dim", "pooling",
                    "embed_dim")
"""The model fields that shape the image tower's parameters (with its experts and MoE layers)."""


def check_image_tower(cfg: RunConfig, check_paths: bool) -> None:
    """LiT needs two towers (a one-tower model's blocks also encode the text) and an export whose
    image tower has the configured shape: one line naming the first mismatch, before any process
    group starts."""
    init = cfg.train.image_tower
    if init is None:
        return
    _check(cfg.model.two_tower, "train.image_tower",
           "needs a two-tower model (model.text_tower, e.g. model.preset=tiny-2t): in one tower the blocks "
           "encode the text too")
    groups = cfg.model.depth + 2
    _check(init.unlocked_groups <= groups, "train.image_tower.unlocked_groups",
           f"the image tower has {groups} groups (embeddings, {cfg.model.depth - 1} blocks, last block + norm, "
           f"pooling + head), got {init.unlocked_groups}")
    _check(not init.dropless or cfg.model.moe is not None, "train.image_tower.dropless",
           "the image tower has no MoE layers to route dropless")
    if not check_paths:
        return
    config_json = Path(init.init, "config.json")
    _check(config_json.is_file() and Path(init.init, "model.safetensors").is_file(), "train.image_tower.init",
           f"{init.init!r} is not an exported model (no config.json and model.safetensors); make one with "
           f"tools/convert_checkpoint.py export")
    try:
        src = model_config(json.loads(config_json.read_text()))
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"train.image_tower.init: {config_json} is not a model config ({e})") from None
    problem = image_tower_mismatch(src, cfg.model)
    _check(problem is None, "train.image_tower.init", f"{init.init}: {problem}; the image tower must match the export")


def image_tower_mismatch(src: ModelConfig, want: ModelConfig) -> str | None:
    """The first difference between two models' image towers that changes a parameter's shape."""
    for k in IMAGE_TOWER_KEYS:
        a, b = getattr(src, k), getattr(want, k)
        if a != b:
            return f"its {k} is {a!r}, model.{k} is {b!r}"
    experts = [m.num_experts if m is not None else None for m in (src.moe, want.moe)]
    if experts[0] != experts[1]:
        return (f"its image tower has {experts[0] or 'no'} experts per MoE layer, the configured one "
                f"{experts[1] or 'none'}")
    layers = [[i for i in range(c.depth) if c.is_moe_layer(i)] for c in (src, want)]
    if layers[0] != layers[1]:
        return f"its MoE layers are blocks {layers[0]}, the configured image tower's are {layers[1]}"
    return None


def _check_layout(cfg: RunConfig, world_size: int) -> None:
    from limoe_ds.parallel.layout import check_model_layout  # pure, but its package imports torch
    tp, ep = cfg.parallel.tensor_parallel_size, cfg.parallel.expert_parallel_size
    want = cfg.parallel.world_size
    _check(want is None or want == world_size, "parallel.world_size",
           f"this config is written for {want} ranks but {world_size} were launched; launch {want} "
           f"(e.g. deepspeed --num_gpus/--num_nodes) or --set parallel.world_size={world_size} "
           f"after checking the batch")
    problems = check_model_layout(world_size, tp=tp, ep=ep, model=cfg.model)
    if problems:
        key, message = problems[0]
        raise ConfigError(f"{key}: {message}")


def load(path: str | os.PathLike, overrides: list[str] | None = None, *, world_size: int,
         check_paths: bool = True) -> RunConfig:
    p = Path(path)
    _check(p.is_file(), "--deepspeed_config", f"{str(p)!r} does not exist")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config: {p} is not valid JSON ({e})") from None
    _check(isinstance(raw, dict), "--deepspeed_config",
           f"{p} holds a JSON {type(raw).__name__}, not an object; a DeepSpeed config is {{...}} "
           f"(see ds_configs/tiny.json)")
    return resolve(apply_overrides(raw, overrides or []), world_size=world_size, check_paths=check_paths)
