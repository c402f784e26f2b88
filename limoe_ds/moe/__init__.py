"""MoE routing (pure functions) and the DeepSpeed-MoE layer.

DeepSpeed's logger writes to stdout from the moment it is imported (e.g. its accelerator
warning); importing it here with stdout redirected points that handler at stderr, so the
project's own stdout (JSON from tools, the training summary) stays clean.
"""

import contextlib
import sys

with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401
