"""Helper processes die with the rank that owns them, and a rank notices when its launcher is gone.

A training rank owns helper processes: the DataLoader's forkserver (a child of the rank), the
workers it forks (children of the forkserver) and multiprocessing's resource tracker. When a rank
dies, however it dies (SIGKILL included), they must die too, or they stay as orphans holding
shards open and memory:

* the forkserver: ``limoe_ds.runtime.forkserver_guard`` is in its preload list; importing it there
  sets ``PR_SET_PDEATHSIG`` = SIGKILL (the kernel kills it when the rank dies) and ignores the stop
  signals (SIGINT, SIGTERM, SIGUSR1): a signal sent to the whole process group is the rank's to act
  on, and a killed forkserver would take the workers with it mid-epoch. It is started with those
  signals blocked (:func:`stop_signals_blocked`), so that one arriving during its start, before the
  guard runs, cannot kill it either (seen: a group SIGTERM during the first batch broke the rank's
  pipe to its forkserver);
* each DataLoader worker (:func:`worker_init`, its ``worker_init_fn``): the same, its parent being
  the forkserver (it inherits the ignored signals from it);
* the resource tracker exits by itself once every process holding its pipe (the rank, the
  workers) is gone.

Stdlib only. Linux; elsewhere :func:`die_with_parent` does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
PARENT_ENV = "LIMOE_FORKSERVER_PARENT"
"""The PID of the rank starting a forkserver, in the environment the server inherits
(:func:`start_forkserver`)."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent (the thread that forked
    it) exits. True when set (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def ignore_stop_signals() -> None:
    """A helper process leaves stop signals to the rank (it stops them at a step boundary)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def guard_helper(parent_pid: int | None = None) -> None:
    """Make this helper process die with its parent and ignore stop signals. ``parent_pid``: the
    parent it was forked by; if that one is already gone (it died before the guard was set), exit."""
    ignore_stop_signals()
    die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread (another thread of the process takes them: the
    handler still runs), for starting a helper process: the blocked mask is inherited through fork
    and exec, so a signal sent to the whole process group while the helper starts (before it can
    ignore it) cannot kill it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_forkserver() -> None:
    """Start multiprocessing's forkserver (and its resource tracker) now, guarded: with the stop
    signals blocked during its start, and told this process's PID so that it exits at once if this
    process died before the guard could take effect (``limoe_ds.runtime.forkserver_guard``)."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    multiprocessing.resource_tracker.ensure_running()  # first: its start unblocks SIGINT/SIGTERM afterwards
    os.environ[PARENT_ENV] = str(os.getpid())
    with stop_signals_blocked():
        multiprocessing.forkserver.ensure_running()
    if not _KILL_AT_EXIT:
        atexit.register(_kill_workers_at_exit)  # runs before multiprocessing's own exit hook (LIFO)
        _KILL_AT_EXIT.append(True)


_KILL_AT_EXIT: list[bool] = []


def _kill_workers_at_exit() -> None:
    """SIGKILL this process's DataLoader workers still alive at exit. The DataLoader stops them
    itself when its iterator is freed; an iterator still referenced when the process exits (the
    run ended on an error: the traceback holds the loop's frame) is not, and multiprocessing's exit
    hook then SIGTERMs its daemonic children and joins them, which waits forever for workers that
    ignore stop signals (``worker_init``). Seen: both ranks of a run stopped by a full disk hung in
    ``multiprocessing.util._exit_function``. The workers only read data: nothing is lost."""
    import multiprocessing
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def worker_init(worker_id: int) -> None:  # noqa: ARG001  (DataLoader's worker_init_fn signature)
    """DataLoader ``worker_init_fn``: the worker dies with its parent (the forkserver, which dies
    with the rank) and ignores stop signals. A worker whose forkserver died between the fork and
    this call (seen: the rank SIGKILLed just then) would never get the signal: it exits now."""
    guard = sys.modules.get("limoe_ds.runtime.forkserver_guard")
    guard_helper(getattr(guard, "SERVER_PID", None))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parent_of(pid: int) -> int | None:
    """The parent PID of ``pid`` from /proc (None if it is gone or /proc is unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command may contain spaces and parentheses


class LauncherWatch:
    """A daemon thread that calls ``on_gone(what)`` once when this rank's launcher chain breaks:
    its parent (the deepspeed launcher) exits, or the launcher's own parent (the ``deepspeed``
    runner the user started) exits and the launcher is re-parented. The rank then stops as on a
    signal (a checkpoint at the next step boundary, exit status 75), instead of training on as an
    orphan into a run directory nobody watches. A chain is watched only as far as it is ours to
    judge: a parent that is PID 1 at start (a container's init, srun's step daemon) is not."""

    def __init__(self, on_gone, *, interval: float = 1.0) -> None:
        self.on_gone, self.interval = on_gone, interval
        self.parent = os.getppid()
        self.grandparent = parent_of(self.parent) if self.parent > 1 else None
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="limoe-launcher-watch", daemon=True)
        self.thread.start()

    def _broken(self) -> str | None:
        if self.parent <= 1:
            return None
        if os.getppid() != self.parent:
            return f"the launcher (PID {self.parent}) exited"
        if self.grandparent and self.grandparent > 1 and parent_of(self.parent) not in (self.grandparent, None):
            return f"the launcher's parent (PID {self.grandparent}, the deepspeed runner) exited"
        return None

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            what = self._broken()
            if what is not None:
                self.on_gone(what)
                return

    def close(self) -> None:
        self._done.set()


def parent_cmdline(pid: int | None = None) -> str:
    """The command line of ``pid``'s parent (this process's by default), '' if unreadable."""
    ppid = os.getppid() if pid is None else parent_of(pid)
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, TypeError):
        return ""
