"""What a run reports: rank 0's output, TensorBoard + metrics.jsonl, and every metric name.

Metric names are made here and nowhere else: ``loss/total``, ``loss/contrastive`` (a classifier's
``loss/xent``), ``aux/<aux key>`` (``moe.stats.aux_key``), ``routing/layerL/<modality>/<quantity>``,
``train/...`` (``train/logit_bias`` with the sigmoid loss), ``data/skipped/<reason>``,
``memory/max_allocated_gib``; evaluation keys are ``<mode>/...`` (``limoe_ds.eval.run.evaluate``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from limoe_ds.config.model import MODALITIES
from limoe_ds.moe import stats

ROUTING_QUANTITIES = ("success_rate", "dropped_tokens", "entropy_of_mean")
"""Per MoE layer and modality, from ``RoutingStats.summary`` (logged every window)."""


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    """The project's own output: rank 0 only."""
    if is_main():
        print(msg, flush=True)


def loss_metrics(loss: float, contrastive: float, aux: dict[str, float], task: str = "contrastive") -> dict[str, float]:
    """One step's losses by metric name (a classifier's task loss is ``loss/xent``)."""
    return {"loss/total": loss, f"loss/{task}": contrastive, **{f"aux/{k}": v for k, v in aux.items()}}


def routing_metrics(summary: dict[str, dict]) -> dict[str, float]:
    """``stats.summarize`` output -> {'routing/layer3/image/success_rate': ..., ...}."""
    return {f"routing/{layer}/{m}/{q}": s[m][q] for layer, s in summary.items() for m in MODALITIES
            if s[m]["routed_tokens"] for q in ROUTING_QUANTITIES}  # a classifier routes no text


def success_rates(summary: dict[str, dict]) -> dict[str, float]:
    """{'layer3/image': routing success rate, ...} for the run summary."""
    return {f"{layer}/{m}": round(s[m]["success_rate"], 4) for layer, s in summary.items() for m in MODALITIES
            if s[m]["routed_tokens"]}


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: the same on every resume of the run (16 hex digits)."""
    import hashlib
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class MetricsLog:
    """TensorBoard scalars + metrics.jsonl (+ Weights & Biases with ``wandb``), rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb=None, config: dict | None = None) -> None:
        self.enabled = is_main()
        self.writer = self.wandb = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            if wandb is not None and wandb.mode != "disabled":
                import os
                import wandb as wb
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wb.init(project=wandb.project, entity=wandb.entity, name=wandb.name or run_dir.name,
                                     tags=list(wandb.tags), mode=wandb.mode, dir=str(run_dir),
                                     id=wandb_run_id(run_dir), resume="allow", config=config or {})

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        finite = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for k, v in finite.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(finite, step=step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A TensorBoard text entry (the run's warnings: limoe_ds.moe.collapse)."""
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def write_images(self, step: int, images: dict) -> None:
        """Pillow images as TensorBoard image summaries (HWC uint8)."""
        if self.writer is not None:
            import numpy as np
            for tag, img in images.items():
                self.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None and images:
            import wandb as wb
            self.wandb.log({tag: wb.Image(img.convert("RGB")) for tag, img in images.items()}, step=step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                import wandb as wb
                self.wandb.finish()
                wb.teardown()  # stop W&B's service process (a test process outlives the run)
                self.wandb = None


@dataclass
class Window:
    """What happened since the last log line (summed over steps; routing counts summed over ranks later)."""

    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    routing: stats.Totals = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, r) -> None:
        """One step's ``engine.StepResult``."""
        self.steps += 1
        for k, v in loss_metrics(r.loss, r.contrastive, r.aux, r.task).items():
            self.losses[k] = self.losses.get(k, 0.0) + v
        stats.accumulate(self.routing, r.routing)
