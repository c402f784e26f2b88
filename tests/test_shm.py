"""DeepSpeed's CPU all-reduce buffers in /dev/shm: found when stale, never when in use or new.

That launched runs leave none behind (limoe_ds.train.engine unlinks them at init) is asserted by
test_train.test_resume_after_kill_9_continues_bitwise, on finished and SIGKILLed runs.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

from limoe_ds.runtime import shm
from test_train import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import clean_shm  # noqa: E402


def _buffer(shm_dir, tag: str, age_s: float):
    path = shm_dir / f"{shm.PREFIX}{os.getuid()}_127.0.0.1_{tag}_0"
    path.write_bytes(b"\0" * 4096)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_stale_buffers_skips_mapped_and_new_ones_and_the_tool_removes_only_stale(tmp_path, capsys):
    old, young, mapped = _buffer(tmp_path, "1", 600), _buffer(tmp_path, "2", 5), _buffer(tmp_path, "3", 600)
    (tmp_path / "unrelated").write_bytes(b"x")
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):  # a running job's buffer
        assert shm.stale_buffers(60, tmp_path) == [old]
        assert clean_shm.main(["--dry-run", "--dir", str(tmp_path)]) == 0 and old.exists()
        assert clean_shm.main(["--dir", str(tmp_path)]) == 0
        assert "removed 1 stale" in capsys.readouterr().out.splitlines()[-1]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, mapped.name, "unrelated"])
