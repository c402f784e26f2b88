"""Preloaded by the DataLoader's forkserver (``limoe_ds.data.loader``): importing it there makes the
forkserver die with the rank that started it and ignore the stop signals, which its workers then
inherit (``limoe_ds.runtime.proc``). Imported anywhere else, it does nothing."""

from __future__ import annotations

import sys

from limoe_ds.runtime.proc import guard_helper


def _in_forkserver() -> bool:
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.replace("\\", "/").endswith("multiprocessing/forkserver.py"):
            return True
        frame = frame.f_back
    return False


if _in_forkserver():
    guard_helper()
