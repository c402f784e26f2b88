"""Expert figures as Pillow images: saved as PNG by tools/analyze_experts.py, logged to TensorBoard
at each in-training evaluation (``limoe_ds.train.trainer``).

- ``modality_chart``: the LIMoE paper's chart: one panel per MoE layer, one bar per expert, its kept
  tokens split into image (blue) and text (orange); heights relative to the panel's busiest expert.
- ``patch_overlay``: sample images beside their patch grid coloured by the expert each patch went to.
Legend: B images, C channels, H x W pixels, I patches (a square grid).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_RGB, TEXT_RGB = (31, 119, 180), (255, 127, 14)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""Expert e is drawn in PALETTE[e % 10]."""


def modality_chart(summary: dict[str, dict], panel: tuple[int, int] = (220, 160)) -> Image.Image:
    """``stats.summarize`` output -> RGB image of (panel width * layers) x (panel height + 20)."""
    layers = list(summary)
    W, H = panel
    img = Image.new("RGB", (W * len(layers), H + 20), "white")
    draw = ImageDraw.Draw(img)
    for li, layer in enumerate(layers):
        _draw_panel(draw, summary[layer], li * W + 10, W - 20, H)
        draw.text((li * W + 10, H + 4), layer, fill="black")
    right = W * len(layers)
    draw.rectangle([right - 110, 4, right - 100, 14], fill=IMAGE_RGB)
    draw.text((right - 96, 3), "image", fill="black")
    draw.rectangle([right - 55, 4, right - 45, 14], fill=TEXT_RGB)
    draw.text((right - 41, 3), "text", fill="black")
    return img


def _draw_panel(draw: ImageDraw.ImageDraw, layer: dict, x0: float, width: float, H: int) -> None:
    image_n = np.array(layer["image"]["tokens_per_expert"], dtype=float)
    text_n = np.array(layer["text"]["tokens_per_expert"], dtype=float)
    total = max((image_n + text_n).max(), 1.0)
    bar_w = width / len(image_n)
    for e in range(len(image_n)):
        hi, ht = image_n[e] / total * (H - 10), text_n[e] / total * (H - 10)
        left, right = x0 + e * bar_w + 1, x0 + (e + 1) * bar_w - 1
        draw.rectangle([left, H - hi, right, H], fill=IMAGE_RGB)
        draw.rectangle([left, H - hi - ht, right, H - hi], fill=TEXT_RGB)


def to_pixels(image_CHW: torch.Tensor) -> np.ndarray:
    """Model input in [-1, 1] -> uint8 [H, W, 3]."""
    return ((image_CHW.permute(1, 2, 0).float().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)


def patch_overlay(images_BCHW: torch.Tensor, experts_BI: torch.Tensor, scale: int = 4) -> Image.Image:
    """One row per image: the image, then its patch grid coloured by expert id; each scaled x ``scale``.
    Size (2 * W * scale) x (B * H * scale)."""
    B, _, Hpx, Wpx = images_BCHW.shape
    g = int(round(experts_BI.shape[1] ** 0.5))
    size = (Wpx * scale, Hpx * scale)
    tile = Image.new("RGB", (2 * size[0], B * size[1]), "white")
    for b in range(B):
        tile.paste(Image.fromarray(to_pixels(images_BCHW[b])).resize(size, Image.NEAREST), (0, b * size[1]))
        grid = np.array([PALETTE[int(e) % len(PALETTE)] for e in experts_BI[b].tolist()], dtype=np.uint8)
        tile.paste(Image.fromarray(grid.reshape(g, g, 3)).resize(size, Image.NEAREST), (size[0], b * size[1]))
    return tile


def routing_figures(summary: dict[str, dict], images_BCHW: torch.Tensor | None,
                    experts_BI: dict[int, torch.Tensor]) -> dict[str, Image.Image]:
    """{'experts/modality': chart, 'experts/patches_layerL': overlay per MoE layer L}; empty pieces
    (no MoE layer, no sample image) are left out."""
    out = {"experts/modality": modality_chart(summary)} if summary else {}
    if images_BCHW is not None and len(images_BCHW):
        out.update({f"experts/patches_layer{k}": patch_overlay(images_BCHW, v) for k, v in sorted(experts_BI.items())})
    return out


__all__ = ["modality_chart", "patch_overlay", "routing_figures", "to_pixels", "PALETTE", "IMAGE_RGB", "TEXT_RGB"]
