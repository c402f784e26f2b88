"""The DeepSpeed keys limoe_ds depends on, as typed sections checked by ``limoe_ds.config.typed``.

DeepSpeed 0.19.8 reads its JSON only inside ``deepspeed.initialize``, after every process group has
started, and a wrong value there is a traceback on every rank (``"lr": "0.001"``, a negative lr or
clipping, an unknown optimizer parameter: a TypeError in the optimizer's constructor) or a silently
different run (``"enabled": "false"`` is truthy). These sections mirror what DeepSpeed takes, with
its defaults (``runtime/config.py``, ``runtime/engine.py::_configure_basic_optimizer``,
``runtime/lr_schedules.py``), so that ``run.resolve`` checks them first with one-line messages
naming the key as the user writes it (``optimizer.params.lr``). Nothing here is passed on:
DeepSpeed gets the user's dict unchanged (plus the derived batch and schedule keys).

Blocks marked ``open_keys`` (the top level, ``bf16``, ``fp16``, ``zero_optimization``) have many
more keys in DeepSpeed; only the fields below are checked there, the rest is DeepSpeed's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from limoe_ds.config.errors import check as _check
from limoe_ds.config.typed import build

OPTIMIZERS = ("Adam", "AdamW")
"""DeepSpeed's own Adam family (FusedAdam, or torch.optim.Adam(W) with torch_adam); the name is
case-insensitive in DeepSpeed. train/engine.py gives it the decay / no-decay / expert groups."""
WARMUP_TYPES = ("log", "linear")


@dataclass(kw_only=True)
class AdamParams:
    """``optimizer.params`` of Adam / AdamW: the keys both FusedAdam and torch.optim.AdamW accept."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    torch_adam: bool = False
    """DeepSpeed's switch: torch.optim.Adam(W) instead of its fused kernel."""
    adam_w_mode: bool = True
    """DeepSpeed's switch: decoupled weight decay (AdamW) for type Adam too."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optimizer.params.lr", f"must be > 0, got {self.lr}; give a learning rate such as 0.001")
        for i, b in enumerate(self.betas):
            _check(0 <= b < 1, f"optimizer.params.betas[{i}]", f"must be in [0, 1), got {b}; e.g. [0.9, 0.98]")
        _check(self.eps > 0, "optimizer.params.eps", f"must be > 0, got {self.eps}; e.g. 1e-6")
        _check(self.weight_decay >= 0, "optimizer.params.weight_decay",
               f"must be >= 0, got {self.weight_decay}; 0 disables weight decay")


@dataclass(kw_only=True)
class OptimizerKeys:
    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.type.lower() in (o.lower() for o in OPTIMIZERS), "optimizer.type",
               f"{self.type!r} is not supported by limoe_ds; use one of {list(OPTIMIZERS)}")
        build(AdamParams, self.params, "optimizer.params")


@dataclass(kw_only=True)
class WarmupLRParams:
    """``scheduler.params`` of WarmupLR (lr_schedules.py: warmup, then constant)."""

    warmup_min_lr: float = 0.0
    warmup_max_lr: float | None = None
    """None = the optimizer's lr."""
    warmup_num_steps: int = 1000
    warmup_type: str = "log"

    def __post_init__(self) -> None:
        _check(self.warmup_min_lr >= 0, "scheduler.params.warmup_min_lr", f"must be >= 0, got {self.warmup_min_lr}")
        _check(self.warmup_max_lr is None or self.warmup_max_lr > 0, "scheduler.params.warmup_max_lr",
               f"must be > 0, got {self.warmup_max_lr}; e.g. the optimizer's lr")
        _check(self.warmup_num_steps >= 1, "scheduler.params.warmup_num_steps",
               f"must be >= 1 (DeepSpeed refuses 0), got {self.warmup_num_steps}")
        _check(self.warmup_type in WARMUP_TYPES, "scheduler.params.warmup_type",
               f"must be one of {list(WARMUP_TYPES)}, got {self.warmup_type!r}")


@dataclass(kw_only=True)
class WarmupDecayLRParams(WarmupLRParams):
    """``scheduler.params`` of WarmupDecayLR (warmup, then linear decay to 0 at total_num_steps)."""

    warmup_max_lr: float | None = 0.001
    total_num_steps: int | None = None
    """None = train.steps (run.resolve fills it in)."""


@dataclass(kw_only=True)
class WarmupCosineLRParams:
    """``scheduler.params`` of WarmupCosineLR (ratios of the optimizer's lr)."""

    total_num_steps: int | None = None
    """None = train.steps (run.resolve fills it in)."""
    warmup_min_ratio: float = 0.0
    warmup_num_steps: int = 1000
    cos_min_ratio: float = 0.0001
    warmup_type: str = "log"

    def __post_init__(self) -> None:
        for k in ("warmup_min_ratio", "cos_min_ratio"):
            v = getattr(self, k)
            _check(0 <= v <= 1, f"scheduler.params.{k}", f"must be in [0, 1] (a ratio of the lr), got {v}")
        _check(self.warmup_num_steps >= 1, "scheduler.params.warmup_num_steps",
               f"must be >= 1 (DeepSpeed refuses 0), got {self.warmup_num_steps}")
        _check(self.warmup_type in WARMUP_TYPES, "scheduler.params.warmup_type",
               f"must be one of {list(WARMUP_TYPES)}, got {self.warmup_type!r}")


SCHEDULERS = {"WarmupLR": WarmupLRParams, "WarmupDecayLR": WarmupDecayLRParams,
              "WarmupCosineLR": WarmupCosineLRParams}
"""scheduler.type (case-sensitive in DeepSpeed) -> its params."""


@dataclass(kw_only=True)
class SchedulerKeys:
    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.type in SCHEDULERS, "scheduler.type",
               f"{self.type!r} is not supported by limoe_ds; use one of {list(SCHEDULERS)} (or no scheduler)")
        build(SCHEDULERS[self.type], self.params, "scheduler.params")


@dataclass(kw_only=True)
class PrecisionKeys:
    open_keys = True
    enabled: bool = False


@dataclass(kw_only=True)
class ZeroKeys:
    open_keys = True
    stage: int = 0


@dataclass(kw_only=True)
class DeepSpeedKeys:
    """The top level of the DeepSpeed JSON (without the "limoe" block)."""

    open_keys = True
    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int = 1
    optimizer: OptimizerKeys
    """Required: limoe_ds builds no optimizer of its own (train/engine.py)."""
    scheduler: SchedulerKeys | None = None
    gradient_clipping: float = 0.0
    bf16: PrecisionKeys = field(default_factory=PrecisionKeys)
    fp16: PrecisionKeys = field(default_factory=PrecisionKeys)
    zero_optimization: ZeroKeys = field(default_factory=ZeroKeys)

    def __post_init__(self) -> None:
        _check(self.gradient_clipping >= 0, "gradient_clipping",
               f"must be >= 0, got {self.gradient_clipping}; 0 disables clipping")
        _check(not (self.bf16.enabled and self.fp16.enabled), "fp16.enabled",
               "bf16.enabled and fp16.enabled are both true; enable one of them")


def check(ds: dict[str, Any]) -> DeepSpeedKeys:
    """Type- and range-check the DeepSpeed keys of ``ds`` (the JSON without "limoe"); ConfigError."""
    _check(ds.get("scheduler", {}) is not None, "scheduler",  # DeepSpeed calls null.keys()
           "must be a mapping (a section), got null; leave the key out for no scheduler")
    return build(DeepSpeedKeys, ds, "")


__all__ = ["DeepSpeedKeys", "OPTIMIZERS", "SCHEDULERS", "check"]
