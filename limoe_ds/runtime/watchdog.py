"""The watchdog: a stalled data reader or collective ends the run with one clear line, not a silent hang.

The training loop feeds :class:`Watchdog` a heartbeat saying what it is doing ("waiting for the
next batch from the data loader", "step 3 forward/backward", "saving the checkpoint of step 4",
"evaluating"). A daemon thread checks it; when nothing happened for the phase's limit, it prints

    error (rank 1): watchdog: no progress for 60 s at step 3 while waiting for the next batch from
    the data loader; check the data source (a hung mount?) or raise train.watchdog_seconds

(one line) and ends the process with :data:`EXIT_STALLED` through ``os._exit``: a thread blocked in
``open()`` of a hung mount, or in a gloo collective with a dead peer, cannot be interrupted. The
rank's DataLoader forkserver and workers die with it (``limoe_ds.runtime.proc``), and the launcher
then ends the other ranks.

Phases that legitimately take long on a big model (the rendezvous and building the run, loading
or saving a checkpoint, an evaluation pass) are marked ``slow`` and get :data:`SLOW_FACTOR` times
the limit; waiting for a batch and a training step get the limit itself. Stdlib only.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STALLED = 70
"""Exit status of a rank ended by the watchdog (BSD's EX_SOFTWARE)."""
SLOW_FACTOR = 4

HINTS = {
    "data": "check the data source (a hung mount?) or raise train.watchdog_seconds",
    "step": "another rank may be stuck or dead (its own error line says why), or a collective hangs; "
            "raise train.watchdog_seconds if a step really takes this long",
    "save": "check the checkpoint file system (full? hung?) or raise train.watchdog_seconds",
    "eval": "check the evaluation data or raise train.watchdog_seconds",
    "build": "check the data, the tokenizer and the other ranks' output, or raise train.watchdog_seconds",
}


class Watchdog:
    """``seconds`` without a heartbeat (``SLOW_FACTOR`` x in slow phases) ends the process; 0 disables."""

    def __init__(self, seconds: float, *, rank: int, exit=os._exit, out=None) -> None:
        self.seconds, self.rank, self._exit, self._out = float(seconds), rank, exit, out
        self._lock = threading.Lock()
        self._beat = time.monotonic()
        self._what, self._step, self._kind, self._slow = "starting", 0, "build", True
        self._done = threading.Event()
        self.fired: str | None = None
        self.thread = None
        if self.seconds > 0:
            self.thread = threading.Thread(target=self._run, name="limoe-watchdog", daemon=True)
            self.thread.start()

    def beat(self, what: str, *, step: int, kind: str, slow: bool = False) -> None:
        """Progress: from now on this rank is doing ``what`` (at ``step``); ``kind`` picks the hint."""
        with self._lock:
            self._beat = time.monotonic()
            self._what, self._step, self._kind, self._slow = what, step, kind, slow

    def limit(self) -> float:
        return self.seconds * (SLOW_FACTOR if self._slow else 1)

    def _run(self) -> None:
        interval = min(1.0, self.seconds / 10)
        while not self._done.wait(interval):
            with self._lock:
                idle = time.monotonic() - self._beat
                if idle < self.limit():
                    continue
                msg = (f"error (rank {self.rank}): watchdog: no progress for {idle:.0f} s at step {self._step} "
                       f"while {self._what}; {HINTS[self._kind]}")
            self.fired = msg
            out = self._out or sys.stderr
            try:
                print(msg, file=out, flush=True)
            finally:
                self._exit(EXIT_STALLED)
            return

    def close(self) -> None:
        self._done.set()
