#!/usr/bin/env python
"""Convert limoe_ds DeepSpeed checkpoints (DeepSpeed's zero_to_fp32 rejects MoE checkpoints).

    python tools/convert_checkpoint.py export runs/b16/checkpoints/step00100000 exports/b16
    python tools/convert_checkpoint.py inspect runs/b16/checkpoints/step00100000
    python tools/convert_checkpoint.py reshard runs/b16/checkpoints/step00100000 runs/b16-ep4/checkpoints \
        --tp 1 --ep 4 --world 32

export: a ZeRO 0/1/2 checkpoint of any expert- and tensor-parallel size -> a directory with
model.safetensors (the fp32 optimizer master weights, single-device names: every expert, every
head), config.json (the model config), tokenizer.json and limoe_export.json (provenance). Load it
with ``limoe_ds.load_pretrained(path)``. The directory appears only when complete.

reshard: a ZeRO 1/2 checkpoint -> a checkpoint for another layout (tensor-parallel size, expert-parallel
size, world size), with the fp32 master weights, Adam's moments per parameter and per expert
(re-partitioned by DeepSpeed's own ZeRO code at the new layout), the LR schedule and the step. When
the data-parallel size is unchanged each rank's data position and RNG state carry over (training
resumes exactly); otherwise every data source continues at the start of its next epoch (the rest
of the epoch in progress is skipped: per-reader positions do not map to other ranks). Runs the target
layout's ranks as CPU processes here, or one rank each under a launcher with --world ranks. Resume
with ``--resume OUT/stepN`` at the new layout.

inspect: the checkpoint's layout, step and parameter count, after checking every file's size and
checksum against the completion marker and reading every shard (a check that a copied checkpoint is
whole; a checkpoint written before checksums were recorded gets its zip CRCs checked instead).
export and reshard check the same first.

Errors (missing shard, truncated or damaged file, unreadable marker, parameters that do not match
the checkpoint's config, an existing output) print one ``error: ...`` line and exit 2. Runs on CPU, no process group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.runtime.cli import fail  # noqa: E402
from limoe_ds.checkpoint.convert import CheckpointError, export, read_full_state
from limoe_ds.checkpoint.reshard import reshard  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="checkpoint -> safetensors + config + tokenizer")
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    rs = sub.add_parser("reshard", help="checkpoint -> checkpoint at another tp / ep / world size")
    rs.add_argument("checkpoint", type=Path)
    rs.add_argument("out", type=Path, help="a new checkpoint root (OUT/stepN is written)")
    rs.add_argument("--tp", type=int, default=1)
    rs.add_argument("--ep", type=int, required=True)
    rs.add_argument("--world", type=int, required=True)
    rs.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    ins = sub.add_parser("inspect", help="read every shard; print layout, step, parameter count")
    ins.add_argument("checkpoint", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.command == "export":
            out = export(args.checkpoint, args.out, overwrite=args.overwrite)
            print(json.dumps({"exported": str(out), **json.loads((out / "limoe_export.json").read_text())}, indent=1))
        elif args.command == "reshard":
            out = reshard(args.checkpoint, args.out, tp=args.tp, ep=args.ep, world=args.world)
            from limoe_ds.runtime.launch_env import world_from_env
            if world_from_env()[0] == 0:
                print(json.dumps({"resharded": str(args.checkpoint), "out": str(out), "tp": args.tp, "ep": args.ep,
                                  "world": args.world, "latest": (out / "latest").read_text().strip()}, indent=1))
        else:
            state = read_full_state(args.checkpoint)
            print(json.dumps({"checkpoint": str(args.checkpoint), "step": state.step,
                              "layout": {"tp": state.layout.tp, "ep": state.layout.ep,
                                         "world_size": state.layout.world_size},
                              "num_params": sum(v.numel() for v in state.weights.values()),
                              "adam_steps": sorted(set(state.adam_step.values()))}, indent=1))
    except CheckpointError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
