"""Cluster launching: node lists, the deepspeed hostfile, the launcher environment mapping (SLURM,
deepspeed launcher, torchrun), the preemption stop flag, and launch/slurm/*.sbatch on a real SLURM.

The real SLURM: Debian's slurm-wlm and munge (installed here when missing and run as root), a
slurm.conf for this machine with two node names on localhost (two slurmd, each with its own port),
munged / slurmctld / slurmd started as this test's own processes and stopped at the end."""

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

from limoe_ds.runtime import slurm as slurm_env
from limoe_ds.runtime.launch_env import LaunchEnvError, export_torch_env, launch_env
from limoe_ds.runtime.slurm import expand_nodelist, hostfile_text, ranks_per_node
from test_train import _losses  # per-step losses from metrics.jsonl, the re-run steps of a resume overwriting

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
    assert slurm_env._cli(["slurm-plan", "--hostfile", str(tmp_path / "hostfile")]) == 0
    assert (tmp_path / "hostfile").read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    out = capsys.readouterr().out
    # 20000 + 31337 % 20000 = 31337
    assert out == ("export MASTER_ADDR=gpu07\nexport MASTER_PORT=31337\nexport NNODES=2\n"
                   "export GPUS_PER_NODE=4\nexport WORLD=8\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("gpu07\ngpu07\n"))
    assert slurm_env._cli(["slurm-plan", "--hostfile", str(tmp_path / "h2")]) == 2
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
    ({**SRUN, "SLURM_STEP_NODELIST": "gpu[9-7]"},
     "SLURM_STEP_NODELIST: node list 'gpu[9-7]': range '9-7' runs backwards"),
    ({k: v for k, v in SRUN.items() if not k.endswith("NODELIST")}, "MASTER_ADDR is not set and neither is"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID is not set"),
])
def test_malformed_launch_env_is_a_clear_error(env, message):
    with pytest.raises(LaunchEnvError, match=re.escape(message)):
        launch_env(env)


def test_export_torch_env_maps_srun_and_leaves_a_launcher_alone():
    env = dict(SRUN)
    export_torch_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07", "MASTER_PORT": "21234"}
    assert launch_env(env).launcher == "deepspeed"  # now torch's variables: the same place either way
    env = dict(DEEPSPEED)
    export_torch_env(env)
    assert env == DEEPSPEED


def test_bad_launcher_variables_exit_2_with_one_line(monkeypatch, capsys):
    from limoe_ds.train.cli import main
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--deepspeed_config", str(ROOT / "ds_configs" / "tiny.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: RANK=2 is outside [0, WORLD_SIZE=2)"


# ---- the stop flag ----------------------------------------------------------------------------
STOP_FLAG_SCRIPT = """
import os, signal, sys
from limoe_ds.runtime.preemption import StopFlag
stop = StopFlag()
os.kill(os.getpid(), signal.SIG{first})
print("flag", stop.signum == signal.SIG{first}, flush=True)
if {agree}:
    print("requested", stop.requested(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # before agreeing: the same request delivered twice
stop.restore()
os.kill(os.getpid(), signal.SIGTERM)  # after restore: ignored once stopping, the default action otherwise
print("survived", flush=True)
"""


@pytest.mark.integration  # a Python subprocess
@pytest.mark.parametrize("first,agree,survives", [("USR1", True, True), ("USR1", False, False),
                                                  ("TERM", False, False)])
def test_stop_flag_records_a_signal_and_a_second_sigterm_still_kills(first, agree, survives):
    """USR1 (Python's default: die) only sets the flag. Before the ranks agree to stop, a second
    SIGTERM is the same request delivered twice, and once the handlers are restored SIGTERM kills
    again (tests/test_process_faults.py: the third signal kills); after they agree, the save and
    the exit are not interrupted."""
    p = subprocess.run([sys.executable, "-c", STOP_FLAG_SCRIPT.format(first=first, agree=agree)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert "flag True" in p.stdout, p.stderr
    if survives:
        assert p.returncode == 0 and "requested True" in p.stdout and "survived" in p.stdout
    else:
        assert p.returncode == -signal.SIGTERM and "survived" not in p.stdout


@pytest.mark.integration  # subprocess.Popen(['true']) for a dead pid
def test_signal_ranks_reaches_registered_pids_on_this_host(tmp_path):
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        mine = slurm_env.register_pid(tmp_path, 0)
        (tmp_path / f"{socket.gethostname()}.rank00001.pid").write_text(f"{dead.pid}\n")  # exited: skipped
        (tmp_path / "otherhost.rank00002.pid").write_text(f"{os.getpid()}\n")  # another node: not here
        assert slurm_env.signal_ranks(tmp_path, signal.SIGUSR1) == [os.getpid()]
        assert got == [signal.SIGUSR1] and mine.read_text() == f"{os.getpid()}\n"
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ---- a real SLURM ---------------------------------------------------------------------------------
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NODE_NAMES = ("n1", "n2")
TINY_RUN = ["train.steps=16", "train.log_every=1", "train.save_every=100", "logging.progress_bar=false",
            "ds.scheduler.params.warmup_num_steps=2", "eval.max_batches=1", "eval.zero_shot=[]", "data.num_workers=0"]


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _ensure_slurm_installed() -> None:
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"{', '.join(missing)} missing and not root to install them: apt-get install -y slurm-wlm munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    assert not missing, f"still missing after apt-get install slurm-wlm munge: {missing}"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    root: Path
    nodes: list[str] = field(default_factory=list)
    daemons: list[subprocess.Popen] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The submitting user's environment: this one without any outer launcher or SLURM job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
               ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LAUNCHER", "GPUS_PER_NODE",
                "JOB_DIR", "LIMOE_ROOT", "PYTHON")}
        return {**env, "PATH": SBIN_PATH, "SLURM_CONF": str(self.conf), **extra}

    def cmd(self, *args: str, check: bool = True) -> str:
        p = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=60)
        if check:
            assert p.returncode == 0, f"{' '.join(args)}: {p.stderr}"
        return p.stdout

    def daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.daemons.append(subprocess.Popen(list(args), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True))

    def submit(self, script: str, args: list[str], *, flags: list[str], **env: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", *flags, str(ROOT / "launch" / "slurm" / script), *args],
                             cwd=ROOT, env=self.env(**env), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        line = self.cmd("scontrol", "show", "job", "-o", job)
        return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)

    def wait(self, job: str, done, timeout: float, what: str) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job)
            if done(info):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job}: not {what} after {timeout:.0f} s: {info.get('JobState')} "
                             f"{info.get('Reason')}\n{self.log(job)[-3000:]}")

    def wait_finished(self, job: str, timeout: float = 300) -> dict[str, str]:
        return self.wait(job, lambda i: i["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                         timeout, "finished")

    def log(self, job: str) -> str:
        path = self.root / "jobs" / f"{job}.out"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for job in self.jobs:  # jobs first: their slurmstepd outlive slurmd
            subprocess.run(["scancel", job], env=self.env(), capture_output=True, timeout=30)
        deadline = time.time() + 60
        while self.jobs and time.time() < deadline:
            p = subprocess.run(["squeue", "-h", "-j", ",".join(self.jobs)], env=self.env(), capture_output=True,
                               text=True, timeout=30)
            if p.returncode != 0 or not p.stdout.strip():
                break
            time.sleep(0.5)
        for d in reversed(self.daemons):  # slurmd, slurmctld, then munged
            with _suppress_lookup():
                os.killpg(d.pid, signal.SIGTERM)
        for d in reversed(self.daemons):
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(d.pid, signal.SIGKILL)
                d.wait()


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is ProcessLookupError


def _slurm_conf(root: Path, host: str, ctld_port: int, node_ports: list[int]) -> str:
    cpus = os.cpu_count() or 1
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={max(cpus, 2)} State=UNKNOWN"
                      for n, p in zip(NODE_NAMES, node_ports))
    # No cgroups, no accounting: processes tracked by parentage, tasks unbound. Each node claims all
    # CPUs of this machine (SlurmdParameters=config_overrides: two slurmd share them). MinJobAge
    # keeps finished jobs visible to scontrol for the assertions; sched_interval=2 starts a job whose
    # begin time has come within 2 s, not 60.
    return f"""ClusterName=limoetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=10
{nodes}
PartitionName=debug Nodes={','.join(NODE_NAMES)} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and two slurmd (nodes n1, n2 on this host), all stopped at the end."""
    assert (MINI / "tokenizer.json").is_file(), f"{MINI} is missing: run python tools/build_mini_dataset.py"
    _ensure_slurm_installed()
    root = tmp_path_factory.mktemp("slurm")
    for d in ("munge", "state", "log", "jobs", *(f"spool/{n}" for n in NODE_NAMES)):
        (root / d).mkdir(parents=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    ctld_port, *node_ports = _free_ports(1 + len(NODE_NAMES))
    cluster = Cluster(root)
    cluster.conf.write_text(_slurm_conf(root, host, ctld_port, node_ports))
    try:
        m = root / "munge"
        cluster.daemon("munged", _which("munged"), "--foreground", "--force", f"--key-file={key}",
                       f"--socket={m}/socket", f"--pid-file={m}/pid", f"--log-file={m}/log", f"--seed-file={m}/seed")
        _wait_for(lambda: (m / "socket").exists(), 20, "munged's socket", cluster)
        cluster.daemon("slurmctld", _which("slurmctld"), "-D", "-i")
        _wait_for(lambda: subprocess.run(["scontrol", "ping"], env=cluster.env(), capture_output=True, text=True,
                                         timeout=30).stdout.count("UP") > 0, 30, "slurmctld", cluster)
        for n in NODE_NAMES:
            cluster.daemon(f"slurmd-{n}", _which("slurmd"), "-D", "-N", n)

        def idle() -> list[str]:
            out = cluster.cmd("sinfo", "-h", "-N", "-o", "%N %t")
            return [line.split()[0] for line in out.splitlines() if line.split()[1] == "idle"]
        deadline = time.time() + 60
        while time.time() < deadline and len(idle()) < len(NODE_NAMES):
            time.sleep(0.5)
        cluster.nodes = idle()
        assert cluster.nodes, f"no node came up:\n{cluster.cmd('sinfo', '-N')}\n{_logs(cluster)}"
        yield cluster
    finally:
        cluster.stop()


def _wait_for(cond, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come up in {timeout} s\n{_logs(cluster)}")


def _logs(cluster: Cluster) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((cluster.root / "log").glob("*.out")))


def _pretrain(cluster: Cluster, name: str, *, launcher: str, nodes: int, ranks_per_node: int) -> tuple[str, Path]:
    """Submit launch/slurm/pretrain.sbatch for the tiny preset: CPU ranks (--gpus-per-node=0 and
    GPUS_PER_NODE), the node names resolve to nothing here so MASTER_ADDR is given."""
    run_dir = cluster.root / "runs" / name
    job = cluster.submit(
        "pretrain.sbatch", [str(ROOT / "ds_configs" / "tiny.json"), "--set", *TINY_RUN, f"train.run_dir={run_dir}"],
        flags=["--partition=debug", f"--nodes={nodes}", f"--ntasks-per-node={ranks_per_node}", "--cpus-per-task=1",
               "--gpus-per-node=0", "--time=15", f"--output={cluster.root}/jobs/%j.out"],
        LAUNCHER=launcher, GPUS_PER_NODE=str(ranks_per_node), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
        PYTHON=sys.executable, JOB_DIR=str(cluster.root / "jobdirs" / name))
    return job, run_dir


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"loss/total"') if path.exists() else 0


@pytest.fixture(scope="module")
def reference(slurm):
    """An uninterrupted 2-rank run through the deepspeed launcher (1 node x 2 ranks)."""
    job, run_dir = _pretrain(slurm, "reference", launcher="deepspeed", nodes=1, ranks_per_node=2)
    info = slurm.wait_finished(job)
    return job, run_dir, info


@pytest.mark.integration  # a real SLURM
def test_sbatch_deepspeed_launcher_trains_checkpoints_and_logs(slurm, reference):
    from limoe_ds.checkpoint import io as checkpoint
    job, run_dir, info = reference
    log = slurm.log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert re.fullmatch(r"n[12] slots=2\n", (slurm.root / "jobdirs" / "reference" / "hostfile").read_text())
    assert "1 node(s) x 2 ranks = 2" in log and "training exited with status 0" in log
    summary = json.loads(log[log.index("\n{\n") + 1:log.index("\n}\n") + 2])
    assert summary["steps"] == 16 and summary["resumed_from_step"] == 0
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")] == ["step00000016"]
    assert checkpoint.read_marker(run_dir / "checkpoints" / "step00000016", "x")["world_size"] == 2
    assert sorted(_losses(run_dir)) == list(range(1, 17))
    assert not list((slurm.root / "jobdirs" / "reference" / "ranks").iterdir())  # PID files removed at exit


def _preempt_and_resume(slurm: Cluster, job: str, run_dir: Path) -> tuple[dict[str, str], str]:
    """Signal the batch shell mid-run as ``--signal=B:USR1@T`` does; the job requeues itself; let
    the requeued job start in 2 s instead of ~2 minutes (SLURM holds a requeued job, Reason=BeginTime;
    a start within the second of the requeue fails on the revoked job credential)."""
    deadline = time.time() + 300
    while _logged_steps(run_dir) < 3:
        assert time.time() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.log(job)[-3000:]
        time.sleep(0.2)
    slurm.cmd("scancel", "--batch", "--signal=USR1", job)
    slurm.wait(job, lambda i: i["JobState"] == "PENDING" and i["Restarts"] == "1", 300, "requeued")
    slurm.cmd("scontrol", "update", f"JobId={job}", "StartTime=now+2")
    info = slurm.wait_finished(job)
    return info, slurm.log(job)


def _check_resumed_bitwise(info, log, run_dir, reference_run_dir):
    from limoe_ds.checkpoint import io as checkpoint
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-3000:]
    m = re.search(r"preempted: stopped at step (\d+) on SIGUSR1", log)
    assert m, log[-3000:]
    stop = int(m.group(1))
    assert 3 <= stop < 16  # mid-run, at a step no save_every would have saved
    assert "stopped with a checkpoint (exit 75): requeueing" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stop:08d}'} at step {stop}" in log
    assert log.count("training exited with status 0") == 1
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")] == [
        f"step{stop:08d}", "step00000016"]
    a, b = _losses(reference_run_dir), _losses(run_dir)
    assert sorted(b) == list(range(1, 17))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: same data, RNG and optimizer state


@pytest.mark.integration  # a real SLURM
def test_preempted_srun_job_requeues_itself_and_resumes_bitwise(slurm, reference):
    """srun mode (no ssh), one rank on each of the two nodes (or 2 on one if only one slurmd came up):
    the batch shell forwards the signal to srun, which passes it to every task."""
    nodes = len(slurm.nodes)
    job, run_dir = _pretrain(slurm, "srun", launcher="srun", nodes=nodes, ranks_per_node=2 // nodes)
    info, log = _preempt_and_resume(slurm, job, run_dir)
    assert f"{nodes} node(s) x {2 // nodes} ranks = 2" in log
    _check_resumed_bitwise(info, log, run_dir, reference[1])


@pytest.mark.integration  # a real SLURM
def test_preempted_deepspeed_launcher_job_forwards_the_signal_and_resumes_bitwise(slurm, reference):
    """The deepspeed launcher would kill its ranks on SIGTERM and dies on SIGUSR1: the batch shell
    signals the ranks themselves (their PID files)."""
    job, run_dir = _pretrain(slurm, "deepspeed", launcher="deepspeed", nodes=1, ranks_per_node=2)
    info, log = _preempt_and_resume(slurm, job, run_dir)
    assert re.search(r"sent SIGUSR1 to 2 rank\(s\)", log), log[-3000:]
    _check_resumed_bitwise(info, log, run_dir, reference[1])


@pytest.mark.integration  # a real SLURM
def test_evaluate_job_on_two_srun_ranks(slurm, reference):
    nodes = len(slurm.nodes)
    ckpt = reference[1] / "checkpoints" / "step00000016"
    out = slurm.root / "report.json"
    job = slurm.submit("evaluate.sbatch", ["--checkpoint", str(ckpt), "--out", str(out), "--set", "eval.zero_shot=[]"],
                       flags=["--partition=debug", f"--nodes={nodes}", f"--ntasks-per-node={2 // nodes}",
                              "--cpus-per-task=1", "--gpus-per-node=0", f"--output={slurm.root}/jobs/%j.out"],
                       MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    info = slurm.wait_finished(job)
    assert info["JobState"] == "COMPLETED", slurm.log(job)[-3000:]
    report = json.loads(out.read_text())
    assert report["step"] == 16 and report["ranks"] == 2
    assert report["metrics"]["dropless/val/pairs"] == 512  # eval.max_batches=1 from the run: one batch per rank


@pytest.mark.integration  # a real SLURM
@pytest.mark.skipif(not (ROOT / "tools" / "convert_checkpoint.py").exists(),
                    reason="tools/convert_checkpoint.py (issue #7) is not in this tree")
def test_convert_job_passes_its_arguments_through(slurm, reference):
    ckpt = reference[1] / "checkpoints" / "step00000016"
    job = slurm.submit("convert.sbatch", ["inspect", str(ckpt)],
                       flags=["--partition=debug", "--cpus-per-task=1", f"--output={slurm.root}/jobs/%j.out"],
                       OMP_NUM_THREADS="1", PYTHON=sys.executable)
    info = slurm.wait_finished(job)
    log = slurm.log(job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"tools/convert_checkpoint.py inspect {ckpt}" in log


@pytest.mark.integration  # a real SLURM
def test_an_experiment_grid_as_a_job_array_one_run_per_task(slurm, tmp_path):
    """launch/slurm/experiment.sbatch: a 1-config x 2-seed grid of tools/experiment.py as a 2-task
    array (one rank each); each task trains its run through pretrain.sbatch, stores its result and
    rewrites the grid's results.json (under a lock: the tasks finish together)."""
    import yaml
    out = slurm.root / "experiment"
    grid = tmp_path / "grid.yaml"
    sets = [*TINY_RUN, "train.steps=4", "parallel.expert_parallel_size=1"]
    grid.write_text(yaml.safe_dump({"name": "array", "ds_config": str(ROOT / "ds_configs" / "tiny.json"), "ranks": 1,
                                    "seeds": [0, 1], "sets": sets, "configs": {"limoe": []}, "out": str(out)},
                                   sort_keys=False))
    job = slurm.submit("experiment.sbatch", [str(grid)],
                       flags=["--partition=debug", "--array=0-1", "--nodes=1", "--ntasks-per-node=1",
                              "--cpus-per-task=1", "--gpus-per-node=0", "--time=15",
                              f"--output={slurm.root}/jobs/%A_%a.out"],
                       LAUNCHER="deepspeed", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
                       PYTHON=sys.executable, JOB_DIR=str(slurm.root / "jobdirs" / "array"))
    deadline = time.time() + 300
    while slurm.cmd("squeue", "-h", "-j", job).strip():
        assert time.time() < deadline, slurm.cmd("squeue", "-j", job) + _logs(slurm)
        time.sleep(0.5)
    logs = [(slurm.root / "jobs" / f"{job}_{t}.out").read_text() for t in (0, 1)]
    for t, log in enumerate(logs):
        assert f"array task {t}: run limoe/seed{t} (todo)" in log, log[-3000:]
        assert "training exited with status 0" in log and "after the run:" in log, log[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["status"], r["steps"]) for r in doc["runs"]] == [(0, "done", 4), (1, "done", 4)]
    assert doc["table"]["limoe"]["dropless/val/contrastive"]["n"] == 2
    again = slurm.submit("experiment.sbatch", [str(grid)], flags=["--partition=debug", "--array=1", "--nodes=1",
                         "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15",
                         f"--output={slurm.root}/jobs/%A_%a.out"], PYTHON=sys.executable)
    deadline = time.time() + 120
    while slurm.cmd("squeue", "-h", "-j", again).strip():
        assert time.time() < deadline, slurm.cmd("squeue", "-j", again)
        time.sleep(0.5)
    assert "run limoe/seed1 finished earlier: nothing to do" in (slurm.root / "jobs" / f"{again}_1.out").read_text()
