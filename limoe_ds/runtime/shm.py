"""DeepSpeed's CPU shared-memory all-reduce buffers, which DeepSpeed 0.19.8 never removes.

When every rank of a CPU job runs on one machine (the deepspeed launcher sets ``LOCAL_SIZE`` to
the world size), each rank creates ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}``
(66 MB, in RAM: /dev/shm is a tmpfs) and maps its peers'. Nothing unlinks them, so every run left
world_size buffers behind until reboot; a few hundred runs (a test suite, a day of experiments)
fill a 24 GiB machine and everything after it swaps or is OOM-killed.

:func:`unlink_own` (called by ``engine.init_distributed`` once every rank has mapped its peers)
removes the name at start; the memory lives as long as the mappings, i.e. until the processes
exit or are killed. :func:`stale_buffers` finds what earlier runs (or other programs using
DeepSpeed on this machine) left: buffers no running process maps (``tools/clean_shm.py``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"


def buffer_path(rank: int, env: Mapping[str, str] = os.environ) -> Path:
    """DeepSpeed's name for ``rank``'s buffer of the job whose rendezvous ``env`` holds."""
    return SHM_DIR / f"{PREFIX}{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def unlink_own(rank: int) -> None:
    """Unlink this rank's buffer name. Only after every local rank has mapped it (a barrier after
    ``deepspeed.init_distributed``): a peer still opening it would wait for it forever."""
    buffer_path(rank).unlink(missing_ok=True)


def _mapped_paths() -> set[str]:
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(line.split(None, 5)[5].strip() for line in text.splitlines()
                      if PREFIX in line and len(line.split(None, 5)) == 6)
    return mapped


def stale_buffers(min_age_s: float = 60.0, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Buffers that no running process maps and that are older than ``min_age_s`` (a starting job
    creates its buffer a moment before mapping it)."""
    mapped = _mapped_paths()
    now = time.time()
    stale = []
    for path in sorted(Path(shm_dir).glob(PREFIX + "*")):
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if str(path) not in mapped and age >= min_age_s:
            stale.append(path)
    return stale
