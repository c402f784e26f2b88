"""One run per run directory (the lock, limoe_ds.runtime.run_lock) and resuming with a changed config
(limoe_ds.checkpoint.resume_check): refused changes are one line and exit 2 before any process group;
legitimate ones are logged and the run continues."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.checkpoint.resume_check import compare
from limoe_ds.config.errors import ConfigError
from limoe_ds.runtime import run_lock
from test_train import ROOT, TINY, _launch, _losses

# the reference run's own --set values (test_train._launch + conftest.reference_run), so that a test's
# config differs from the saved one only where it says
REFERENCE_SETS = ["train.steps=4", "train.log_every=1", "train.save_every=2", "logging.progress_bar=false",
                  "ds.scheduler.params.warmup_num_steps=2", "eval.max_batches=1", "eval.zero_shot_max_images=500"]


@pytest.fixture
def no_process_group(monkeypatch, capsys):
    """The entry point must stop before any process group: starting one fails the test."""
    import torch.distributed

    def refused(*a, **k):
        raise AssertionError("a process group was started")
    monkeypatch.setattr(torch.distributed, "init_process_group", refused)
    # and the entry point's own call, which does nothing when an earlier test of this process left a group
    import limoe_ds.train.engine
    monkeypatch.setattr(limoe_ds.train.engine, "init_distributed", refused)
    capsys.readouterr()  # DeepSpeed's first import warns on stderr
    monkeypatch.chdir(ROOT)  # the reference run's config names data/mini relative to the repository


def _main(monkeypatch, capsys, run_dir: Path, sets=(), *, rank=0, world=2, resume=None) -> tuple[int, list[str]]:
    from limoe_ds.train.cli import main
    for k in run_lock._JOB_VARS:  # an earlier test's process group leaves MASTER_ADDR/PORT: not this job's
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    argv = ["--deepspeed_config", str(TINY), "--set", *REFERENCE_SETS, f"train.run_dir={run_dir}", *sets]
    initialized = torch.distributed.is_initialized()  # an earlier test of this process may have left one
    rc = main(argv + (["--resume", resume] if resume else []))
    assert torch.distributed.is_initialized() == initialized
    return rc, capsys.readouterr().err.strip().splitlines()


# ---- the lock ------------------------------------------------------------------------------------
def _hold(run_dir: Path, ranks: int) -> subprocess.Popen:
    """Another process holding ranks 0..ranks-1 of run_dir (a running first job, as far as the lock goes)."""
    code = ("import sys; from limoe_ds.runtime.run_lock import acquire; "
            f"locks = [acquire({str(run_dir)!r}, r, command=['first', 'job']) for r in range({ranks})]; "
            "print('held', flush=True); sys.stdin.read()")
    env = {k: v for k, v in os.environ.items() if k not in run_lock._JOB_VARS}  # a job of its own
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.integration  # a holder subprocess, and reference_run
def test_a_second_job_refuses_a_held_run_dir_and_a_dead_holder_blocks_nothing(
        reference_run, tmp_path, monkeypatch, capsys, no_process_group):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    holder = _hold(run_dir, 2)
    try:
        want = f"{run_dir}: in use by pid {holder.pid} on host {socket.gethostname()} since "
        rc, err = _main(monkeypatch, capsys, run_dir)
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {want}"), err
        assert "first job" in err[0] and err[0].endswith("stop that run or choose another train.run_dir"), err
        # every rank checks its own lock: rank 1 of the second job refuses too, on its own (at once:
        # the holder's record names no launcher job that rank 0's also names)
        t0 = time.monotonic()
        rc, err = _main(monkeypatch, capsys, run_dir, rank=1)
        from limoe_ds.train.cli import LOCK_QUIET_WAIT_S
        assert time.monotonic() - t0 < LOCK_QUIET_WAIT_S / 2, "rank 1 waited for a SIGTERM of its own job"
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error (rank 1): {want}") and "(rank 1:" in err[0], err
        # what tools/evaluate.py and convert_checkpoint.py read takes no lock: it works while the run dir is in use
        ckpt = run_dir / "checkpoints" / "step00000004"
        assert checkpoint.consolidated_model_state(ckpt) and checkpoint.evaluation_config(ckpt, [], 1).train.steps == 4
    finally:
        holder.kill()  # SIGKILL: the lock files stay behind, naming a dead pid
        holder.wait()
    assert json.loads(run_lock.lock_path(run_dir, 0).read_text())["pid"] == holder.pid
    # ... and block nothing: the run gets past the lock (to the resume check, which refuses train.seed)
    rc, err = _main(monkeypatch, capsys, run_dir, ["train.seed=1"])
    assert rc == 2 and len(err) == 1 and "train.seed is 0 in" in err[0], err
    with run_lock.acquire(run_dir, 0) as lock, run_lock.acquire(run_dir, 1):
        assert lock.held and json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_the_lock_is_released_when_the_run_ends_and_names_its_holder(tmp_path):
    with run_lock.acquire(tmp_path, 3, command=["x"]) as lock:
        info = json.loads(lock.path.read_text())
        assert lock.path == tmp_path / ".lock" / "rank00003" and info["pid"] == os.getpid()
        assert info["host"] == socket.gethostname() and info["command"] == ["x"] and info["since"]
    with run_lock.acquire(tmp_path, 3) as again:  # released: taken again at once (a resumed run)
        assert again.held


def test_a_file_system_without_locks_is_a_warning_not_a_silent_pass(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "lockf", no_locks)  # Lustre mounted with noflock
    lock = run_lock.acquire(tmp_path, 0)
    assert not lock.held and "would NOT be refused" in lock.warning and "-o flock" in lock.warning


def test_a_rank_stays_quiet_only_while_rank_0_is_held_by_the_same_live_job(tmp_path):
    def record(rank, **kw):
        path = run_lock.lock_path(tmp_path, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": "127.0.0.1:29500", **kw}
        path.write_text(json.dumps(info))
        return info

    mine = record(1)
    record(0)
    assert run_lock.rank0_reports(tmp_path, mine)  # rank 0 of this job will print the line
    record(0, job="127.0.0.1:29501")  # rank 0's lock: another job's (or free and retaken)
    assert not run_lock.rank0_reports(tmp_path, mine)
    record(0, pid=2 ** 22 + 7)  # above Linux's pid_max: a dead holder
    assert not run_lock.rank0_reports(tmp_path, mine)
    assert not run_lock.rank0_reports(tmp_path, {**mine, "job": ""})  # no launcher variables: unknown


# ---- resume with a changed config ----------------------------------------------------------------
def _saved(run_dir: Path, key: str):
    """The value of a display key (limoe_ds.checkpoint.resume_check) in the step-4 marker's config."""
    node = json.loads((run_dir / "checkpoints" / "step00000004" / checkpoint.MARKER).read_text())["config"]
    if key.split(".")[0] in ("model", "train", "data", "parallel", "tokenizer"):
        node = node["limoe"]
    for p in key.split("."):
        node = node[p]
    return node


REFUSED = [  # (--set, world, key, the new value as shown, what else the line says)
    ("model.width=64", 2, "model.width", "64", "weights"),
    ("model.depth=5", 2, "model.depth", "5", "weights"),
    ("model.moe.num_experts=8", 2, "model.moe.num_experts", "8", "weights"),
    ("model.moe.layers=[1]", 2, "model.moe.layers", "[1]", "weights"),  # tiny: [1, 3]
    ("ds.train_micro_batch_size_per_gpu=32", 2, "train_micro_batch_size_per_gpu", "32", "data position"),
    ("ds.zero_optimization.stage=2", 2, "zero_optimization.stage", "2", "ZeRO stage"),
    ("ds.bf16.enabled=true", 2, "bf16.enabled", "true", "precision"),
    ("ds.optimizer.params.weight_decay=0.0", 2, "optimizer.params.weight_decay", "0.0", "would be ignored"),
    ("train.seed=1", 2, "train.seed", "1", "no effect"),
    ("data.seed=1", 2, "data.seed", "1", "data position"),
    ("data.num_workers=2", 2, "data.num_workers", "2", "data position"),
    ("data.train=data/mini/val", 2, "data.train[0].path", "'data/mini/val'", "another dataset"),
]


@pytest.mark.integration  # reference_run
@pytest.mark.parametrize("override,world,key,new,why", REFUSED, ids=[r[2] for r in REFUSED])
def test_a_structural_change_on_resume_is_one_line_before_any_process_group(
        reference_run, tmp_path, monkeypatch, capsys, no_process_group, override, world, key, new, why):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / "step00000004", run_dir / "checkpoints" / "step00000004")
    old = _saved(run_dir, key.split("[")[0])
    old = repr(old[0]["path"]) if key.startswith("data.train") else json.dumps(old)
    rc, err = _main(monkeypatch, capsys, run_dir, [override], world=world)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --resume: {key} is {old} in {run_dir / 'checkpoints' / 'step00000004'} "
                             f"but {new} now ("), err
    assert why in err[0] and err[0].endswith("resume with the saved value, or start a new run_dir"), err


@pytest.mark.integration  # reference_run
def test_a_layout_change_on_resume_names_the_reshard_tool_before_any_process_group(
        reference_run, tmp_path, monkeypatch, capsys, no_process_group):
    ckpt = reference_run / "checkpoints" / "step00000002"
    rc, err = _main(monkeypatch, capsys, tmp_path / "new", ["parallel.expert_parallel_size=1"], resume=str(ckpt))
    assert rc == 2 and err == [f"error: --resume: {ckpt} was saved at tp=1, ep=2; this run is tp=1, ep=1: convert it "
                               f"first with tools/convert_checkpoint.py reshard --tp 1 --ep 1 --world 2"], err
    rc, err = _main(monkeypatch, capsys, tmp_path / "new", world=4, resume=str(ckpt))
    assert rc == 2 and err == [f"error: --resume: {ckpt} was saved by 2 ranks, this run has 4; resume with 2 ranks, "
                               f"or convert it: tools/convert_checkpoint.py reshard"], err
    rc, err = _main(monkeypatch, capsys, tmp_path / "new", resume=str(tmp_path / "nothing"))
    assert rc == 2 and len(err) == 1 and "is not a complete limoe_ds checkpoint" in err[0], err


@pytest.mark.integration  # reference_run
def test_a_damaged_latest_marker_is_passed_over_by_auto_and_named_when_given(
        reference_run, tmp_path, monkeypatch, capsys, no_process_group):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run_dir / "checkpoints")
    latest = run_dir / "checkpoints" / "step00000004"
    (latest / checkpoint.MARKER).write_text('{"step": 4, "wor')  # truncated
    rc, err = _main(monkeypatch, capsys, run_dir, ["train.seed=1"])  # auto: compared with step 2's config
    assert rc == 2 and len(err) == 1 and f"train.seed is 0 in {run_dir / 'checkpoints' / 'step00000002'} " in err[0]
    rc, err = _main(monkeypatch, capsys, run_dir, resume=str(latest))
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --resume: {latest / checkpoint.MARKER} is "
                                                           f"unreadable ("), err


def test_the_resume_policy_allows_and_logs_the_legitimate_changes(tmp_path):
    saved = {"optimizer": {"params": {"lr": 1e-3, "betas": [0.9, 0.98]}},
             "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 8, "warmup_num_steps": 2}},
             "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 64,
             "limoe": {"train": {"steps": 8, "seed": 0, "save_every": 4, "keep_last": 2, "log_every": 10},
                       "eval": {"every": 100, "zero_shot": ["a"]}, "logging": {"tensorboard": True},
                       "model": {"width": 128, "init_std": 0.02, "moe": {"num_experts": 4, "capacity_factor": 1.0}},
                       "data": {"num_workers": 0, "val": {"path": "v"}, "train": [{"path": "t", "weight": 1.0}]},
                       "tokenizer": str(tmp_path / "gone.json")}}
    new = json.loads(json.dumps(saved))
    lim = new["limoe"]
    lim["train"].update(steps=12, save_every=2, keep_last=5, log_every=1)
    new["scheduler"]["params"].update(total_num_steps=12, warmup_num_steps=3)
    new["optimizer"]["params"]["lr"] = 5e-4
    new["gradient_clipping"] = 0.5
    lim["eval"].update(every=0, zero_shot=[])
    lim["logging"]["tensorboard"] = False
    lim["model"]["moe"]["capacity_factor"] = 2.0
    lim["data"].update(num_workers=1, val={"path": "v2"})
    (tmp_path / "tok.json").write_text("{}")
    lim["tokenizer"] = str(tmp_path / "tok.json")
    lines = compare(saved, new, tmp_path / "ckpt")
    assert "resume: train.steps changed 8 -> 12" in lines
    assert "resume: scheduler.params.total_num_steps changed 8 -> 12" in lines
    assert "resume: optimizer.params.lr changed 0.001 -> 0.0005" in lines
    assert "resume: model.moe.capacity_factor changed 1.0 -> 2.0" in lines
    assert any(line.startswith("resume: data.num_workers changed 0 -> 1 (the same number") for line in lines)
    assert any(line.startswith("resume: tokenizer changed") and "not there to compare" in line for line in lines)
    assert len(lines) == 15 and all(line.startswith("resume: ") for line in lines), lines
    # ... and what would be silently ignored or does not fit the weights is refused, naming the key
    for key, mutate, why in (
            ("optimizer.params.betas", lambda c: c["optimizer"]["params"].update(betas=[0.9, 0.99]), "be ignored"),
            ("model.init_std", lambda c: c["limoe"]["model"].update(init_std=0.01), "only initialises"),
            ("model.moe", lambda c: c["limoe"]["model"].update(moe=None), "weights"),
            ("data.train[0].weight", lambda c: c["limoe"]["data"]["train"][0].update(weight=2.0), "another dataset"),
            ("model.width", lambda c: c["limoe"]["model"].update(width=64), "weights")):
        bad = json.loads(json.dumps(new))
        mutate(bad)
        with pytest.raises(ConfigError, match=why) as e:
            compare(saved, bad, tmp_path / "ckpt")
        assert str(e.value).startswith(f"--resume: {key} is "), e.value
    no_schedule = json.loads(json.dumps(new))
    del no_schedule["scheduler"]
    with pytest.raises(ConfigError, match=r"optimizer.params.lr is 0.001 .*\(without a WarmupCosineLR"):
        compare({k: v for k, v in saved.items() if k != "scheduler"}, no_schedule, tmp_path / "ckpt")


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_a_resume_with_more_steps_continues_and_a_second_job_meanwhile_refuses(reference_run, tmp_path):
    """train.steps 4 -> 6 from the step-4 checkpoint: the change is logged and the run continues;
    while it runs, a second job launched into the same run dir stops with exit 2 and one line naming
    the first job's rank-0 pid and host, and writes nothing there. (The first job is stopped with
    SIGSTOP once it has logged step 5, if the second is still starting then: the race is decided.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    cheaper = ["eval.zero_shot=[]", "logging.tensorboard=false", "data.num_workers=0"]  # legitimate changes too
    first = _launch(run_dir, 6, ["train.save_every=2", *cheaper])
    lock0 = run_lock.lock_path(run_dir, 0)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not _held_by_another(lock0):
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before it was seen holding the lock"
    holder = json.loads(lock0.read_text())
    t0 = time.time()
    second = _launch(run_dir, 6, ["train.save_every=2", *cheaper])
    stopped = False
    try:
        while second.poll() is None:
            if not stopped and 5 in _losses(run_dir):
                os.killpg(first.pid, signal.SIGSTOP)
                stopped = True
            time.sleep(0.05)
        out2, _ = second.communicate(timeout=300)
        print(f"second job: exit {second.returncode} after {time.time() - t0:.1f} s")
        assert first.poll() is None, "the first run ended before the second job checked the lock"
    finally:
        if stopped:
            os.killpg(first.pid, signal.SIGCONT)
    errors = [line for line in out2.splitlines() if line.startswith("error")]
    assert second.returncode == 2, out2[-3000:]
    assert len(errors) == 1 and f"in use by pid {holder['pid']} on host {holder['host']}" in errors[0], errors
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    for line in ("resume: train.steps changed 4 -> 6", "resume: scheduler.params.total_num_steps changed 4 -> 6",
                 'resume: eval.zero_shot changed ["data/mini/zeroshot/fashion_mnist"] -> []',
                 "resume: logging.tensorboard changed true -> false",
                 "resume: data.num_workers changed 1 -> 0 (the same number of readers per rank)",
                 "step00000004 at step 4"):
        assert line in out, (line, out[-3000:])
    want, got = _losses(reference_run), _losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and all(got[s] == want[s] for s in (1, 2, 3, 4))
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(rows), "metrics.jsonl holds rows of two runs"
    kept = [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")]
    assert kept == ["step00000004", "step00000006"]


def _held_by_another(lock: Path) -> bool:
    """The first run holds its rank-0 lock (its file names a live pid and a lock is taken)."""
    import fcntl
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return bool(os.pread(fd, 100, 0))
    finally:
        os.close(fd)  # (releases the lock if it was taken here: this process holds nothing else)
    return False


def test_after_a_resume_the_next_step_takes_its_lr_from_the_new_schedule():
    """torch's Optimizer.load_state_dict brings back the saved run's lr (param_groups); the schedule
    rebuilt from the new config restores only its position. Without Trainer._lr_from_schedule a
    resume with train.steps 4 -> 6 ran step 5 at the 4-step schedule's last lr."""
    from types import SimpleNamespace

    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from limoe_ds.train.trainer import Trainer

    def run(total: int):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
        return opt, WarmupCosineLR(opt, total_num_steps=total, warmup_num_steps=2, warmup_type="linear")

    opt, sched = run(4)
    for _ in range(4):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    for total in (4, 6):
        opt, sched = run(total)
        opt.load_state_dict(saved_opt)
        sched.load_state_dict(saved_sched)
        restored = opt.param_groups[0]["lr"]
        Trainer._lr_from_schedule(SimpleNamespace(scheduler=sched))
        assert opt.param_groups[0]["lr"] == sched.get_lr()[0]
        if total == 4:  # nothing changed: the same value, bit for bit
            assert opt.param_groups[0]["lr"] == restored
        else:  # the 6-step schedule at iteration 4, not the 4-step one's
            assert opt.param_groups[0]["lr"] != restored and opt.param_groups[0]["lr"] > 2 * restored
