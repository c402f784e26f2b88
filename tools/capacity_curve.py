#!/usr/bin/env python
"""V-MoE's inference trick, measured: a classifier's held-out top-1 at capacity factors below and
above 1, with Batch Priority Routing and without (Riquelme et al. 2021, Figure 6), plus each MoE
layer's routing success (the share of image patches that got an expert slot).

    python tools/capacity_curve.py --checkpoint runs/tiny_vmoe/checkpoints/step00001500 \
        [--cf 0.25,0.5,0.75,1.0,1.25,1.5] [--batch-size 250] [--out curve.json] [--markdown curve.md]

The checkpoint's model is rebuilt on one process with every expert (its evaluation data:
``data.val``, or ``--set data.val=PATH``). Each evaluation batch of B images is one routing pool of
B x patches tokens, so the capacity is C = ceil(cf x B x patches / E) per expert: with BPR the
patches with the highest router probability get the slots; without it, first come first served
(batch order, so the last images of a batch lose their patches first). A dropped patch skips the
expert and keeps its residual. Only the routing changes between rows: same weights, same images.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.runtime.cli import fail  # noqa: E402
from limoe_ds.checkpoint import io as checkpoint  # noqa: E402


def curve(model, loader, cfs: list[float]) -> list[dict]:
    """[{cf, bpr, top1, xent, images, success: {layer: image success rate}}], dropless (cf None) first."""
    from limoe_ds.eval.run import RoutingRecord, batch_priority, classify_images
    rows = []
    for cf in [None, *cfs]:
        for bpr in ((True,) if cf is None else (True, False)):  # dropless drops nothing: BPR is moot
            record = RoutingRecord()
            with batch_priority(model, bpr):
                res = classify_images(model, loader, record=record, modes={"m": cf})["m"]
            success = {layer: round(s["image"]["success_rate"], 4) for layer, s in record.summary().items()}
            rows.append({"cf": cf, "bpr": bpr, "top1": res["top1"], "xent": res["xent"], "images": res["images"],
                         "success": success})
    return rows


def markdown(rows: list[dict]) -> str:
    layers = list(rows[0]["success"])
    head = ("| capacity factor | top-1 with BPR | top-1 without BPR | "
            + " | ".join(f"patches routed, {layer} (BPR / no BPR)" for layer in layers) + " |")
    lines = [head, "|" + "---|" * (3 + len(layers))]
    by = {(r["cf"], r["bpr"]): r for r in rows}
    for cf in dict.fromkeys(r["cf"] for r in rows):
        on, off = by[(cf, True)], by.get((cf, False))
        name = "dropless" if cf is None else f"{cf:g}"
        cells = [name, f"{100 * on['top1']:.2f}%", f"{100 * off['top1']:.2f}%" if off else "="]
        cells += [f"{100 * on['success'][layer]:.1f}% / {100 * off['success'][layer]:.1f}%" if off
                  else f"{100 * on['success'][layer]:.1f}%" for layer in layers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--cf", default="0.25,0.5,0.75,1.0,1.25,1.5", help="comma-separated capacity factors")
    ap.add_argument("--batch-size", type=int, default=0, help="images per routing pool (default: eval.batch_size)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, help="write the JSON report here too (atomically)")
    ap.add_argument("--markdown", type=Path, help="write the table here (atomically)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    try:
        cfs = [float(x) for x in args.cf.split(",") if x.strip()]
        if not cfs or min(cfs) <= 0:
            raise ValueError(f"--cf: give capacity factors > 0, e.g. 0.25,0.5,1.0; got {args.cf!r}")
        cfg = checkpoint.evaluation_config(args.checkpoint, args.set, 1)
        if not cfg.model.classifier or cfg.model.any_moe is None:
            raise ValueError(f"--checkpoint: {args.checkpoint} is not a sparse classifier (model.num_classes with "
                             f"MoE layers, e.g. model.preset=tiny-vmoe)")
        if cfg.data.val is None:
            raise ValueError("data.val: the checkpoint's config has no held-out set; give --set data.val=PATH")
        state = checkpoint.consolidated_model_state(args.checkpoint)
    except ValueError as e:  # ConfigError, DataError, CheckpointError are ValueErrors
        return fail(e)
    from limoe_ds.data import build_eval_loader
    from limoe_ds.data.labels import Labels
    from limoe_ds.model import build_model
    from limoe_ds.train.engine import init_distributed
    init_distributed()
    model = build_model(cfg.model)
    model.load_state_dict(state)
    model.eval()
    batch = args.batch_size or cfg.eval.batch_size
    loader = build_eval_loader(cfg.data, image_size=cfg.model.image_size, tokenizer=Labels(cfg.model.num_classes),
                               text_len=cfg.model.text_len, batch_size=batch, dp_rank=0, dp_size=1)
    rows = curve(model, loader, cfs)
    table = markdown(rows)
    command = shlex.join([sys.executable, str(Path(__file__).resolve()), *argv])
    report = {"command": command, "checkpoint": str(args.checkpoint),
              "step": checkpoint.read_marker(args.checkpoint, "--checkpoint")["step"], "batch_size": batch,
              "pool_tokens": batch * cfg.model.num_patches, "experts": cfg.model.num_experts,
              "trained_capacity_factor": cfg.model.any_moe.capacity_factor,
              "trained_with_bpr": cfg.model.any_moe.batch_priority, "rows": rows}
    print(json.dumps(report, indent=1))
    print(table)
    if args.out:
        checkpoint.atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    if args.markdown:
        checkpoint.atomic_write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
