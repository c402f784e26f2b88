"""Pretraining: ``deepspeed launch/pretrain.py --deepspeed_config ds_configs/tiny.json [--set k=v ...]``.

Validates the whole configuration before any process group starts (exit status 2 with a one-line
message naming the key), then trains with DeepSpeed (ZeRO 0-2, expert parallelism), saves atomic
checkpoints, logs to TensorBoard and ``metrics.jsonl``, and ends with a summary on rank 0.
On SIGUSR1 or SIGTERM it saves a checkpoint at the next step boundary and exits with status 75
(limoe_ds.runtime.preemption), for a batch script to requeue.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.config import run as run_config
from limoe_ds.runtime.launch_env import LaunchEnvError, world_from_env
from limoe_ds.runtime.slurm import register_pid
from limoe_ds.data import DataError, Tokenizer, build_eval_loader, build_train_loader
from limoe_ds.moe import stats
from limoe_ds.runtime.preemption import EXIT_PREEMPTED, Preempted, StopFlag
from limoe_ds.config.run import ConfigError, RunConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="launch/pretrain.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a \"limoe\" block")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="dotted overrides of the limoe block, e.g. train.steps=200 data.train=/shards (ds.KEY for DeepSpeed keys)")
    ap.add_argument("--resume", default="auto", help="auto (latest complete checkpoint in run_dir, if any), none, or a checkpoint dir")
    ap.add_argument("--pid-dir", help="write this rank's PID into DIR (for a batch script to forward a "
                                      "preemption signal past the deepspeed launcher; launch/slurm/pretrain.sbatch)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap.parse_args(argv)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    """The project's own output: rank 0 only."""
    if is_main():
        print(msg, flush=True)


class MetricsLog:
    """TensorBoard scalars + metrics.jsonl, rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.enabled = is_main()
        self.writer = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def write_images(self, step: int, images: dict) -> None:
        """Pillow images as TensorBoard image summaries (HWC uint8)."""
        if self.writer is not None:
            import numpy as np
            for tag, img in images.items():
                self.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


@dataclass
class Window:
    """What happened since the last log line (summed over steps; routing counts summed over ranks later)."""

    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    routing: stats.Totals = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, r) -> None:
        self.steps += 1
        for k, v in {"loss/total": r.loss, "loss/contrastive": r.contrastive,
                     **{f"aux/{k}": v for k, v in r.aux.items()}}.items():
            self.losses[k] = self.losses.get(k, 0.0) + v
        stats.accumulate(self.routing, r.routing)


def routing_scalars(routing: stats.Totals) -> dict[str, float]:
    """Sum routing counts over data-parallel ranks (tensor-parallel peers route the same tokens),
    then per layer/modality success rate and dropped tokens."""
    from limoe_ds import parallel
    out = {}
    for layer, s in stats.summarize(stats.sum_over_ranks(routing, parallel.data_parallel_group())).items():
        for m in ("image", "text"):
            out[f"routing/{layer}/{m}/success_rate"] = s[m]["success_rate"]
            out[f"routing/{layer}/{m}/dropped_tokens"] = s[m]["dropped_tokens"]
            out[f"routing/{layer}/{m}/entropy_of_mean"] = s[m]["entropy_of_mean"]
    return out


def _build(cfg: RunConfig, rank: int, world: int):
    from limoe_ds import parallel
    from limoe_ds.train.engine import build_engine
    from limoe_ds.model import build_model
    layout = parallel.Layout(rank=rank, world_size=world, ep=cfg.parallel.expert_parallel_size,
                             tp=cfg.parallel.tensor_parallel_size)
    parallel.setup(layout)
    tokenizer = Tokenizer.from_file(cfg.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer: vocabulary {tokenizer.vocab_size} > model.vocab_size {cfg.model.vocab_size}; "
                          f"train a smaller tokenizer or raise model.vocab_size")
    model = parallel.parallelize(build_model(cfg.model, ep_size=layout.ep, ep_rank=layout.ep_rank,
                                             seed=cfg.train.seed), layout)
    if cfg.train.activation_checkpointing:
        model.activation_checkpointing = True
    # router noise: independent per data-parallel rank, identical on tensor-parallel peers (they
    # must route their shared tokens the same way)
    torch.manual_seed(cfg.train.seed * 1000 + layout.dp_rank)
    engine, scheduler = build_engine(model, cfg.deepspeed)
    mb = cfg.micro_batch_size
    train_loader = build_train_loader(cfg.data, image_size=cfg.model.image_size, tokenizer=tokenizer,
                                      text_len=cfg.model.text_len, batch_size=mb, dp_rank=layout.dp_rank,
                                      dp_size=layout.dp)
    val_loader = None
    if cfg.data.val is not None:
        val_loader = build_eval_loader(cfg.data, image_size=cfg.model.image_size, tokenizer=tokenizer,
                                       text_len=cfg.model.text_len, batch_size=cfg.eval.batch_size,
                                       dp_rank=layout.dp_rank, dp_size=layout.dp)
    from limoe_ds.data.zeroshot import load_zeroshot_set
    evaluator = Evaluator(val_loader, [load_zeroshot_set(z) for z in cfg.eval.zero_shot], tokenizer, layout,
                          cfg.eval.max_batches, figures=cfg.logging.tensorboard and cfg.model.moe is not None)
    return layout, engine, scheduler, train_loader, evaluator


@dataclass
class Evaluator:
    """Held-out pairs (loss, retrieval) and zero-shot sets, dropless and at the training capacity;
    with ``figures``, also the expert figures of the dropless validation pass (drawn on rank 0)."""

    val_loader: object
    zero_shot_sets: list
    tokenizer: object
    layout: object
    max_batches: int
    figures: bool = False
    figure_images: int = 4
    """Validation images in the patch->expert overlays."""

    def __call__(self, model) -> tuple[dict[str, float], dict]:
        """-> (scalars, {tag: Pillow image}); the images only on rank 0, the routing counts behind them
        summed on every rank (config-wide condition: every rank runs the same collectives)."""
        from limoe_ds.eval.run import RoutingRecord, evaluate
        record = None
        if self.figures and self.val_loader is not None:
            record = RoutingRecord(sample_images=self.figure_images if is_main() else 0)
        scalars = evaluate(model, val_loader=self.val_loader, zero_shot_sets=self.zero_shot_sets,
                           tokenizer=self.tokenizer, dp_rank=self.layout.dp_rank, dp_size=self.layout.dp,
                           max_batches=self.max_batches, record=record)
        if record is None or not is_main():
            return scalars, {}
        from limoe_ds.eval.figures import routing_figures
        return scalars, routing_figures(record.summary(), record.images_BCHW, record.experts_BI)


def _evaluate(evaluator: Evaluator, model, metrics: MetricsLog, step: int) -> dict[str, float]:
    scalars, images = evaluator(model)
    metrics.write(step, scalars)
    metrics.write_images(step, images)
    return scalars


def _resume(engine, loader, ckpt_root: Path, resume: str) -> tuple[int, dict | None]:
    """Load model, optimizer and data position; the RNG state is returned for the caller to set
    once the data iterator exists (creating it draws from torch's RNG)."""
    if resume == "none":
        return 0, None
    path = checkpoint.find_latest(ckpt_root) if resume == "auto" else Path(resume)
    if path is None:
        return 0, None
    step, rank_state = checkpoint.load(engine, path)
    data = rank_state.get("data")
    if data is None:
        log(f"{path}: no data position saved; the data stream starts afresh")
    else:
        loader.load_state_dict(data)
        if data.get("kind") == "epoch_start":  # resharded to another data-parallel size
            log(f"{path}: resharded from another data-parallel size; the data stream continues at the start "
                f"of epoch {', '.join(map(str, data['next_epochs']))} (per source)")
    log(f"resumed from {path} at step {step}")
    return step, rank_state["rng"]


def _save(engine, loader, ckpt_root: Path, step: int, cfg: RunConfig) -> Path:
    def rank_state():
        return {"rng": checkpoint.rng_state(), "data": loader.state_dict(), "step": step}
    return checkpoint.save(engine, ckpt_root, step, rank_state=rank_state,
                           meta={"preset": cfg.model.name, "data_skips": _sum_counts(loader.skip_counts()),
                                 "config": cfg.to_dict()},
                           keep_last=cfg.train.keep_last)


def train(cfg: RunConfig, *, rank: int, world: int, resume: str = "auto", stop: StopFlag | None = None) -> dict:
    """Train (resuming per ``resume``), evaluate, and return the run summary (every rank). With
    ``stop``, a signal makes it save at the next step boundary and raise ``Preempted``."""
    from limoe_ds import parallel
    try:
        return _train(cfg, rank=rank, world=world, resume=resume, stop=stop)
    finally:
        parallel.teardown()  # the layout's process groups belong to this run


def _train(cfg: RunConfig, *, rank: int, world: int, resume: str, stop: StopFlag | None) -> dict:
    from limoe_ds.train.engine import train_step
    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    layout, engine, scheduler, loader, evaluator = _build(cfg, rank, world)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "resolved_config.json", json.dumps(cfg.to_dict(), indent=1, default=str))
    start, rng = _resume(engine, loader, ckpt_root, resume)
    metrics = MetricsLog(run_dir, cfg.logging.tensorboard)
    bar = _progress(cfg, start)
    window, nonfinite, skipped_total, losses, last = Window(), 0, 0, [], {}
    t_start = time.perf_counter()
    samples_per_step = cfg.micro_batch_size * layout.dp
    tokens_per_sample = cfg.model.num_patches + cfg.model.text_len
    data = iter(loader)
    if rng is not None:
        checkpoint.set_rng_state(rng)  # after iter(): a DataLoader iterator draws its base seed from torch's RNG
    step = start
    while step < cfg.train.steps:
        r = train_step(engine, next(data))
        if r.skipped:
            nonfinite += 1
            skipped_total += 1
            log(f"step {step + 1}: non-finite loss on some rank; step skipped ({nonfinite} in a row)")
            if nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise RuntimeError(f"{nonfinite} consecutive non-finite losses (train.max_consecutive_nonfinite); "
                                   f"stopping. Lower the learning rate or resume from {checkpoint.find_latest(ckpt_root)}")
            continue
        nonfinite = 0
        step += 1
        losses.append(r.contrastive)
        window.add(r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.4f}")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            last = _log_window(metrics, window, step, engine, scheduler, loader, samples_per_step, tokens_per_sample,
                               skipped_total)
            window = Window()
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
            _evaluate(evaluator, engine.module, metrics, step)
        saved = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.steps
        if saved:
            _save(engine, loader, ckpt_root, step, cfg)
        if stop is not None and step < cfg.train.steps and stop.requested():  # one tiny all-reduce
            path = ckpt_root / f"step{step:08d}" if saved else _save(engine, loader, ckpt_root, step, cfg)
            if bar is not None:
                bar.close()
            metrics.close()
            raise Preempted(step, stop.signum, path)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_start
    summary = _final(engine, evaluator, metrics, step, start, losses, loader, skipped_total, ckpt_root, run_dir)
    summary["train_samples_per_s"] = round((step - start) * samples_per_step / train_seconds, 1) if step > start else None
    summary["routing_success_last_window"] = {k[len("routing/"):-len("/success_rate")]: round(v, 4)
                                              for k, v in last.items() if k.endswith("/success_rate")}
    metrics.close()
    return summary


def _progress(cfg: RunConfig, start: int):
    if not (is_main() and cfg.logging.progress_bar):
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)


def _log_window(metrics, window, step, engine, scheduler, loader, samples_per_step, tokens_per_sample, skipped):
    from limoe_ds.parallel.collectives import mean_over_ranks
    elapsed = time.perf_counter() - window.t0
    scalars = mean_over_ranks({k: v / window.steps for k, v in window.losses.items()})
    scalars.update(routing_scalars(window.routing))
    grad_norm = engine.get_global_grad_norm()
    scalars.update({
        "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "train/lr": scheduler.get_last_lr()[0] if scheduler is not None else engine.get_lr()[0],
        "train/temperature": engine.module.logit_scale.exp().item(),
        "train/samples_per_s": window.steps * samples_per_step / elapsed,
        "train/tokens_per_s": window.steps * samples_per_step * tokens_per_sample / elapsed,
        "train/skipped_steps": skipped,
        **{f"data/skipped/{k}": v for k, v in _sum_counts(loader.skip_counts()).items()},
    })
    if torch.cuda.is_available():  # rank 0's peak, to compare with tools/model_summary.py --layout
        scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    metrics.write(step, scalars)
    return scalars


def _sum_counts(counts: dict[str, int]) -> dict[str, int]:
    from limoe_ds.parallel.collectives import sum_over_ranks
    return {k: int(v) for k, v in sum_over_ranks(counts).items()}


def _final(engine, evaluator, metrics, step, start, losses, loader, skipped, ckpt_root, run_dir) -> dict:
    results = _evaluate(evaluator, engine.module, metrics, step)
    return {"steps": step, "resumed_from_step": start, "final_train_contrastive": losses[-1] if losses else None,
            "eval": {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()},
            "skipped_steps": skipped, "data_skips": {k: v for k, v in _sum_counts(loader.skip_counts()).items() if v},
            "checkpoint": str(checkpoint.find_latest(ckpt_root)), "tensorboard": str(run_dir / "tensorboard"),
            "metrics": str(run_dir / "metrics.jsonl"), "losses": losses}


def main(argv: list[str] | None = None, stop: StopFlag | None = None) -> int:
    """``stop``: signal handlers installed earlier by the caller (launch/pretrain.py does so before
    importing torch); by default installed here."""
    stop = stop or StopFlag()  # before anything slow: SIGUSR1's default action is to die
    args = parse_args(argv)
    pid_file = None
    try:
        rank, world = world_from_env()
        if args.pid_dir:
            pid_file = register_pid(args.pid_dir, rank)
        return _run(args, stop, rank, world)
    except LaunchEnvError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        stop.restore()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


def _run(args: argparse.Namespace, stop: StopFlag, rank: int, world: int) -> int:
    try:
        cfg = run_config.load(args.deepspeed_config, args.set, world_size=world)
    except (ConfigError, DataError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # every rank finds the same error; the launcher kills all ranks at the first exit,
            time.sleep(3)  # so let rank 0 print it first
        return 2
    from limoe_ds.train.engine import init_distributed  # imports DeepSpeed: only after validation
    init_distributed()
    try:
        summary = train(cfg, rank=rank, world=world, resume=args.resume, stop=stop)
    except (ConfigError, DataError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        log(f"preempted: {e}; exit status {EXIT_PREEMPTED} (requeue to resume)")
        return EXIT_PREEMPTED
    if is_main():
        printable = {k: v for k, v in summary.items() if k != "losses"}
        print(json.dumps(printable, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
