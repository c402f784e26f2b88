"""The one way an entry point reports a user's mistake: one ``error: ...`` line, exit status 2.

Every tool and launch script ends its validation with ``except ...Error as e: return fail(e)``.
Stdlib only (cheap to import before torch).
"""

from __future__ import annotations

import sys
import time

EXIT_USAGE = 2
"""Exit status of a run or tool stopped by a configuration, data, checkpoint or launch error."""


def fail(error: BaseException | str, *, rank: int = 0, every_rank: bool = False) -> int:
    """Print ``error: <message>`` on stderr and return EXIT_USAGE.

    By default rank 0 prints: every rank finds the same configuration error, and a launcher kills
    all ranks at the first exit, so the other ranks wait a moment to let rank 0 print it first.
    ``every_rank``: an error one rank found on its own (its data, mid-run): each rank prints it,
    as ``error (rank R): ...``."""
    if every_rank:
        print(f"error (rank {rank}): {error}", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    return EXIT_USAGE
