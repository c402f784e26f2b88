#!/usr/bin/env python
"""Routing diagnostics of a checkpoint: how each MoE layer routes each modality.

    python tools/analyze_experts.py --checkpoint runs/tiny/checkpoints/step00000500 --out runs/tiny/experts

Routes the validation pairs (dropless, images and captions in one pool per batch, as in training)
and writes to --out:
  report.json          per MoE layer: routing success rate, tokens per expert and router entropies
                       per modality, the image share of each expert's tokens, dead experts
  experts_modality.png the LIMoE paper's chart: one panel per MoE layer, one bar per expert,
                       split into image (blue) and text (orange) tokens
  patches_layerL.png   for a few validation images, each patch coloured by the expert it went to

A two-tower model (``model.text_tower``): each tower's MoE layers see one modality only, so the
report says per layer which tower it is in (``"towers"``), the chart shows a single colour per
panel (all image, or all text: by construction, not a finding), and patch overlays exist for the
image tower's layers only. The one-tower numbers (how experts specialise across modalities) have
no two-tower counterpart; what remains meaningful is the routing within a tower (success rate,
entropies, tokens per expert, dead experts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.runtime.cli import fail  # noqa: E402
from limoe_ds.checkpoint import io as checkpoint  # noqa: E402
from limoe_ds.eval.figures import modality_chart, patch_overlay  # noqa: E402


def analyze(model, loader, *, sample_images: int = 8) -> tuple[dict, dict[int, torch.Tensor], torch.Tensor]:
    """(summary, {layer index: expert ids [n, patches] of the first images}, those images); the same
    dropless validation pass as the in-training evaluation (eval.run.embed_pairs)."""
    from limoe_ds.eval.run import RoutingRecord, embed_pairs
    record = RoutingRecord(sample_images=sample_images)
    model.eval()
    embed_pairs(model, loader, record=record, modes={"dropless": None})
    return record.summary(), record.experts_BI, record.images_BCHW


def towers(model_cfg, summary: dict) -> dict[str, str]:
    """{layer key: 'shared' (one tower: both modalities), 'image' or 'text' (a two-tower model's)}."""
    out = {}
    for key in summary:
        index = int(key.removeprefix("layer").split(".")[0])  # 'layer3', VL-MoE's 'layer3.image'
        if "." in key:
            out[key] = key.split(".")[1]  # a per-modality pool
            continue
        out[key] = ("shared" if not model_cfg.two_tower else
                    "image" if index < model_cfg.text_block_offset else "text")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--images", type=int, default=8, help="sample images for the patch overlays")
    args = ap.parse_args(argv)
    try:
        cfg = checkpoint.evaluation_config(args.checkpoint, args.set, 1)
        state = checkpoint.consolidated_model_state(args.checkpoint)
    except ValueError as e:
        return fail(e)
    if cfg.model.any_moe is None or cfg.data.val is None:
        return fail("needs an MoE model and data.val (set it with --set data.val=PATH)")
    from limoe_ds.data import build_eval_loader
    from limoe_ds.data.render import text_encoder
    from limoe_ds.model import build_model
    model = build_model(cfg.model)
    model.load_state_dict(state)
    loader = build_eval_loader(cfg.data, image_size=cfg.model.image_size,
                               tokenizer=text_encoder(cfg.model, cfg.tokenizer), text_len=cfg.model.text_len,
                               batch_size=cfg.eval.batch_size, dp_rank=0, dp_size=1)
    summary, experts, images = analyze(model, loader, sample_images=args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(args.out / "report.json", json.dumps(
        {"checkpoint": str(args.checkpoint), "routing": "dropless", "towers": towers(cfg.model, summary),
         "layers": summary}, indent=1) + "\n")
    modality_chart(summary).save(args.out / "experts_modality.png")
    for index, e in experts.items():
        patch_overlay(images, e, title=f"MoE layer {index}").save(args.out / f"patches_layer{index}.png")
    print(json.dumps({"out": str(args.out), "layers": list(summary)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
