"""Preloaded by the DataLoader's forkserver (``limoe_ds.data.loader``): importing it there makes the
forkserver die with the rank that started it and ignore the stop signals, which its workers then
inherit (``limoe_ds.runtime.proc``). Imported anywhere else, it does nothing."""

from __future__ import annotations

import os
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

if _in_forkserver():
    # the rank that started this server: if it died before this ran, the death signal never comes
    parent = os.environ.get(PARENT_ENV, "")
    guard_helper(int(parent) if parent.isdigit() else None)
    SERVER_PID = os.getpid()
