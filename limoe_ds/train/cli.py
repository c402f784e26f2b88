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
import sys

from limoe_ds.checkpoint.format import CheckpointError
from limoe_ds.compat.deepspeed import CompatError
from limoe_ds.config import run as run_config
from limoe_ds.config.errors import ConfigError
from limoe_ds.data.errors import DataError
from limoe_ds.runtime.cli import fail
from limoe_ds.runtime.launch_env import LaunchEnvError, world_from_env
from limoe_ds.runtime.preemption import EXIT_PREEMPTED, Preempted, StopFlag
from limoe_ds.runtime.slurm import register_pid


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
    pid_file = None
    try:
        rank, world = world_from_env()
        if args.pid_dir:
            pid_file = register_pid(args.pid_dir, rank)
        return _run(args, stop, rank, world)
    except LaunchEnvError as e:
        return fail(e)
    finally:
        stop.restore()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


def _run(args: argparse.Namespace, stop: StopFlag, rank: int, world: int) -> int:
    try:
        cfg = run_config.load(args.deepspeed_config, args.set, world_size=world)
        from limoe_ds.train.engine import init_distributed  # imports DeepSpeed (version-checked): after validation
    except (ConfigError, DataError, CompatError) as e:  # CompatError: another DeepSpeed version
        return fail(e, rank=rank)
    init_distributed()
    from limoe_ds.train.logging import is_main, log
    from limoe_ds.train.trainer import train
    try:
        summary = train(cfg, rank=rank, world=world, resume=args.resume, stop=stop)
    except CheckpointError as e:  # the same line on every rank (decided together): rank 0 prints it
        return fail(e, rank=rank)
    except (ConfigError, DataError) as e:
        return fail(e, rank=rank, every_rank=True)
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
