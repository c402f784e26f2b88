"""Pretraining: ``deepspeed launch/pretrain.py --deepspeed_config ds_configs/tiny.json [--set k=v ...]``.

Validates the whole configuration before any process group starts (exit status 2 with a one-line
message naming the key), then trains with DeepSpeed (ZeRO 0-2, expert parallelism), saves atomic
checkpoints, logs to TensorBoard and ``metrics.jsonl``, and ends with a summary on rank 0.
On SIGUSR1, SIGTERM or SIGINT, and when its deepspeed launcher or runner is gone, it saves a
checkpoint at the next step boundary and exits with status 75 (limoe_ds.runtime.preemption), for a
batch script to requeue. A rank that makes no progress for ``train.watchdog_seconds`` ends with one
error line and status 70 (limoe_ds.runtime.watchdog).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from limoe_ds.checkpoint.format import CheckpointError
from limoe_ds.compat.deepspeed import CompatError
from limoe_ds.config import run as run_config
from limoe_ds.config.errors import ConfigError
from limoe_ds.data.errors import DataError
from limoe_ds.runtime.cli import EXIT_USAGE, fail
from limoe_ds.runtime.launch_env import LaunchEnvError, world_from_env
from limoe_ds.runtime.preemption import EXIT_PREEMPTED, Preempted, StopFlag
from limoe_ds.runtime.proc import LauncherWatch, parent_cmdline
from limoe_ds.runtime.run_lock import RunDirInUse, acquire, rank0_reports
from limoe_ds.runtime.slurm import register_pid
from limoe_ds.runtime.supervise import PID_DIR_ENV  # the wrapper asks the ranks to register (like --pid-dir)
from limoe_ds.runtime.watchdog import Watchdog

EXIT_PEER_LOST = 1
"""Exit status of a rank whose collective failed because another rank went away."""
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
"""gloo's words for a peer that went away mid-collective."""

LOCK_QUIET_WAIT_S = 60.0
"""A rank other than 0 whose lock is held, like rank 0's, by the same other job waits up to this long
for the launcher's SIGTERM (rank 0 refuses too, prints the one line and exits; the deepspeed launcher
and srun --kill-on-bad-exit then stop the other ranks) and exits 2 quietly; with no signal by then
it reports itself (``error (rank R): ...``). A rank whose lock alone is held reports at once."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="launch/pretrain.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a \"limoe\" block")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="dotted overrides of the limoe block, e.g. train.steps=200 data.train=/shards "
                         "(ds.KEY for DeepSpeed keys)")
    ap.add_argument("--resume", default="auto",
                    help="auto (latest complete checkpoint in run_dir, if any), none, or a checkpoint dir")
    ap.add_argument("--pid-dir", help="write this rank's PID into DIR (for a batch script to forward a "
                                      "preemption signal past the deepspeed launcher; launch/slurm/pretrain.sbatch)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, stop: StopFlag | None = None) -> int:
    """``stop``: signal handlers installed earlier by the caller (launch/pretrain.py does so before
    importing torch); by default installed here."""
    stop = stop or StopFlag()  # before anything slow: SIGUSR1's default action is to die
    args = parse_args(argv)
    pid_file = watch = None
    try:
        rank, world = world_from_env()
        pid_dir = args.pid_dir or os.environ.get(PID_DIR_ENV)
        if pid_dir:
            pid_file = register_pid(pid_dir, rank)
        watch = _watch_launcher(stop, rank)
        return _run(args, stop, rank, world)
    except LaunchEnvError as e:
        return fail(e)
    finally:
        if watch is not None:
            watch.close()
        stop.restore()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


def _watch_launcher(stop: StopFlag, rank: int) -> LauncherWatch | None:
    """Under the deepspeed launcher: its exit, or its parent's (the ``deepspeed`` runner, killed by
    a user or a supervisor), is a stop request, so that no orphaned rank trains on."""
    if "deepspeed.launcher.launch" not in parent_cmdline():
        return None

    def gone(what: str) -> None:
        if stop.pending or stop.stopping:
            return  # already stopping: the launcher is going because the ranks are
        print(f"rank {rank}: {what}; stopping at the next step boundary (checkpoint, exit status {EXIT_PREEMPTED})",
              file=sys.stderr, flush=True)
        stop.request(what)
    return LauncherWatch(gone)


def _peer_lost(e: RuntimeError) -> str | None:
    """The words of a collective's error saying a peer went away (None: another error)."""
    return next((p for p in PEER_LOST if p in str(e)), None)


def _run(args: argparse.Namespace, stop: StopFlag, rank: int, world: int) -> int:
    try:
        cfg = run_config.load(args.deepspeed_config, args.set, world_size=world)
    except (ConfigError, DataError, CompatError) as e:  # CompatError: another DeepSpeed version
        return fail(e, rank=rank)
    try:  # one run per run directory: each rank locks its own file (limoe_ds.runtime.run_lock)
        lock = acquire(cfg.train.run_dir, rank)
    except RunDirInUse as e:
        if rank == 0:
            return fail(e)
        if rank0_reports(cfg.train.run_dir, e.holder):  # rank 0 refuses too and prints the line
            deadline = time.monotonic() + LOCK_QUIET_WAIT_S
            while time.monotonic() < deadline:
                if stop.signum is not None:  # the launcher stops the job at rank 0's exit (SIGTERM)
                    return EXIT_USAGE
                time.sleep(0.1)
        return fail(e, rank=rank, every_rank=True)
    with lock:
        if lock.warning and rank == 0:
            print(f"warning: {lock.warning}", file=sys.stderr, flush=True)
        return _train(args, stop, rank, world, cfg)


def _train(args: argparse.Namespace, stop: StopFlag, rank: int, world: int, cfg) -> int:
    try:
        from limoe_ds.checkpoint.resume_check import check_resume
        _, changes = check_resume(cfg, args.resume, world)  # the saved config vs this one: before any process group
        from limoe_ds.train.engine import init_distributed  # imports DeepSpeed (version-checked): after validation
    except (ConfigError, DataError, CompatError) as e:  # CompatError: another DeepSpeed version
        return fail(e, rank=rank)
    if rank == 0:
        for line in changes:
            print(line, flush=True)
    watchdog = Watchdog(cfg.train.watchdog_seconds, rank=rank)
    watchdog.beat("starting the process group (rendezvous with the other ranks)", step=0, kind="build", slow=True)
    try:
        init_distributed()
        from limoe_ds.train.logging import is_main, log
        from limoe_ds.train.trainer import train
        try:
            summary = train(cfg, rank=rank, world=world, resume=args.resume, stop=stop, watchdog=watchdog)
        except CheckpointError as e:  # the same line on every rank (decided together): rank 0 prints it
            return fail(e, rank=rank)
        except (ConfigError, DataError) as e:
            return fail(e, rank=rank, every_rank=True)
        except Preempted as e:
            log(f"preempted: {e}; exit status {EXIT_PREEMPTED} (requeue to resume)")
            return EXIT_PREEMPTED
        except RuntimeError as e:
            lost = _peer_lost(e)
            if lost is None:
                raise
            print(f"error (rank {rank}): lost the connection to another rank ({lost}); it exited or "
                  f"was killed: its own output says why; resume from the latest checkpoint", file=sys.stderr,
                  flush=True)
            return EXIT_PEER_LOST
    finally:
        watchdog.close()
    if is_main():
        printable = {k: v for k, v in summary.items() if k != "losses"}
        print(json.dumps(printable, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
