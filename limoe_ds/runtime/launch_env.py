"""The one place that reads the launcher's and the scheduler's environment variables.

A rank learns its place from whoever started it:

- the deepspeed launcher or torchrun: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` (these win whenever ``RANK`` and ``WORLD_SIZE`` are both set: a launcher started
  inside a SLURM job also sees the job's ``SLURM_*`` variables);
- ``srun`` with no launcher (a job step: ``SLURM_STEP_ID`` is set): ``SLURM_PROCID`` -> rank,
  ``SLURM_LOCALID`` -> local rank, ``SLURM_NTASKS`` -> world size; ``MASTER_ADDR`` / ``MASTER_PORT``
  as the batch script exported them, otherwise the first node of the step's node list and a port
  derived from ``SLURM_JOB_ID``. :func:`export_torch_env` writes this into the torch variables
  before the process group starts. A batch script's own shell (no step id) is not a rank;
- nothing: one rank.

The SLURM side of ``launch/slurm/pretrain.sbatch`` (node lists, the hostfile, signal forwarding)
is ``limoe_ds.runtime.slurm``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping


class LaunchEnvError(ValueError):
    """A launcher or scheduler variable is missing or malformed (the message names it)."""


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "deepspeed" (or any launcher setting RANK/WORLD_SIZE), "torchrun", "srun", "none"
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None = None
    master_port: int | None = None


def _int(env: Mapping[str, str], key: str, *, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None:
        if default is None:
            raise LaunchEnvError(f"{key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"{key}={raw!r} is not an integer") from None


def _port(raw: str, key: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise LaunchEnvError(f"{key}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise LaunchEnvError(f"{key}={raw!r} is not a port number (1-65535)")
    return port


def free_port() -> int:
    """A TCP port free on this machine now (for a one-machine rendezvous started right away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job when MASTER_PORT is not given: every rank derives the
    same one, and jobs sharing a first node rarely collide. 20000-39999 overlaps Linux's ephemeral
    ports (32768+): set MASTER_PORT where a collision matters."""
    return 20000 + job_id % 20000


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Where this process stands, from ``env`` (default ``os.environ``); see the module docstring."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        if ("RANK" in env) != ("WORLD_SIZE" in env):
            have, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
            raise LaunchEnvError(f"{missing} is not set but {have} is: a launcher sets both "
                                 f"(unset {have} to run as a single process)")
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        out = LaunchEnv(launcher, _int(env, "RANK"), _int(env, "LOCAL_RANK", default=0), _int(env, "WORLD_SIZE"),
                        env.get("MASTER_ADDR"),
                        _port(env["MASTER_PORT"], "MASTER_PORT") if "MASTER_PORT" in env else None)
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        out = _from_srun(env)
        names = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
    else:
        return LaunchEnv("none", 0, 0, 1)
    if out.world_size < 1:
        raise LaunchEnvError(f"{names[2]}={out.world_size} must be >= 1")
    if not 0 <= out.rank < out.world_size:
        raise LaunchEnvError(f"{names[0]}={out.rank} is outside [0, {names[2]}={out.world_size})")
    if out.local_rank < 0:
        raise LaunchEnvError(f"{names[1]}={out.local_rank} must be >= 0")
    return out


def _from_srun(env: Mapping[str, str]) -> LaunchEnv:
    rank, local, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), _int(env, "SLURM_NTASKS")
    addr = env.get("MASTER_ADDR")
    if not addr:
        from limoe_ds.runtime.slurm import expand_nodelist
        key = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
        if key not in env:
            raise LaunchEnvError("MASTER_ADDR is not set and neither is SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST")
        try:
            addr = expand_nodelist(env[key])[0]
        except LaunchEnvError as e:
            raise LaunchEnvError(f"{key}: {e}") from None
    if "MASTER_PORT" in env:
        port = _port(env["MASTER_PORT"], "MASTER_PORT")
    else:
        port = job_port(_int(env, "SLURM_JOB_ID"))
    return LaunchEnv("srun", rank, local, world, addr, port)


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) when run alone."""
    e = launch_env()
    return e.rank, e.world_size


def export_torch_env(env: MutableMapping[str, str] | None = None) -> LaunchEnv:
    """Under srun, write RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (what torch's
    ``env://`` rendezvous and DeepSpeed read) from the SLURM variables; otherwise leave them."""
    env = os.environ if env is None else env
    e = launch_env(env)
    if e.launcher == "srun":
        env.update(RANK=str(e.rank), LOCAL_RANK=str(e.local_rank), WORLD_SIZE=str(e.world_size),
                   MASTER_ADDR=e.master_addr, MASTER_PORT=str(e.master_port))
    return e


