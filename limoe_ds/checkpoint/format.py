"""Every file name of a limoe_ds checkpoint, in one place (no torch).

Under ``RUN_DIR/checkpoints``::

    step00000500/                                  a complete checkpoint (``tag(step)``)
        limoe_complete.json                        the completion marker, written last (``MARKER``)
        limoe_rank00000.pt                         per-rank state: RNG states, data position
        mp_rank_00_model_states.pt                 DeepSpeed: the module (one per tp rank)
        layer_0_expert_3_mp_rank_00_model_states.pt  DeepSpeed: one file per expert (global index)
        [bf16_]zero_pp_rank_0_mp_rank_00_optim_states.pt   DeepSpeed ZeRO 1/2: a rank's optimizer partition
        expp_rank_0_mp_rank_00_optim_states.pt     DeepSpeed ZeRO 0: an ep rank's whole optimizer state
    step00000500.partial/                          a save in progress (ignored, removed by the next save)
    latest                                         the newest complete tag
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "limoe_complete.json"
"""Written last; holds the run's config, layout and, since checksums were added, ``"files"``:
``{name: {"bytes": N, "crc32": "8 hex digits"}}`` for every file of the checkpoint
(``limoe_ds.checkpoint.integrity``)."""
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
_TAG = re.compile(r"^step(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written (missing, truncated or damaged file, unreadable
    marker, disk full); the message is one line naming the file, what is wrong and the fix. Entry
    points print it as ``error: ...`` and exit 2 (``limoe_ds.runtime.cli.fail``)."""


DAMAGED_SUFFIX = ".damaged"
"""A damaged checkpoint set aside when its step is saved again (never deleted automatically)."""


def tag(step: int) -> str:
    return f"step{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a complete checkpoint's directory name, None for anything else."""
    m = _TAG.match(name)
    return int(m.group(1)) if m else None


def rank_state(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"limoe_rank{rank:05d}.pt"


def model_states(ckpt_dir: Path, tp_rank: int) -> Path:
    return Path(ckpt_dir) / f"mp_rank_{tp_rank:02d}_model_states.pt"


def expert_states(ckpt_dir: Path, moe_layer: int, expert: int, tp_rank: int) -> Path:
    """``moe_layer`` numbers the MoE layers in model order; ``expert`` is the global index."""
    return Path(ckpt_dir) / f"layer_{moe_layer}_expert_{expert}_mp_rank_{tp_rank:02d}_model_states.pt"


EXPERT_STATES_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"
"""Every expert file of tp lane 0 (experts are replicated over tp ranks)."""


def zero_states(ckpt_dir: Path, dp_rank: int, tp_rank: int) -> Path:
    """A rank's ZeRO 1/2 optimizer partition; DeepSpeed prefixes it with the dtype in bf16 runs."""
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
    bf16 = Path(ckpt_dir) / f"bf16_{name}"
    return bf16 if bf16.is_file() else Path(ckpt_dir) / name


def zero0_states(ckpt_dir: Path, ep_rank: int, tp_rank: int) -> Path:
    """A ZeRO-0 run's whole optimizer state of one expert-parallel rank and tp lane."""
    return Path(ckpt_dir) / f"expp_rank_{ep_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
