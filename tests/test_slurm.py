"""Cluster launching: node lists, the deepspeed hostfile, ranks per node, the launcher environment
mapping (SLURM, deepspeed launcher, torchrun), and the preemption stop flag."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from limoe_ds import dist_env
from limoe_ds.dist_env import LaunchEnvError, expand_nodelist, hostfile_text, launch_env, ranks_per_node

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"


# ---- node lists and the hostfile --------------------------------------------------------------
@pytest.mark.parametrize("nodelist,hosts", [
    ("n1", ["n1"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("node[8-10]", ["node8", "node9", "node10"]),          # no padding: width of the first number
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),      # padding kept, widening past it
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),    # two groups: their product, in order
    ("a-1.ib,b_2", ["a-1.ib", "b_2"]),
    ("x[3]", ["x3"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist,message", [
    ("", "empty node list"),
    ("n[1-", "'[' without ']'"),
    ("n1]", "']' without '['"),
    ("n[[1]]", "nested '['"),
    ("n[]", "empty '[]'"),
    ("n[a-b]", "'a-b' in [...] is not N or N-M"),
    ("n[1-2-3]", "is not N or N-M"),
    ("n[5-3]", "range '5-3' runs backwards"),
    ("n[1,,2]", "'' in [...] is not N or N-M"),
    ("n1,,n2", "empty host name"),
    (",n1", "empty host name"),
    ("n[1-2],n2", "names 'n2' twice"),
    ("bad host", "'bad host' is not a host name"),
    ("n[1-1000000]", "more than 100000 hosts"),
])
def test_malformed_nodelist_is_a_clear_error(nodelist, message):
    with pytest.raises(LaunchEnvError, match=re.escape(message)):
        expand_nodelist(nodelist)


def test_hostfile_one_line_per_node_with_slots():
    assert hostfile_text(["gpu01", "gpu02"], 8) == "gpu01 slots=8\ngpu02 slots=8\n"
    for hosts, slots, message in [([], 8, "no host names"), (["a", "a"], 8, "host 'a' appears twice"),
                                  (["a", "-b"], 8, "'-b' is not a host name"), (["a"], 0, "slots=0")]:
        with pytest.raises(LaunchEnvError, match=re.escape(message)):
            hostfile_text(hosts, slots)


@pytest.mark.parametrize("env,slots", [
    ({"GPUS_PER_NODE": "2"}, 2),
    ({"GPUS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}, 1),  # the explicit variable wins
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "4"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "0", "GPUS_PER_NODE": ""}, None),
    ({}, None),
])
def test_ranks_per_node(env, slots):
    if slots is None:
        with pytest.raises(LaunchEnvError, match="no GPUs per node"):
            ranks_per_node(env)
    else:
        assert ranks_per_node(env) == slots


@pytest.mark.parametrize("env,message", [
    ({"GPUS_PER_NODE": "two"}, "GPUS_PER_NODE='two': expected a number"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0"),
    ({"SLURM_GPUS_PER_NODE": "a100:x"}, "SLURM_GPUS_PER_NODE='a100:x'"),
])
def test_malformed_ranks_per_node(env, message):
    with pytest.raises(LaunchEnvError, match=re.escape(message)):
        ranks_per_node(env)


def test_slurm_plan_cli_writes_the_hostfile_and_the_exports(tmp_path, monkeypatch, capsys):
    for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GPUS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "31337")
    monkeypatch.setattr(sys, "stdin", io.StringIO("gpu07\ngpu08\n"))  # scontrol show hostnames
    assert dist_env._cli(["slurm-plan", "--hostfile", str(tmp_path / "hostfile")]) == 0
    assert (tmp_path / "hostfile").read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    out = capsys.readouterr().out
    # 20000 + 31337 % 20000 = 31337
    assert out == ("export MASTER_ADDR=gpu07\nexport MASTER_PORT=31337\nexport NNODES=2\n"
                   "export GPUS_PER_NODE=4\nexport WORLD=8\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("gpu07\ngpu07\n"))
    assert dist_env._cli(["slurm-plan", "--hostfile", str(tmp_path / "h2")]) == 2
    assert capsys.readouterr().err.strip() == "error: host 'gpu07' appears twice"


# ---- the launcher environment: SLURM, deepspeed launcher, torchrun ---------------------------------
SRUN = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]"}
DEEPSPEED = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500",
             "CROSS_RANK": "1", "CROSS_SIZE": "4", "LOCAL_SIZE": "2"}
TORCHRUN = {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none"}


@pytest.mark.parametrize("env,expected", [
    ({}, ("none", 0, 0, 1, None, None)),
    (DEEPSPEED, ("deepspeed", 3, 1, 8, "10.0.0.7", 29500)),
    (TORCHRUN, ("torchrun", 6, 2, 16, "node0", 29400)),
    # srun: SLURM_PROCID/LOCALID/NTASKS; the first node and a port from the job id (20000 + 1234)
    (SRUN, ("srun", 5, 1, 8, "gpu07", 21234)),
    ({**SRUN, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "12345"}, ("srun", 5, 1, 8, "10.1.1.1", 12345)),
    ({**{k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}, "SLURM_JOB_NODELIST": "a[2-3]"},
     ("srun", 5, 1, 8, "a2", 21234)),
    # a launcher inside a SLURM job (the deepspeed launcher in a batch script, or under srun): it wins
    ({**SRUN, **DEEPSPEED}, ("deepspeed", 3, 1, 8, "10.0.0.7", 29500)),
    # the batch script's own shell: SLURM_PROCID=0 and SLURM_NTASKS=16 but no job step: not 16 ranks
    ({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16",
      "SLURM_JOB_NODELIST": "n[1-2]"}, ("none", 0, 0, 1, None, None)),
])
def test_launch_env_mapping(env, expected):
    e = launch_env(env)
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port) == expected


@pytest.mark.parametrize("env,message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0"}, "WORLD_SIZE is not set but RANK is"),
    ({"WORLD_SIZE": "2"}, "RANK is not set but WORLD_SIZE is"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is outside [0, WORLD_SIZE=4)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({**DEEPSPEED, "MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a port number"),
    ({**SRUN, "SLURM_PROCID": "a"}, "SLURM_PROCID='a' is not an integer"),
    ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 is outside [0, SLURM_NTASKS=8)"),
    ({**SRUN, "SLURM_LOCALID": "-1"}, "SLURM_LOCALID=-1 must be >= 0"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS is not set"),
    ({**SRUN, "SLURM_STEP_NODELIST": "gpu[07-"}, "SLURM_STEP_NODELIST: node list 'gpu[07-': '[' without ']'"),
    ({**SRUN, "SLURM_STEP_NODELIST": "gpu[9-7]"}, "SLURM_STEP_NODELIST: node list 'gpu[9-7]': range '9-7' runs backwards"),
    ({k: v for k, v in SRUN.items() if not k.endswith("NODELIST")}, "MASTER_ADDR is not set and neither is"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID is not set"),
])
def test_malformed_launch_env_is_a_clear_error(env, message):
    with pytest.raises(LaunchEnvError, match=re.escape(message)):
        launch_env(env)


def test_export_torch_env_maps_srun_and_leaves_a_launcher_alone():
    env = dict(SRUN)
    dist_env.export_torch_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07", "MASTER_PORT": "21234"}
    assert launch_env(env).launcher == "deepspeed"  # now torch's variables: the same place either way
    env = dict(DEEPSPEED)
    dist_env.export_torch_env(env)
    assert env == DEEPSPEED


def test_bad_launcher_variables_exit_2_with_one_line(monkeypatch, capsys):
    from limoe_ds.train import main
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--deepspeed_config", str(ROOT / "ds_configs" / "tiny.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: RANK=2 is outside [0, WORLD_SIZE=2)"


# ---- the stop flag ----------------------------------------------------------------------------
STOP_FLAG_SCRIPT = """
import os, signal, sys
from limoe_ds.preemption import StopFlag
stop = StopFlag()
os.kill(os.getpid(), signal.SIG{first})
print("flag", stop.signum == signal.SIG{first}, flush=True)
if {agree}:
    print("requested", stop.requested(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
stop.restore()
os.kill(os.getpid(), signal.SIGTERM)  # after restore: ignored once stopping, the default action otherwise
print("survived", flush=True)
"""


@pytest.mark.parametrize("first,agree,survives", [("USR1", True, True), ("USR1", False, False),
                                                  ("TERM", False, False)])
def test_stop_flag_records_a_signal_and_a_second_sigterm_still_kills(first, agree, survives):
    """USR1 (Python's default: die) only sets the flag. Before the ranks agree to stop, a second
    SIGTERM kills as before; after they agree, the save and the exit are not interrupted."""
    p = subprocess.run([sys.executable, "-c", STOP_FLAG_SCRIPT.format(first=first, agree=agree)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert "flag True" in p.stdout, p.stderr
    if survives:
        assert p.returncode == 0 and "requested True" in p.stdout and "survived" in p.stdout
    else:
        assert p.returncode == -signal.SIGTERM and "survived" not in p.stdout


def test_signal_ranks_reaches_registered_pids_on_this_host(tmp_path):
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        mine = dist_env.register_pid(tmp_path, 0)
        (tmp_path / f"{socket.gethostname()}.rank00001.pid").write_text(f"{dead.pid}\n")  # exited: skipped
        (tmp_path / "otherhost.rank00002.pid").write_text(f"{os.getpid()}\n")  # another node: not here
        assert dist_env.signal_ranks(tmp_path, signal.SIGUSR1) == [os.getpid()]
        assert got == [signal.SIGUSR1] and mine.read_text() == f"{os.getpid()}\n"
    finally:
        signal.signal(signal.SIGUSR1, previous)
