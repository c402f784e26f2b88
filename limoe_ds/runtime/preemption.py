"""Stopping for preemption: a signal sets a flag; the training loop stops at a step boundary.

SLURM sends a signal before the time limit (``sbatch --signal=B:USR1@300``; SIGTERM on preemption
and at the limit itself). The handler only records it. At each step boundary every rank takes part
in one MAX all-reduce of its flag, so one signalled rank is enough and all ranks agree on the step
to stop at (a checkpoint save has barriers: ranks deciding apart would hang). The loop then saves a
checkpoint at that step and the process exits with :data:`EXIT_PREEMPTED`; the batch script
requeues the job on that status, and the requeued run resumes from the checkpoint (``--resume auto``).
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (BSD's EX_TEMPFAIL:
try again later); launch/slurm/pretrain.sbatch requeues the job on it."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised by the training loop once the stop checkpoint is written."""

    def __init__(self, step: int, signum: int | None, checkpoint) -> None:
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        super().__init__(f"stopped at step {step} on {name}; checkpoint {checkpoint}")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint


class StopFlag:
    """Signal handlers that record the signal. Python's default for SIGUSR1 is to die, and for
    SIGTERM too. A second SIGTERM before the ranks have agreed to stop kills the process as before
    (a rank stuck in a collective with a dead peer stays killable); once they have agreed, further
    signals are ignored until the process exits: srun (--kill-on-bad-exit) and the deepspeed launcher
    send SIGTERM to the other ranks as soon as the first one exits with EXIT_PREEMPTED."""

    def __init__(self, signals=SIGNALS) -> None:
        """Installs the handlers. Importing this module is cheap (no torch), so a launch script can
        do it before its slow imports, during which the default actions would still apply."""
        self.signum: int | None = None
        self.stopping = False
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        if self.stopping:
            return
        if self.signum is not None and signum == signal.SIGTERM:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def requested(self) -> bool:
        """Collective: True on every rank when any rank has received a signal."""
        from limoe_ds.parallel.collectives import any_rank  # torch: only once training runs
        self.stopping = any_rank(self.signum is not None)
        return self.stopping

    def restore(self) -> None:
        """The previous handlers back, unless stopping: then the signals stay ignored until exit."""
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.stopping else h)
        self._previous = {}
