"""Suite-wide guard: a launched run (test_train._launch) that outlives its test is killed.

A test that fails on a timeout (``communicate(timeout=...)`` raises, it does not kill) would
otherwise leave the launcher and its ranks running in their own session for the rest of the
suite, taking the CPU and memory every later test needs.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest


@pytest.fixture(autouse=True)
def _kill_leftover_launches():
    yield
    launched = getattr(sys.modules.get("test_train"), "LAUNCHED", [])
    for proc in launched:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks (start_new_session)
            except ProcessLookupError:
                pass
            proc.wait()
    launched.clear()
