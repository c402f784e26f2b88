"""Preloaded by the DataLoader's forkserver (``limoe_ds.data.loader``): importing it there makes the
forkserver die with the rank that started it and ignore the stop signals, which its workers then
inherit (``limoe_ds.runtime.proc``). Imported anywhere else, it does nothing."""

from __future__ import annotations

import os
import pickle
import sys

from limoe_ds.runtime.proc import PARENT_ENV, guard_helper


def _in_forkserver() -> bool:
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.replace("\\", "/").endswith("multiprocessing/forkserver.py"):
            return True
        frame = frame.f_back
    return False


SERVER_PID: int | None = None
"""This forkserver's PID, in the server and in the workers it forks (their parent: see
``limoe_ds.runtime.proc.worker_init``)."""

def _quiet_when_cut_off(kind, value, tb) -> None:
    """The excepthook of the server's children. multiprocessing's forkserver reports a child's
    failure to start through ``sys.excepthook``; a child whose rank died while sending it its work
    (``kill -9`` of the rank mid-start) fails to unpickle a message cut short (``pickle data was
    truncated``, EOFError) and would print that traceback beside the launcher's report of the dead
    rank. That one failure exits quietly; any other goes to the default hook."""
    if issubclass(kind, (EOFError, pickle.UnpicklingError)):
        return
    sys.__excepthook__(kind, value, tb)


if _in_forkserver():
    # the rank that started this server: if it died before this ran, the death signal never comes
    parent = os.environ.get(PARENT_ENV, "")
    guard_helper(int(parent) if parent.isdigit() else None)
    SERVER_PID = os.getpid()
    sys.excepthook = _quiet_when_cut_off  # inherited by every child it forks
