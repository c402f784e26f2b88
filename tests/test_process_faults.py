"""Processes and signals: a dying rank takes its helpers with it, one stop request is one graceful
stop (a checkpoint at the next step boundary, exit status 75), an orphaned job stops itself, and a
stalled rank ends the run with one line (the watchdog).

The launched runs copy ``reference_run`` (tests/conftest.py: 2 ranks, ep 2, 4 steps, checkpoints at
steps 2 and 4) and resume from one of its checkpoints, so that each pays only for a few steps. Every
process of a run carries a unique ``LIMOE_FAULT_MARK`` in its environment (the DataLoader's
forkserver, workers and resource tracker inherit it), which is how "nothing is left" is checked.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.config.errors import ConfigError
from limoe_ds.runtime import watchdog as wd
from limoe_ds.runtime.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
MARK = "LIMOE_FAULT_MARK"


# ---- helpers ------------------------------------------------------------------------------------
def _processes(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries ``marker``."""
    out = {}
    needle = f"{MARK}={marker}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            stat = (d / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is gone; its parent has not reaped it yet
            out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
    return out


def _wait_gone(marker: str, timeout: float) -> dict[int, str]:
    deadline = time.time() + timeout
    while (left := _processes(marker)) and time.time() < deadline:
        time.sleep(0.25)
    return left


class _Output:
    """Drains a launched run's stdout in a thread (the ranks keep the pipe after the runner dies)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.text)
            if m:
                return m
            if proc is not None and proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the output:\n{self.text[-4000:]}")

    def close(self, timeout: float = 30) -> str:
        self.thread.join(timeout)
        return self.text


@pytest.fixture
def jobs(monkeypatch):
    """Starts runs (``jobs(run_dir, steps, extra, supervised=)`` -> :class:`_Job`), each with a
    marker of its own in the environment of all its processes; whatever still carries one at
    teardown is killed (a test that failed must not leave a run behind)."""
    started: list[_Job] = []

    def start(run_dir: Path, steps: int, extra=(), *, supervised: bool = False) -> _Job:
        marker = uuid.uuid4().hex
        monkeypatch.setenv(MARK, marker)  # copied into the launched environment
        job = _Job(run_dir, marker, *_launch(run_dir, steps, [*QUICK, *extra], supervised=supervised))
        started.append(job)
        return job
    yield start
    for job in started:
        for pid in _processes(job.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


QUICK = ["eval.zero_shot=[]", "data.val=null"]
"""No evaluation: the runs here are about processes (a resumed run restores the RNG state, so its
losses do not depend on what was built for evaluation)."""


class _Job:
    def __init__(self, run_dir: Path, marker: str, proc: subprocess.Popen, out: _Output) -> None:
        self.run_dir, self.marker, self.proc, self.out = run_dir, marker, proc, out

    def resumed(self, step: int) -> bool:
        return re.search(rf"resumed from .*step{step:08d} at step {step}", self.out.text) is not None


def _copy_reference(reference_run: Path, tmp_path: Path, name: str, drop=()) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(reference_run, run_dir)
    for step in drop:
        shutil.rmtree(run_dir / "checkpoints" / f"step{step:08d}")
    return run_dir


def _launch(run_dir: Path, steps: int, extra=(), supervised: bool = False) -> tuple[subprocess.Popen, _Output]:
    from test_train import _launch as launch_train
    wrapper = [sys.executable, "-m", "limoe_ds.runtime.supervise"] if supervised else []
    proc = launch_train(run_dir, steps, list(extra), wrapper=wrapper)
    return proc, _Output(proc)


def _rank_pid(marker: str, local_rank: int) -> int:
    pids = [p for p, cmd in _processes(marker).items() if "launch/pretrain.py" in cmd and f"--local_rank={local_rank}"
            in cmd]
    assert len(pids) == 1, _processes(marker)
    return pids[0]


def _helpers_of(marker: str, rank_pid: int) -> dict[int, str]:
    """The rank's forkserver, resource tracker and DataLoader workers (descendants of the rank)."""
    procs = _processes(marker)
    parents = {}
    for pid in procs:
        try:
            parents[pid] = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            pass
    tree, grew = {rank_pid}, True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {p: procs[p] for p in tree - {rank_pid} if p in procs}


def _stopped_at(text: str, reason: str) -> int:
    m = re.search(rf"preempted: stopped at step (\d+) on {reason}", text)
    assert m, text[-4000:]
    return int(m.group(1))


def _when(actions: dict, timeout: float) -> None:
    """{name: (ready, act)}: call each act() as soon as its ready() is true (the jobs run at once)."""
    deadline = time.time() + timeout
    while actions and time.time() < deadline:
        for name, (ready, act) in list(actions.items()):
            if ready():
                act()
                del actions[name]
        time.sleep(0.05)
    assert not actions, f"never ready: {list(actions)}"


# ---- one stop request, one graceful stop ----------------------------------------------------------
@pytest.mark.integration  # the deepspeed launcher (three runs at once, then a resume)
def test_one_stop_request_is_one_graceful_stop_however_it_is_delivered(tmp_path, reference_run, jobs):
    """Three runs at once, each resumed from a copy of the reference run and stopped another way:

    * ``kill -TERM -PGID`` (each rank gets SIGTERM twice: directly, and from the deepspeed
      launcher's handler): one stop, a complete checkpoint at the next step (3), nobody killed
      mid-save, and the run resumed from it has the uninterrupted run's losses, bit for bit;
    * SIGTERM to the ``deepspeed`` runner alone (it dies at once): the orphaned launcher and ranks
      do not train on; they save at the next step boundary and exit 75;
    * Ctrl-C (SIGINT) to ``python -m limoe_ds.runtime.supervise deepspeed ...``: the ranks get it
      once, save and exit 75, and so do the launcher, the runner and the wrapper (DeepSpeed's
      launcher exits 1 whenever it is signalled itself).

    Every time, no process of the job is left."""
    from test_train import _losses
    group = jobs(_copy_reference(reference_run, tmp_path, "group", drop=(4,)), 4)
    runner = jobs(_copy_reference(reference_run, tmp_path, "runner"), 12)
    wrapped = jobs(_copy_reference(reference_run, tmp_path, "wrapped"), 12, supervised=True)
    _when({"group": (lambda: group.resumed(2), lambda: os.killpg(group.proc.pid, signal.SIGTERM)),
           "runner": (lambda: runner.resumed(4), lambda: runner.proc.send_signal(signal.SIGTERM)),
           "wrapped": (lambda: wrapped.resumed(4), lambda: wrapped.proc.send_signal(signal.SIGINT))}, 300)
    statuses = {name: job.proc.wait(timeout=120) for name, job in
                (("group", group), ("runner", runner), ("wrapped", wrapped))}
    for job in (group, runner, wrapped):
        left = _wait_gone(job.marker, 60)
        text = job.out.close()
        assert not left, f"{job.run_dir.name}: left behind: {left}\n{text[-3000:]}"
        assert "Traceback" not in text, text[-3000:]
    # the runner of a group-wide signal and the runner signalled alone die of it (DeepSpeed's: no handler)
    assert statuses == {"group": -signal.SIGTERM, "runner": -signal.SIGTERM, "wrapped": EXIT_PREEMPTED}, statuses

    assert _stopped_at(group.out.text, "SIGTERM") == 3
    assert checkpoint.find_latest(group.run_dir / "checkpoints") == group.run_dir / "checkpoints" / "step00000003"
    step = _stopped_at(runner.out.text, r"the launcher's parent \(PID \d+, the deepspeed runner\) exited")
    assert 5 <= step < 12 and f"exits with return code = {EXIT_PREEMPTED}" in runner.out.text  # the launcher's view
    assert checkpoint.find_latest(runner.run_dir / "checkpoints") == runner.run_dir / "checkpoints" / f"step{step:08d}"
    step = _stopped_at(wrapped.out.text, "SIGINT")
    latest = checkpoint.find_latest(wrapped.run_dir / "checkpoints")
    assert 5 <= step < 12 and latest == wrapped.run_dir / "checkpoints" / f"step{step:08d}"

    again = jobs(group.run_dir, 4)
    assert again.proc.wait(timeout=600) == 0, again.out.close()[-3000:]
    assert again.resumed(3), again.out.close()[-3000:]
    want, got = _losses(reference_run), _losses(group.run_dir)
    assert {s: got[s] for s in (3, 4)} == {s: want[s] for s in (3, 4)}


# ---- a dying rank, a stalled rank ------------------------------------------------------------------
WATCHDOG_LINE = (r"error \(rank (\d)\): watchdog: no progress for (\d+) s at step 1 while waiting for the next "
                 r"batch from the data loader; check the data source \(a hung mount\?\) or raise "
                 r"train\.watchdog_seconds")


@pytest.mark.integration  # the deepspeed launcher (two runs at once)
def test_a_dying_or_stalled_rank_ends_the_job_and_leaves_nothing_behind(tmp_path, reference_run, jobs):
    """Two runs at once:

    * SIGKILL of one rank: the job ends within 60 s and nothing of it stays, the rank's forkserver,
      DataLoader worker and resource tracker included; the checkpoint before it stays complete;
    * a FIFO named like a shard (a hung network mount: its open() never returns): the rank reading
      it ends the run after train.watchdog_seconds with one line naming its rank, the step and the
      wait (exit status 70), its peer with one line too (no traceback), and nothing stays."""
    from test_train import MINI
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(MINI / "train" / "train-000.tar", shards / "train-000.tar")
    os.mkfifo(shards / "x.tar")  # two shards, two ranks: one of them opens the FIFO
    seconds = 15
    killed = jobs(_copy_reference(reference_run, tmp_path, "killed"), 12)
    stalled = jobs(tmp_path / "stalled", 4, [f"data.train={shards}", f"train.watchdog_seconds={seconds}"])

    killed.out.wait_for(r"resumed from .*step00000004 at step 4", 300, killed.proc)
    victim = _rank_pid(killed.marker, 1)
    deadline = time.time() + 120
    while len(helpers := _helpers_of(killed.marker, victim)) < 3 and time.time() < deadline:
        time.sleep(0.1)  # the forkserver starts with the first batch, its worker right after
    kinds = " ".join(helpers.values())
    assert "forkserver" in kinds and "resource_tracker" in kinds and len(helpers) >= 3, helpers
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    killed.proc.wait(timeout=60)
    ended = time.time() - t0
    left = _wait_gone(killed.marker, 30)
    assert not left, f"left behind: {left}"
    assert killed.proc.returncode == 256 - signal.SIGKILL and ended < 60, (killed.proc.returncode, ended)
    latest = checkpoint.find_latest(killed.run_dir / "checkpoints")
    assert latest is not None and latest.name >= "step00000004" and (latest / checkpoint.MARKER).is_file()
    assert "Traceback" not in killed.out.close(), killed.out.text[-3000:]

    m = stalled.out.wait_for(WATCHDOG_LINE, 300, stalled.proc)
    t0 = time.time()
    assert seconds <= int(m.group(2)) < seconds + 5
    stalled.proc.wait(timeout=60)
    ended = time.time() - t0
    left = _wait_gone(stalled.marker, 30)
    text = stalled.out.close()
    assert stalled.proc.returncode == wd.EXIT_STALLED and ended < 60, (stalled.proc.returncode, ended, text[-3000:])
    assert not left, f"left behind: {left}"
    assert "Traceback" not in text, text[-3000:]
    errors = re.findall(r"error \(rank \d\): .*", text)
    assert errors and re.fullmatch(WATCHDOG_LINE, errors[0]), errors


# ---- the pieces, without a launcher -------------------------------------------------------------------
@pytest.mark.unit
def test_watchdog_fires_once_with_rank_step_and_wait():
    exits, out = [], io.StringIO()
    dog = wd.Watchdog(0.3, rank=1, exit=exits.append, out=out)
    try:
        dog.beat("waiting for the next batch from the data loader", step=3, kind="data")
        deadline = time.time() + 10
        while not exits and time.time() < deadline:
            time.sleep(0.05)
    finally:
        dog.close()
    assert exits == [wd.EXIT_STALLED]
    assert re.fullmatch(r"error \(rank 1\): watchdog: no progress for 0 s at step 3 while waiting for the next batch "
                        r"from the data loader; check the data source \(a hung mount\?\) or raise "
                        r"train\.watchdog_seconds\n", out.getvalue())


@pytest.mark.unit
def test_watchdog_stays_quiet_while_fed_and_gives_slow_phases_more_time():
    exits = []
    dog = wd.Watchdog(0.4, rank=0, exit=exits.append, out=io.StringIO())
    try:
        for step in range(10):
            dog.beat(f"step {step}", step=step, kind="step")
            time.sleep(0.1)
        dog.beat("saving the checkpoint", step=10, kind="save", slow=True)
        assert dog.limit() == pytest.approx(0.4 * wd.SLOW_FACTOR)
        time.sleep(0.8)  # twice the plain limit, half the slow one
        assert exits == []
    finally:
        dog.close()
    assert wd.Watchdog(0, rank=0, exit=exits.append).thread is None  # 0 = off


@pytest.mark.unit
@pytest.mark.parametrize("value", [-1, "soon", True, float("inf")])
def test_watchdog_seconds_is_checked(value):
    from test_train import TINY
    from limoe_ds.config import run as run_config
    with pytest.raises(ConfigError, match=r"train\.watchdog_seconds"):
        run_config.load(str(TINY), [f"train.watchdog_seconds={value}"], world_size=2)
    assert run_config.load(str(TINY), [], world_size=2).train.watchdog_seconds == 600


@pytest.mark.unit
def test_the_forkserver_guard_does_nothing_outside_a_forkserver():
    before = signal.getsignal(signal.SIGTERM)
    import limoe_ds.runtime.forkserver_guard as guard
    assert not guard._in_forkserver() and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.unit
def test_a_forkserver_child_cut_off_by_its_dying_rank_prints_no_traceback(capsys):
    """The forkserver's children report a failed start through sys.excepthook: a message cut short by
    the rank's death (kill -9 mid-start) is quiet, any other failure still prints its traceback."""
    import pickle
    import limoe_ds.runtime.forkserver_guard as guard
    for cut in (pickle.UnpicklingError("pickle data was truncated"), EOFError("Ran out of input")):
        guard._quiet_when_cut_off(type(cut), cut, None)
    assert capsys.readouterr().err == ""
    try:
        raise ValueError("a real failure")
    except ValueError as e:
        guard._quiet_when_cut_off(ValueError, e, e.__traceback__)
    assert "ValueError: a real failure" in capsys.readouterr().err


STOP_SCRIPT = """
import os, signal, sys, time
from limoe_ds.runtime.preemption import StopFlag
stop = StopFlag()
for n in range({count}):
    os.kill(os.getpid(), signal.SIG{sig})
    time.sleep(0.05)
    print("alive", n + 1, stop.reason, flush=True)
"""


@pytest.mark.integration  # Python subprocesses
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_stop_flag_one_request_delivered_twice_is_one_request_a_third_signal_kills(sig):
    """Two signals before the ranks agree are one request (a group-wide signal arrives directly
    and through the launcher); the third kills with the signal's default action (a rank stuck in a
    collective stays killable); SIGINT is a stop request, not a KeyboardInterrupt."""
    two = subprocess.run([sys.executable, "-c", STOP_SCRIPT.format(count=2, sig=sig)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert two.returncode == 0 and two.stdout.split("\n")[:2] == [f"alive 1 SIG{sig}", f"alive 2 SIG{sig}"], two
    three = subprocess.run([sys.executable, "-c", STOP_SCRIPT.format(count=3, sig=sig)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert three.returncode == -getattr(signal, f"SIG{sig}") and "alive 3" not in three.stdout, three
    assert "Traceback" not in three.stderr


@pytest.mark.unit
def test_supervise_without_a_command_is_a_usage_error(capsys):
    from limoe_ds.runtime.supervise import main
    assert main([]) == 2 and "python -m limoe_ds.runtime.supervise deepspeed" in capsys.readouterr().err
