"""Run the deepspeed launcher so that a stop request ends in exit status 75, the ranks' own.

    python -m limoe_ds.runtime.supervise deepspeed --num_gpus 8 launch/pretrain.py --deepspeed_config ...

Why a wrapper: DeepSpeed 0.19.8's launcher (``deepspeed/launcher/launch.py``) exits with a rank's
status only when it sees that rank exit *before* it is signalled itself. A SIGTERM or SIGINT that
reaches the launcher (``kill`` of the process group, Ctrl-C in a terminal, a supervisor) runs its
handler instead: it sends SIGTERM to every rank's process tree, SIGKILLs what is left after 30 s
and exits 1, whatever the ranks' status; the ``deepspeed`` runner (single node) has no handler and
dies of the signal. Neither process runs any of our code, so the ranks cannot change that.

This wrapper starts the runner in a session of its own, so that signals meant for the job reach
only the wrapper, and passes each SIGINT, SIGTERM, SIGUSR1 or SIGHUP (as SIGTERM) it receives to
the ranks of this host alone (they register their PIDs in ``$LIMOE_PID_DIR``, as with
``--pid-dir``). The ranks save at the next step boundary and exit 75, the launcher then exits 75,
the runner too, and so does this wrapper: a requeue-on-75 policy works. The runner dies with the
wrapper (``PR_SET_PDEATHSIG``): then the ranks see their launcher chain break and stop the same way.
Before any rank has registered, a signal terminates the runner's process group (nothing to save).
Stdlib only. Single node; on SLURM use launch/slurm/pretrain.sbatch, which does the same per node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from limoe_ds.runtime.proc import die_with_parent
from limoe_ds.runtime.slurm import signal_ranks

PID_DIR_ENV = "LIMOE_PID_DIR"
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1,
             signal.SIGHUP: signal.SIGTERM}


def supervise(argv: list[str]) -> int:
    pid_dir = tempfile.mkdtemp(prefix="limoe-ranks-")
    env = {**os.environ, PID_DIR_ENV: pid_dir}
    try:
        child = subprocess.Popen(argv, env=env, start_new_session=True,
                                 preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    except OSError as e:
        shutil.rmtree(pid_dir, ignore_errors=True)
        print(f"error: {argv[0]}: cannot start it ({e.strerror}); check the command", file=sys.stderr)
        return 2

    def forward(signum, frame) -> None:
        sent = signal_ranks(pid_dir, FORWARDED[signum])
        if sent:
            print(f"supervise: {signal.Signals(signum).name}: passed to rank(s) {sent}; they save at the next "
                  f"step boundary and exit 75", file=sys.stderr, flush=True)
        else:  # no rank has started: nothing to save
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover (PEP 475 retries)
                continue
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(pid_dir, ignore_errors=True)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 0 if argv else 2
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main())
