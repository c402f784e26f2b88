#!/usr/bin/env python
"""Remove the /dev/shm buffers that earlier DeepSpeed CPU runs left behind (66 MB of RAM each).

    python tools/clean_shm.py            # list them and remove them
    python tools/clean_shm.py --dry-run  # only list them

limoe_ds unlinks its own runs' buffers at start (limoe_ds/runtime/shm.py); runs of older versions, or
other DeepSpeed programs, leave one per rank until reboot. Only buffers that no running process
maps and that are older than a minute are touched, so a job starting now is safe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.runtime import shm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="list, do not remove")
    ap.add_argument("--min-age", type=float, default=60.0, help="seconds since a buffer was created (default 60)")
    ap.add_argument("--dir", type=Path, default=shm.SHM_DIR, help=f"where to look (default {shm.SHM_DIR})")
    args = ap.parse_args(argv)
    stale = shm.stale_buffers(args.min_age, args.dir)
    total = 0
    for path in stale:
        try:
            total += path.stat().st_size
            if not args.dry_run:
                path.unlink()
        except FileNotFoundError:
            continue
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(stale)} stale DeepSpeed shm buffer(s), {total / 2**20:.0f} MiB, from {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
