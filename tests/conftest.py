"""Suite-wide hooks and guards.

Markers (registered in pytest.ini): tests that start processes are marked ``integration`` in their
modules; every other test is marked ``unit`` here, so ``-m unit`` and ``-m integration`` partition
the suite. A unit test that starts a process group, a subprocess or a multiprocessing process fails
(:func:`_unit_tests_start_no_processes`): it must be marked integration.

A launched run (test_train._launch) that outlives its test is killed: a test that fails on a
timeout (``communicate(timeout=...)`` raises, it does not kill) would otherwise leave the launcher
and its ranks running in their own session for the rest of the suite, taking the CPU and memory
every later test needs.
"""

from __future__ import annotations

import multiprocessing.process
import os
import signal
import subprocess
import sys

import pytest

UNIT_GUARD = "_unit_tests_start_no_processes"
MESSAGE = "a unit test must not start a process group / subprocess; mark it integration"


class UnitTestStartedProcess(BaseException):
    """Raised by the guarded entry points inside a unit test. A BaseException, like pytest's own
    outcome exceptions, so that library code's ``except Exception`` does not turn it into another
    error (torch's ninja probe, run by deepspeed.init_distributed on CPU, would report "Ninja is
    required" instead)."""


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)
            # Set the guard up before every other fixture, the module-scoped ones included (pytest
            # orders a test's fixtures by scope): a module fixture that starts a process group or a
            # subprocess makes every test that uses it integration.
            if UNIT_GUARD in item.fixturenames:
                item.fixturenames.remove(UNIT_GUARD)
                item.fixturenames.insert(0, UNIT_GUARD)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_processes(request):
    """In a unit test: torch.distributed.init_process_group, deepspeed.init_distributed,
    subprocess.Popen (so subprocess.run too) and multiprocessing's Process.start (DataLoader
    workers, torch.multiprocessing) raise UnitTestStartedProcess."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise UnitTestStartedProcess(f"{what}: {MESSAGE} ({request.node.nodeid})")
        return refused

    import torch.distributed  # every test imports torch anyway; deepspeed (seconds) only if already there

    with pytest.MonkeyPatch.context() as mp:  # undone after this test, whatever the test's own monkeypatch does
        mp.setattr(torch.distributed, "init_process_group", refuse("torch.distributed.init_process_group"))
        deepspeed = sys.modules.get("deepspeed")
        if deepspeed is not None and hasattr(deepspeed, "init_distributed"):
            mp.setattr(deepspeed, "init_distributed", refuse("deepspeed.init_distributed"))
        mp.setattr(subprocess.Popen, "__init__", refuse("subprocess.Popen"))
        mp.setattr(multiprocessing.process.BaseProcess, "start", refuse("multiprocessing Process.start"))
        yield


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


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One finished 2-rank run of the tiny preset through the deepspeed launcher (expert-parallel 2,
    4 steps, checkpoints at steps 2 and 4, ``metrics.jsonl`` with every step's loss), shared by the
    fault tests so that each injects its fault into a copy (``shutil.copytree``) instead of paying
    for a run of its own. Never modify it in place."""
    from test_train import _launch
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _launch(run_dir, 4, ["train.save_every=2"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert (run_dir / "checkpoints" / "step00000002").is_dir() and (run_dir / "checkpoints" / "step00000004").is_dir()
    return run_dir
