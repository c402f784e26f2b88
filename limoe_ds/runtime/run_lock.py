"""One run per run directory: each rank holds a lock on ``RUN_DIR/.lock/rankRRRRR`` while it trains.

A second job started into a run directory that is in use (a double-submitted job, a requeue while
the first copy still runs) finds its rank's lock held, reads the holder from the file (pid, host,
start time, command) and stops with one ``error:`` line and exit status 2, before any process group
starts. Every rank checks its own lock, so every rank of the second job stops without coordination,
and the first run is never touched.

What this relies on:

* **POSIX record locks** (``fcntl.lockf``, ``F_SETLK`` on the whole file), not ``flock``: the
  kernel drops a process's record locks when the process dies, however it dies (``kill -9``, the
  OOM killer), and they are NOT inherited by forked children. A ``flock`` would be shared with the
  DataLoader workers a rank forks, which outlive a killed rank for up to 5 s and would block its
  resume. So a lock file left behind by a dead run never blocks: only a live process holds it.
  The file itself is never deleted (deleting it would let two processes lock two different files
  of the same name); its contents name the last holder.
* The pitfall of record locks: closing ANY descriptor of the file in the holding process drops its
  lock. Only this module opens lock files, once per process, and keeps the descriptor open.
* **Shared file systems**: on NFS (v3 with lockd, v4) record locks are granted by the server, so
  ranks on different nodes exclude each other; a node that crashes (not just its process) holds
  its locks until the server's lease/grace period expires (NFSv4: ~90 s), after which a resume
  goes through. Lustre grants them cluster-wide only when mounted with ``-o flock``; with
  ``localflock`` they exclude processes of one node only, and with ``noflock`` (the default) the
  call fails: then the run continues with a ``warning:`` line saying that a second run into this
  directory would not be refused (nothing is locked, nothing is silently assumed).
* Tools that only READ a run directory (tools/evaluate.py, tools/convert_checkpoint.py export /
  reshard, TensorBoard) never take the lock: they work while the run trains. A resumed run takes
  the lock again at its start.

Stdlib only: it runs before torch is imported.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from limoe_ds.runtime.proc import pid_alive

LOCK_DIR = ".lock"
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}
"""errno values of a file system that does not do record locks (Lustre -o noflock, some FUSE)."""


_JOB_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
"""What tells one job (one launch) from another: the launcher's rendezvous and SLURM's ids."""


class RunDirInUse(Exception):
    """Another live process holds this rank's lock on the run directory (``holder``: its record)."""

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder


def job_id() -> str:
    """This process's job, as its launcher's variables name it ('' when none is set)."""
    return "|".join(os.environ.get(k, "") for k in _JOB_VARS) if any(os.environ.get(k) for k in _JOB_VARS) else ""


def read_holder(run_dir: str | os.PathLike, rank: int) -> dict | None:
    """The record of the last process that locked ``rank``'s file (call it only from a process that
    does not hold that lock: closing the file would drop it)."""
    try:
        return json.loads(lock_path(run_dir, rank).read_text())
    except (OSError, ValueError):
        return None


def rank0_reports(run_dir: str | os.PathLike, holder: dict | None) -> bool:
    """For a rank > 0 that found its lock held by ``holder``: whether rank 0's lock is held by the
    same job too (so that rank 0 of this job refuses and prints the line; this rank stays quiet)."""
    first = read_holder(run_dir, 0)
    if not (holder and first and holder.get("job") and first.get("job") == holder.get("job")):
        return False
    if first.get("host") == socket.gethostname():  # a pid we can ask about
        try:
            pid = int(first["pid"])
        except (ValueError, TypeError, KeyError):
            return False
        return pid_alive(pid)
    return True


def lock_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / LOCK_DIR / f"rank{rank:05d}"


class RunLock:
    """This rank's hold on a run directory; released by :meth:`release` or by the process's death."""

    def __init__(self, path: Path, fd: int | None, warning: str | None = None) -> None:
        self.path, self._fd, self.warning = path, fd, warning

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the record lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: str | os.PathLike, rank: int, *, command: list[str] | None = None) -> RunLock:
    """Lock ``RUN_DIR/.lock/rankRRRRR`` for this process (non-blocking) and write who holds it.

    Raises RunDirInUse (its message: ``RUN_DIR: in use by pid P on host H since T (...); stop that
    run or choose another train.run_dir``) when a live process holds it. A file system without
    record locks returns an unheld RunLock whose ``warning`` says so."""
    run_dir = Path(run_dir)
    path = lock_path(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunDirInUse(f"{run_dir}: cannot create the lock file {path} ({e.strerror}); "
                          f"make the run directory writable or choose another train.run_dir") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse(f"{run_dir}: in use by {_describe(holder)} (lock {path}); "
                              f"stop that run or choose another train.run_dir", holder) from None
        os.close(fd)
        if e.errno in _UNSUPPORTED:
            return RunLock(path, None, warning=(
                f"{run_dir}: this file system does not support file locks ({e.strerror}); a second run "
                f"started into this run directory would NOT be refused (on Lustre, mount with -o flock)"))
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank, "job": job_id(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command if command is not None else sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd)


def _read_holder(fd: int) -> dict | None:
    """The holder's record; it writes it right after locking, so an empty file is retried briefly."""
    for _ in range(20):
        try:
            text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file names no holder yet)"
    command = holder.get("command")
    if isinstance(command, list):
        command = " ".join(map(str, command))
    if command and len(command) > 200:
        command = command[:197] + "..."
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')} "
            f"(rank {holder.get('rank', '?')}: {command or '?'})")
