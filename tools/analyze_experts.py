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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds import checkpoint  # noqa: E402

IMAGE_RGB, TEXT_RGB = (31, 119, 180), (255, 127, 14)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def modality_chart(summary: dict, path: Path, panel=(220, 160)) -> None:
    """One panel per layer; bar height = the expert's share of all kept tokens, split image / text."""
    layers = list(summary)
    W, H = panel
    img = Image.new("RGB", (W * len(layers), H + 20), "white")
    draw = ImageDraw.Draw(img)
    for li, layer in enumerate(layers):
        s = summary[layer]
        image_n = np.array(s["image"]["tokens_per_expert"], dtype=float)
        text_n = np.array(s["text"]["tokens_per_expert"], dtype=float)
        total = max((image_n + text_n).max(), 1.0)
        E = len(image_n)
        bar_w = (W - 20) / E
        x0 = li * W + 10
        for e in range(E):
            hi, ht = image_n[e] / total * (H - 10), text_n[e] / total * (H - 10)
            left, right = x0 + e * bar_w + 1, x0 + (e + 1) * bar_w - 1
            draw.rectangle([left, H - hi, right, H], fill=IMAGE_RGB)
            draw.rectangle([left, H - hi - ht, right, H - hi], fill=TEXT_RGB)
        draw.text((x0, H + 4), layer, fill="black")
    draw.rectangle([W * len(layers) - 110, 4, W * len(layers) - 100, 14], fill=IMAGE_RGB)
    draw.text((W * len(layers) - 96, 3), "image", fill="black")
    draw.rectangle([W * len(layers) - 55, 4, W * len(layers) - 45, 14], fill=TEXT_RGB)
    draw.text((W * len(layers) - 41, 3), "text", fill="black")
    img.save(path)


def patch_overlay(images_BCHW: torch.Tensor, experts_BI: torch.Tensor, path: Path, scale: int = 4) -> None:
    """Each image next to its patch grid coloured by expert id."""
    B, _, Hpx, Wpx = images_BCHW.shape
    g = int(round(experts_BI.shape[1] ** 0.5))
    tile = Image.new("RGB", (2 * Wpx * scale, B * Hpx * scale), "white")
    for b in range(B):
        pixels = ((images_BCHW[b].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        tile.paste(Image.fromarray(pixels).resize((Wpx * scale, Hpx * scale), Image.NEAREST), (0, b * Hpx * scale))
        grid = np.array([PALETTE[int(e) % len(PALETTE)] for e in experts_BI[b].tolist()], dtype=np.uint8)
        grid_img = Image.fromarray(grid.reshape(g, g, 3)).resize((Wpx * scale, Hpx * scale), Image.NEAREST)
        tile.paste(grid_img, (Wpx * scale, b * Hpx * scale))
    tile.save(path)


@torch.no_grad()
def analyze(model, loader, *, sample_images: int = 8) -> tuple[dict, dict[int, torch.Tensor], torch.Tensor]:
    """(summary, {layer index: expert ids [n, patches] of the first images}, those images)."""
    from limoe_ds.moe import diagnostics
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for block in model.blocks:
        if block.is_moe:
            def hook(_mod, _inp, out, index=block.index):
                captured[index] = out[1].expert_N  # the pool: image tokens first
            hooks.append(block.ffn.register_forward_hook(hook))
    model.eval()
    totals: dict = {}
    first_images, first_experts = None, {}
    try:
        for batch in loader:
            out = model(batch["images"], batch["tokens"])
            diagnostics.accumulate(totals, out.routing_stats)
            if first_images is None:
                n = min(sample_images, batch["images"].shape[0])
                I = model.cfg.num_patches
                first_images = batch["images"][:n]
                first_experts = {k: v[: batch["images"].shape[0] * I].view(-1, I)[:n] for k, v in captured.items()}
    finally:
        for h in hooks:
            h.remove()
    return diagnostics.summarize(totals), first_experts, first_images


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
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.moe is None or cfg.data.val is None:
        print("error: needs an MoE model and data.val (set it with --set data.val=PATH)", file=sys.stderr)
        return 2
    from limoe_ds.data import Tokenizer, build_eval_loader
    from limoe_ds.model import build_model
    model = build_model(cfg.model)
    model.load_state_dict(state)
    loader = build_eval_loader(cfg.data, image_size=cfg.model.image_size, tokenizer=Tokenizer.from_file(cfg.tokenizer),
                               text_len=cfg.model.text_len, batch_size=cfg.eval.batch_size, dp_rank=0, dp_size=1)
    summary, experts, images = analyze(model, loader, sample_images=args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(args.out / "report.json", json.dumps(
        {"checkpoint": str(args.checkpoint), "routing": "dropless", "layers": summary}, indent=1) + "\n")
    modality_chart(summary, args.out / "experts_modality.png")
    for index, e in experts.items():
        patch_overlay(images, e, args.out / f"patches_layer{index}.png")
    print(json.dumps({"out": str(args.out), "layers": list(summary)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
