"""Stopping for preemption: a signal sets a flag; the training loop stops at a step boundary.

SLURM sends a signal before the time limit (``sbatch --signal=B:USR1@300``; SIGTERM on preemption
and at the limit itself); a user or a job supervisor sends SIGTERM or SIGINT (Ctrl-C). The handler
only records it; so does the launcher watch (``limoe_ds.runtime.proc``) when the launcher is gone.
At each step boundary every rank takes part in one MAX all-reduce of its flag, so one signalled
rank is enough and all ranks agree on the step to stop at (a checkpoint save has barriers: ranks
deciding apart would hang). The loop then saves a
checkpoint at that step and the process exits with :data:`EXIT_PREEMPTED`; the batch script
requeues the job on that status, and the requeued run resumes from the checkpoint (``--resume auto``).
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (BSD's EX_TEMPFAIL:
try again later); launch/slurm/pretrain.sbatch requeues the job on it."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
KILL_AFTER = 3
"""Stop signals, counted before the ranks agree to stop, after which the next one kills: the first
is the request; the second is usually the same request delivered twice (a SIGTERM or Ctrl-C sent to
the whole process group reaches each rank directly and again through the deepspeed launcher, which
forwards it); a third is a user insisting, and a rank stuck in a collective must stay killable."""


class Preempted(Exception):
    """Raised by the training loop once the stop checkpoint is written."""

    def __init__(self, step: int, signum: int | None, checkpoint, reason: str | None = None) -> None:
        name = reason or (signal.Signals(signum).name if signum else "a stop request on another rank")
        super().__init__(f"stopped at step {step} on {name}; checkpoint {checkpoint}")
        self.step, self.signum, self.checkpoint, self.reason = step, signum, checkpoint, reason


class StopFlag:
    """Signal handlers that record a stop request (SIGUSR1, SIGTERM, SIGINT). Python's default for
    SIGUSR1 and SIGTERM is to die, for SIGINT a KeyboardInterrupt anywhere. Before the ranks have
    agreed to stop, the :data:`KILL_AFTER`-th signal kills the process with that signal's default
    action (a rank stuck in a collective with a dead peer stays killable); the one before is taken
    as the same request delivered twice. Once they have agreed, further signals are ignored until
    the process exits: srun (--kill-on-bad-exit) and the deepspeed launcher send SIGTERM to the
    other ranks as soon as the first one exits with EXIT_PREEMPTED, and the save must not be cut.
    :meth:`request` is the same request from a thread (the launcher watch: the launcher is gone)."""

    def __init__(self, signals=SIGNALS) -> None:
        """Installs the handlers. Importing this module is cheap (no torch), so a launch script can
        do it before its slow imports, during which the default actions would still apply."""
        self.signum: int | None = None
        self.reason: str | None = None
        self.signals_seen = 0
        self.stopping = False
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        if self.stopping:
            return
        self.signals_seen += 1
        if self.reason is None:
            self.signum, self.reason = signum, signal.Signals(signum).name
        elif self.signals_seen >= KILL_AFTER:
            self.restore()
            signal.signal(signum, signal.SIG_DFL)  # SIGINT's previous handler only raises KeyboardInterrupt
            signal.raise_signal(signum)

    def request(self, reason: str) -> None:
        """A stop request that is not a signal (thread-safe: one attribute store)."""
        if self.reason is None:
            self.reason = reason

    @property
    def pending(self) -> bool:
        """This rank has a stop request (the other ranks learn it at the next :meth:`requested`)."""
        return self.reason is not None

    def requested(self) -> bool:
        """Collective: True on every rank when any rank has a stop request."""
        from limoe_ds.parallel.collectives import any_rank  # torch: only once training runs
        self.stopping = any_rank(self.reason is not None)
        return self.stopping

    def restore(self) -> None:
        """The previous handlers back, unless stopping: then the signals stay ignored until exit."""
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.stopping else h)
        self._previous = {}
