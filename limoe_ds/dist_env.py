"""The one place that reads the launcher's rank variables (deepspeed launcher, torchrun)."""

from __future__ import annotations

import os


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
