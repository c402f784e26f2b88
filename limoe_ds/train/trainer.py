"""The training loop: a ``Trainer`` holds one run (layout, engine, data, evaluator) and its loop state.

``train(cfg, rank=, world=)`` builds a Trainer, trains (resuming per ``resume``), evaluates and
returns the run summary; the entry point is ``limoe_ds.train.cli``. On SIGUSR1 or SIGTERM (a
``StopFlag``) it saves a checkpoint at the next step boundary and raises ``Preempted``
(``limoe_ds.runtime.preemption``), for a batch script to requeue.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from limoe_ds import parallel
from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.config.errors import ConfigError
from limoe_ds.config.run import RunConfig
from limoe_ds.data import build_eval_loader, build_train_loader
from limoe_ds.data.render import text_encoder
from limoe_ds.model import build_model, lit
from limoe_ds.pretrained import load_image_tower
from limoe_ds.moe import collapse, stats
from limoe_ds.parallel.collectives import mean_over_ranks, sum_over_ranks
from limoe_ds.runtime.preemption import Preempted, StopFlag
from limoe_ds.runtime.watchdog import Watchdog
from limoe_ds.train import engine as ds_engine
from limoe_ds.train.logging import MetricsLog, Window, is_main, log, routing_metrics, success_rates


@dataclass
class Evaluator:
    """Held-out pairs (loss, retrieval) and zero-shot sets, dropless and at the training capacity;
    with ``figures``, also the expert figures of the dropless validation pass (drawn on rank 0)."""

    val_loader: object
    zero_shot_sets: list
    tokenizer: object
    layout: object
    max_batches: int
    zero_shot_max_images: int = 0
    figures: bool = False
    figure_images: int = 4
    """Validation images in the patch->expert overlays."""
    compositional_sets: list = field(default_factory=list)
    """data.synthetic.CompositionalSet per eval.compositional entry (drawn once, kept for every evaluation)."""

    def __call__(self, model) -> tuple[dict[str, float], dict]:
        """-> (scalars, {tag: Pillow image}); the images only on rank 0, the routing counts behind them
        summed on every rank (config-wide condition: every rank runs the same collectives)."""
        from limoe_ds.eval.run import RoutingRecord, evaluate
        record = None
        if self.figures and self.val_loader is not None:
            record = RoutingRecord(sample_images=self.figure_images if is_main() else 0)
        scalars = evaluate(model, val_loader=self.val_loader, zero_shot_sets=self.zero_shot_sets,
                           compositional_sets=self.compositional_sets, tokenizer=self.tokenizer,
                           dp_rank=self.layout.dp_rank, dp_size=self.layout.dp,
                           max_batches=self.max_batches, zero_shot_max_images=self.zero_shot_max_images,
                           record=record)
        if record is None or not is_main():
            return scalars, {}
        from limoe_ds.eval.figures import routing_figures
        return scalars, routing_figures(record.summary(), record.images_BCHW, record.experts_BI)


class Trainer:
    """One run of ``cfg`` on this rank: what it is built from, and where the loop stands."""

    def __init__(self, cfg: RunConfig, *, rank: int, world: int, stop: StopFlag | None = None,
                 watchdog: Watchdog | None = None) -> None:
        self.cfg, self.stop = cfg, stop
        self.watchdog = watchdog
        """Fed a heartbeat at every phase of the loop (limoe_ds.runtime.watchdog); None: no watchdog."""
        self._beat("building the run (model, engine, data)", kind="build", slow=True)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.layout = parallel.Layout(rank=rank, world_size=world, ep=cfg.parallel.expert_parallel_size,
                                      tp=cfg.parallel.tensor_parallel_size)
        parallel.setup(self.layout)
        self.tokenizer = text_encoder(cfg.model, cfg.tokenizer)
        """The captions' encoder: the tokenizer, a CLIPPO model's renderer (limoe_ds.data.render), or
        a classifier's labels (limoe_ds.data.labels)."""
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer: vocabulary {self.tokenizer.vocab_size} > model.vocab_size "
                              f"{cfg.model.vocab_size}; train a smaller tokenizer or raise model.vocab_size")
        self.engine, self.scheduler = self._engine()
        self.loader = self._loader(train=True)
        self.evaluator = self._evaluator()
        # the loop state
        self.start = self.step = 0
        self.nonfinite = 0
        """Non-finite losses in a row (train.max_consecutive_nonfinite stops the run)."""
        self.skipped_steps = 0
        self.losses: list[float] = []
        """Per-step contrastive losses of this process's run (the summary reports them)."""
        self.last_loss = math.nan
        """The total loss of the latest step (the progress bar shows it)."""
        self.window = Window()
        """What happened since the last log line; fit() starts a fresh one when the loop starts, so
        that its clock (samples/s) does not count building and resuming."""
        self.last_routing: dict[str, dict] = {}
        """The routing summary of the last logged window."""
        self.collapse = self._collapse_alarm()
        """Watches each window's routing summary (limoe_ds.moe.collapse); None: off or a dense model."""
        self.alarms: list[str] = []
        """The router-collapse warnings of this process's run (the summary reports them)."""
        self.metrics: MetricsLog | None = None
        self.samples_per_step = cfg.rank_batch_size * self.layout.dp
        self.tokens_per_sample = cfg.model.num_patches + cfg.model.text_positions

    def _beat(self, what: str, *, kind: str, slow: bool = False, step: int | None = None) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(what, step=getattr(self, "step", 0) if step is None else step, kind=kind, slow=slow)

    # -- building -----------------------------------------------------------------------------------
    def _engine(self):
        cfg, layout = self.cfg, self.layout
        model = build_model(cfg.model, ep_size=layout.ep, ep_rank=layout.ep_rank, seed=cfg.train.seed)
        init = cfg.train.image_tower
        if init is not None:  # LiT: the image tower from an export (a resume then loads the checkpoint's)
            n = load_image_tower(model, init.init)
            log(f"image tower from {init.init} ({n:,} values on this rank)")
        model = parallel.parallelize(model, layout)
        locked = lit.lock_image_tower(model, init)
        if locked:
            log(f"image tower locked: {len(locked)} parameters without gradients or optimizer state"
                + (f" (last {init.unlocked_groups} groups trainable)" if init.unlocked_groups else "")
                + (", MoE layers dropless" if init.dropless else ""))
        if cfg.train.activation_checkpointing:
            model.activation_checkpointing = True
        # router noise: independent per data-parallel rank, identical on tensor-parallel peers (they
        # must route their shared tokens the same way)
        torch.manual_seed(cfg.train.seed * 1000 + layout.dp_rank)
        return ds_engine.build_engine(model, cfg.deepspeed)

    def _loader(self, *, train: bool):
        cfg, layout = self.cfg, self.layout
        common = dict(image_size=cfg.model.image_size, tokenizer=self.tokenizer, text_len=cfg.model.text_len,
                      dp_rank=layout.dp_rank, dp_size=layout.dp)
        if train:
            # one batch per optimizer step: k micro-batches of gradient caching are its slices
            return build_train_loader(cfg.data, batch_size=cfg.rank_batch_size, **common)
        return build_eval_loader(cfg.data, batch_size=cfg.eval.batch_size, **common)

    def _evaluator(self) -> Evaluator:
        from limoe_ds.data.synthetic import compositional_set
        from limoe_ds.data.zeroshot import load_zeroshot_set
        cfg = self.cfg
        val_loader = self._loader(train=False) if cfg.data.val is not None else None
        zero_shot = [load_zeroshot_set(z) for z in cfg.eval.zero_shot]
        if cfg.model.pixels:  # a script the font cannot draw is named now, not found as gaps in the images
            from limoe_ds.data.render import coverage_problems
            prompts = [p for zs in zero_shot for ps in zs.prompts() for p in ps]
            for line in coverage_problems(self.tokenizer.renderer.coverage(prompts)):
                log(line)
        return Evaluator(val_loader, zero_shot, self.tokenizer, self.layout,
                         cfg.eval.max_batches, cfg.eval.zero_shot_max_images,
                         figures=cfg.logging.tensorboard and cfg.model.any_moe is not None,
                         compositional_sets=[compositional_set(c, cfg.eval.compositional_scenes)
                                             for c in cfg.eval.compositional])

    # -- checkpoints --------------------------------------------------------------------------------
    def resume(self, resume: str) -> dict | None:
        """Load model, optimizer and data position (``resume``: 'auto', 'none' or a checkpoint
        directory; every file verified first: 'auto' takes the newest checkpoint that verifies, with a
        warning naming a damaged newer one; a damaged explicit one is a CheckpointError naming the
        file and the fallback command, ``checkpoint.choose_resume``); the RNG state is returned for
        the caller to set once the data iterator exists (creating it draws from torch's RNG)."""
        if resume == "none":
            return None
        # every rank the same choice: verified by the ranks together; 'auto' falls back past a damaged one
        path, notes = checkpoint.choose_resume(self.ckpt_root, resume)
        for note in notes:
            if is_main():
                print(note, file=sys.stderr, flush=True)
        if path is None:
            return None
        self._beat(f"loading the checkpoint {path}", kind="save", slow=True)
        step, rank_state = checkpoint.load(self.engine, path, verified=True)
        self._lr_from_schedule()
        data = rank_state.get("data")
        if data is None:
            log(f"{path}: no data position saved; the data stream starts afresh")
        else:
            try:
                self.loader.load_state_dict(data)
            except ValueError as e:  # "data state: KEY was A when saved but is B now": one line, not a traceback
                raise ConfigError(f"--resume: {path}: {e}") from None
            if data.get("kind") == "epoch_start":  # resharded to another data-parallel size
                log(f"{path}: resharded from another data-parallel size; the data stream continues at the start "
                    f"of epoch {', '.join(map(str, data['next_epochs']))} (per source)")
        log(f"resumed from {path} at step {step}")
        self.start = self.step = step
        return rank_state["rng"]

    def _lr_from_schedule(self) -> None:
        """After a load: the optimizer state brought back the saved run's lr for the next step, while
        the schedule is built from this config (only its position is restored). Take the next step's
        lr from the schedule, so that a resume with a changed train.steps, lr or warmup follows the
        new schedule from its first step (the same value, bit for bit, when nothing changed)."""
        sched = self.scheduler
        if sched is None or not hasattr(sched, "get_lr") or getattr(sched, "optimizer", None) is None:
            return
        for group, lr in zip(sched.optimizer.param_groups, sched.get_lr()):
            group["lr"] = lr

    def _collapse_alarm(self) -> collapse.CollapseAlarm | None:
        alarm = self.cfg.logging.router_collapse
        layers = self.engine.module.moe_layers()
        if not (alarm.enabled and layers):
            return None
        return collapse.CollapseAlarm(collapse.thresholds(layers, alarm.min_experts), alarm.min_success,
                                      alarm.windows)

    def save(self) -> Path:
        step = self.step
        self._beat("saving the checkpoint", kind="save", slow=True)

        def rank_state():
            return {"rng": checkpoint.rng_state(), "data": self.loader.state_dict(), "step": step}
        return checkpoint.save(self.engine, self.ckpt_root, step, rank_state=rank_state,
                               meta={"preset": self.cfg.model.name, "data_skips": self._data_skips(),
                                     "config": self.cfg.to_dict()},
                               keep_last=self.cfg.train.keep_last)

    def _data_skips(self) -> dict[str, int]:
        return {k: int(v) for k, v in sum_over_ranks(self.loader.skip_counts()).items()}

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, resume: str = "auto") -> dict:
        """Train to ``train.steps``, evaluate, and return the run summary (every rank)."""
        cfg = self.cfg
        if is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(self.run_dir / "resolved_config.json",
                                         json.dumps(cfg.to_dict(), indent=1, default=str))
        rng = self.resume(resume)
        self.metrics = MetricsLog(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb,
                                  config=json.loads(json.dumps(cfg.to_dict(), default=str)))
        bar = self._progress()
        self.window = Window()
        t_start = time.perf_counter()
        data = iter(self.loader)
        if rng is not None:
            checkpoint.set_rng_state(rng)  # after iter(): a DataLoader iterator draws its base seed from torch's RNG
        try:
            while self.step < cfg.train.steps:
                self._beat("waiting for the next batch from the data loader", kind="data", step=self.step + 1)
                batch = next(data)
                self._beat("running forward/backward and the optimizer step (collectives with the other ranks)",
                           kind="step", step=self.step + 1)
                if not self.train_step(batch):
                    continue
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}")
                self.after_step()
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - t_start
        summary = self.summary(self.evaluate(), train_seconds)
        self.metrics.close()
        return summary

    def train_step(self, batch) -> bool:
        """One optimizer step; False when a non-finite loss skipped it (on every rank)."""
        r = ds_engine.train_step(self.engine, batch, loss_impl=self.cfg.train.loss_impl, loss=self.cfg.train.loss)
        if r.skipped:
            self.nonfinite += 1
            self.skipped_steps += 1
            log(f"step {self.step + 1}: non-finite loss on some rank; step skipped ({self.nonfinite} in a row)")
            if self.nonfinite >= self.cfg.train.max_consecutive_nonfinite:
                raise RuntimeError(f"{self.nonfinite} consecutive non-finite losses (train.max_consecutive_nonfinite); "
                                   f"stopping. Lower the learning rate or resume from "
                                   f"{checkpoint.find_latest(self.ckpt_root)}")
            return False
        self.nonfinite = 0
        self.step += 1
        self.losses.append(r.contrastive)
        self.window.add(r)
        self.last_loss = r.loss
        return True

    def after_step(self) -> None:
        """Log, evaluate, save and stop on a signal, as the step number says."""
        cfg, step = self.cfg, self.step
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            self._beat("logging (collectives with the other ranks)", kind="step")
            self.log_window()
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
            self.evaluate()
        saved = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.steps
        path = self.save() if saved else None
        if self.stop is not None and step < cfg.train.steps:
            self._beat("agreeing on a stop request (a collective with the other ranks)", kind="step")
            if self.stop.requested():  # one tiny all-reduce
                path = path or self.save()
                self.metrics.close()
                raise Preempted(step, self.stop.signum, path, self.stop.reason)

    def log_window(self) -> None:
        window, engine = self.window, self.engine
        elapsed = time.perf_counter() - window.t0
        scalars = mean_over_ranks({k: v / window.steps for k, v in window.losses.items()})
        self.last_routing = stats.summarize(stats.sum_over_ranks(window.routing, parallel.data_parallel_group()))
        scalars.update(routing_metrics(self.last_routing))
        if self.collapse is not None:
            for line in self.collapse.observe(self.step, self.last_routing):
                log(line)
                self.alarms.append(line)
                self.metrics.write_text(self.step, "alarm/router_collapse", line)
            scalars["alarm/router_collapse"] = len(self.collapse.collapsed)
        grad_norm = engine.get_global_grad_norm()
        scalars.update({
            "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "train/lr": self.scheduler.get_last_lr()[0] if self.scheduler is not None else engine.get_lr()[0],
            "train/samples_per_s": window.steps * self.samples_per_step / elapsed,
            "train/tokens_per_s": window.steps * self.samples_per_step * self.tokens_per_sample / elapsed,
            "train/skipped_steps": self.skipped_steps,
            **{f"data/skipped/{k}": v for k, v in self._data_skips().items()},
        })
        if engine.module.logit_scale is not None:  # a classifier has no temperature
            scalars["train/temperature"] = engine.module.logit_scale.exp().item()
        if engine.module.logit_bias is not None:  # the sigmoid loss's learned bias
            scalars["train/logit_bias"] = engine.module.logit_bias.item()
        if torch.cuda.is_available():  # rank 0's peak, to compare with tools/model_summary.py --layout
            scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        self.metrics.write(self.step, scalars)
        self.window = Window()

    def evaluate(self) -> dict[str, float]:
        self._beat("evaluating", kind="eval", slow=True)
        scalars, images = self.evaluator(self.engine.module)
        self.metrics.write(self.step, scalars)
        self.metrics.write_images(self.step, images)
        return scalars

    def summary(self, results: dict[str, float], train_seconds: float) -> dict:
        step, start = self.step, self.start
        return {"steps": step, "resumed_from_step": start,
                f"final_train_{'xent' if self.cfg.model.classifier else 'contrastive'}":
                    self.losses[-1] if self.losses else None,
                "eval": {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()},
                "skipped_steps": self.skipped_steps, "data_skips": {k: v for k, v in self._data_skips().items() if v},
                "checkpoint": str(checkpoint.find_latest(self.ckpt_root)),
                "tensorboard": str(self.run_dir / "tensorboard"), "metrics": str(self.run_dir / "metrics.jsonl"),
                "losses": self.losses,
                "train_samples_per_s": round((step - start) * self.samples_per_step / train_seconds, 1)
                if step > start else None,
                "routing_success_last_window": success_rates(self.last_routing),
                "router_collapse_alarms": self.alarms}

    def _progress(self):
        if not (is_main() and self.cfg.logging.progress_bar):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.train.steps, initial=self.start, desc="train", dynamic_ncols=True, file=sys.stderr)


def train(cfg: RunConfig, *, rank: int, world: int, resume: str = "auto", stop: StopFlag | None = None,
          watchdog: Watchdog | None = None) -> dict:
    """Train (resuming per ``resume``), evaluate, and return the run summary (every rank). With
    ``stop``, a signal makes it save at the next step boundary and raise ``Preempted``; with
    ``watchdog``, every phase feeds it a heartbeat."""
    try:
        return Trainer(cfg, rank=rank, world=world, stop=stop, watchdog=watchdog).fit(resume)
    finally:
        parallel.teardown()  # the layout's process groups belong to this run
