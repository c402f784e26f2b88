#!/usr/bin/env python
"""Write the legacy checkpoint fixtures: checkpoints made by an EARLIER version of limoe_ds, which
the current code must resume bitwise (tests/integration/test_legacy_checkpoints.py).

Run it at the commit named in expected.json (the code as it was before the package was reshaped),
from the repository root, with the bundled data built:

    git worktree add /tmp/old 33bb43a && cd /tmp/old && ln -s $PWD/../main/data data
    python tests/assets/legacy/make_fixtures.py --out /path/to/repo/tests/assets/legacy

For each layout (expert-parallel 2, tensor-parallel 2; 2 CPU ranks through the deepspeed launcher)
a small LIMoE (width 16, 2 blocks, the second a 4-expert MoE layer; the tiny preset's tokenizer and
data) trains 4 steps with a checkpoint at step 2; the step-2 checkpoint is kept, with the per-step
losses of the uninterrupted run (metrics.jsonl) that a resume from it must reproduce exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path.cwd()
SMALL = ["model.width=16", "model.mlp_dim=32", "model.num_heads=2", "model.depth=2", "model.moe.layers=[1]",
         "train.steps=4", "train.save_every=2", "train.keep_last=2", "train.log_every=1",
         "logging.progress_bar=false", "logging.tensorboard=false", "ds.scheduler.params.warmup_num_steps=2",
         "eval.max_batches=1", "eval.zero_shot=[]"]
LAYOUTS = {"ep2": ["parallel.expert_parallel_size=2"],
           "tp2": ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=1", "ds.train_batch_size=64"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, sets: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
           "launch/pretrain.py", "--deepspeed_config", "ds_configs/tiny.json", "--set", f"train.run_dir={run_dir}",
           *sets]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def losses(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {str(r["step"]): r["loss/total"] for r in rows if "loss/total" in r}


def export_digest(ckpt: Path, tmp: str) -> dict[str, str]:
    """sha256 of every tensor of the checkpoint's export (tools/convert_checkpoint.py export)."""
    import hashlib
    from safetensors.torch import load_file
    out = Path(tmp) / f"export-{ckpt.parent.name}"
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "export", str(ckpt), str(out)], cwd=ROOT, check=True)
    weights = load_file(str(out / "model.safetensors"))
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(weights.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import torch
    # the kernels' instruction set: the losses are bitwise on machines of the same one only
    expected = {"commit": commit, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "sets": SMALL,
                "layouts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items():
            run_dir = Path(tmp) / name
            launch(run_dir, SMALL + layout)
            dest = args.out / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(run_dir / "checkpoints" / "step00000002", dest / "step00000002")
            expected["layouts"][name] = {"sets": layout, "losses": losses(run_dir),
                                         "export_sha256": export_digest(dest / "step00000002", tmp)}
    (args.out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
