"""The SLURM side of launch/slurm/pretrain.sbatch: node lists, the deepspeed hostfile, ranks per node,
and forwarding a preemption signal to the training ranks (``python -m limoe_ds.runtime.slurm``)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Mapping

from limoe_ds.runtime.cli import fail
from limoe_ds.runtime.launch_env import LaunchEnvError, _int, _port, job_port


# ---- SLURM node lists and the deepspeed hostfile ------------------------------------------------
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
MAX_HOSTS = 100_000


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: ``gpu[01-03,07],login1`` ->
    ``gpu01 gpu02 gpu03 gpu07 login1``; several bracket groups in one name expand as a product
    (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``); zero padding follows the range's first number."""
    if not nodelist or not nodelist.strip():
        raise LaunchEnvError("empty node list")
    hosts: list[str] = []
    for item in _split_top(nodelist):
        hosts.extend(_expand_item(item, nodelist))
        if len(hosts) > MAX_HOSTS:
            raise LaunchEnvError(f"node list {nodelist!r} expands to more than {MAX_HOSTS} hosts")
    dup = _first_dup(hosts)
    if dup is not None:
        raise LaunchEnvError(f"node list {nodelist!r} names {dup!r} twice")
    return hosts


def _first_dup(names: list[str]) -> str | None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


def _split_top(nodelist: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            if depth:
                raise LaunchEnvError(f"node list {nodelist!r}: nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise LaunchEnvError(f"node list {nodelist!r}: ']' without '['")
            depth = 0
        if ch == "," and not depth:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise LaunchEnvError(f"node list {nodelist!r}: '[' without ']'")
    items.append(cur)
    if any(not it for it in items):
        raise LaunchEnvError(f"node list {nodelist!r}: empty host name (stray comma)")
    return items


def _expand_item(item: str, nodelist: str) -> list[str]:
    parts = re.split(r"(\[[^\]]*\])", item)  # literal, [group], literal, ...
    names = [""]
    for part in parts:
        if part.startswith("["):
            names = [n + v for n in names for v in _expand_group(part[1:-1], nodelist)]
        else:
            names = [n + part for n in names]
    for n in names:
        if not _HOST.match(n):
            raise LaunchEnvError(f"node list {nodelist!r}: {n!r} is not a host name")
    return names


def _expand_group(group: str, nodelist: str) -> list[str]:
    if not group:
        raise LaunchEnvError(f"node list {nodelist!r}: empty '[]'")
    out = []
    for rng in group.split(","):
        m = _RANGE.match(rng)
        if not m:
            raise LaunchEnvError(f"node list {nodelist!r}: {rng!r} in [...] is not N or N-M")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise LaunchEnvError(f"node list {nodelist!r}: range {rng!r} runs backwards")
        if int(hi) - int(lo) >= MAX_HOSTS:
            raise LaunchEnvError(f"node list {nodelist!r} expands to more than {MAX_HOSTS} hosts")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def check_hostnames(names: list[str]) -> list[str]:
    """Host names one per entry (``scontrol show hostnames`` output), checked: non-empty, each a
    valid host name, no repeats."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise LaunchEnvError("no host names (is SLURM_JOB_NODELIST set? run inside an allocation)")
    for n in names:
        if not _HOST.match(n):
            raise LaunchEnvError(f"{n!r} is not a host name")
    dup = _first_dup(names)
    if dup is not None:
        raise LaunchEnvError(f"host {dup!r} appears twice")
    return names


def hostfile_text(hosts: list[str], slots: int) -> str:
    """The deepspeed launcher's hostfile: one ``HOST slots=N`` line per node."""
    if slots < 1:
        raise LaunchEnvError(f"slots={slots}: need at least one rank per node")
    return "".join(f"{h} slots={slots}\n" for h in check_hostnames(hosts))


def ranks_per_node(env: Mapping[str, str] | None = None) -> int:
    """Training ranks per node: ``GPUS_PER_NODE`` when given (CPU ranks on a CPU node), else the
    GPUs SLURM allocated on this node (``SLURM_GPUS_ON_NODE``, or ``SLURM_GPUS_PER_NODE`` =
    ``[type:]N``)."""
    env = os.environ if env is None else env
    for key in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        raw = env.get(key, "").strip()
        if not raw:
            continue
        count = raw.rsplit(":", 1)[-1]  # SLURM_GPUS_PER_NODE may be "a100:8"
        if not count.isdigit():
            raise LaunchEnvError(f"{key}={raw!r}: expected a number of GPUs per node ([type:]N)")
        if int(count) > 0:
            return int(count)
        if key == "GPUS_PER_NODE":
            raise LaunchEnvError("GPUS_PER_NODE=0: need at least one rank per node")
    raise LaunchEnvError("no GPUs per node: request them (sbatch --gpus-per-node=N) or set GPUS_PER_NODE=N "
                         "(ranks per node; CPU ranks on CPU nodes)")


def slurm_launch_plan(hostnames: list[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the batch script exports before launching: MASTER_ADDR (first node), MASTER_PORT (kept
    when set, else derived from the job id), NNODES, GPUS_PER_NODE, WORLD (ranks in all)."""
    env = os.environ if env is None else env
    hosts = check_hostnames(hostnames)
    slots = ranks_per_node(env)
    port = _port(env["MASTER_PORT"], "MASTER_PORT") if env.get("MASTER_PORT") else job_port(_int(env, "SLURM_JOB_ID"))
    return {"MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0], "MASTER_PORT": str(port), "NNODES": str(len(hosts)),
            "GPUS_PER_NODE": str(slots), "WORLD": str(len(hosts) * slots)}


# ---- forwarding a preemption signal to the ranks (deepspeed launcher mode) -----------------------
def register_pid(pid_dir: str | Path, rank: int) -> Path:
    """Record this rank's PID as ``PID_DIR/HOST.rankR.pid`` (removed by the caller at exit), so a
    batch script can signal the ranks past the deepspeed launcher (see :func:`signal_ranks`)."""
    path = Path(pid_dir) / f"{socket.gethostname()}.rank{rank:05d}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    return path


def signal_ranks(pid_dir: str | Path, signum: int) -> list[int]:
    """Send ``signum`` to the ranks of this host registered under ``pid_dir``; returns their PIDs.
    One rank is enough: training turns any rank's signal into a collective stop."""
    host = socket.gethostname()
    sent = []
    for f in sorted(Path(pid_dir).glob(f"{host}.rank*.pid")):
        try:
            pid = int(f.read_text().strip())
            os.kill(pid, signum)
        except (ValueError, ProcessLookupError, FileNotFoundError):
            continue  # a rank that already exited
        sent.append(pid)
    return sent


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m limoe_ds.runtime.slurm",
                                 description="SLURM helpers for launch/slurm/pretrain.sbatch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    plan = sub.add_parser("slurm-plan", help="host names on stdin (scontrol show hostnames) -> hostfile + "
                                             "shell exports of MASTER_ADDR MASTER_PORT NNODES GPUS_PER_NODE WORLD")
    plan.add_argument("--hostfile", required=True)
    sig = sub.add_parser("signal-ranks", help="signal this host's ranks registered in --pid-dir")
    sig.add_argument("--pid-dir", required=True)
    sig.add_argument("--signal", default="USR1", help="USR1 (default), TERM, ...")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "slurm-plan":
            names = sys.stdin.read().split()
            plan = slurm_launch_plan(names)
            Path(args.hostfile).write_text(hostfile_text(names, int(plan["GPUS_PER_NODE"])))
            print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in plan.items()), end="")
        else:
            signum = signal.Signals[f"SIG{args.signal.upper().removeprefix('SIG')}"]
            sent = signal_ranks(args.pid_dir, signum)
            if not sent:
                return 1  # no rank of this host has started yet: the batch script retries
            print(f"sent {signum.name} to {len(sent)} rank(s) on {socket.gethostname()}: {sent}", file=sys.stderr)
    except LaunchEnvError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
