"""Expert figures drawn with matplotlib (its object API and the Agg canvas: no pyplot state, no
display), returned as Pillow images: saved as PNG by tools/analyze_experts.py, logged to
TensorBoard at each in-training evaluation (``limoe_ds.train.trainer``).

- ``modality_chart``: the LIMoE paper's chart: one labelled panel per MoE layer (or per VL-MoE
  pool), one bar per expert id, its kept tokens split into image (blue) and text (orange), the
  image share of the expert's tokens written on its bar; axes with units and a legend.
- ``patch_overlay``: sample images beside their patch grid coloured by the expert each patch went
  to, with a legend of the experts' colours.
Legend: B images, C channels, H x W pixels, I patches (a square grid).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGE_RGB, TEXT_RGB = (31, 119, 180), (255, 127, 14)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""Expert e is drawn in PALETTE[e % 10]."""
DPI = 100


def _rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(v / 255 for v in c)


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig) -> Image.Image:
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def modality_chart(summary: dict[str, dict], title: str = "Kept tokens per expert") -> Image.Image:
    """``stats.summarize`` output -> RGB image: one panel per layer (3.2 x 3 inches at 100 dpi each)."""
    layers = list(summary)
    fig = _figure(0.6 + 3.2 * len(layers), 3.0)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, name in zip(axes, layers):
        image_n = np.array(summary[name]["image"]["tokens_per_expert"], dtype=float)
        text_n = np.array(summary[name]["text"]["tokens_per_expert"], dtype=float)
        ids = np.arange(len(image_n))
        ax.bar(ids, image_n, color=_rgb(IMAGE_RGB), label="image")
        ax.bar(ids, text_n, bottom=image_n, color=_rgb(TEXT_RGB), label="text")
        top = max(float((image_n + text_n).max()), 1.0)
        for e in ids:
            total = image_n[e] + text_n[e]
            if total:
                ax.text(e, total + 0.02 * top, f"{100 * image_n[e] / total:.0f}%", ha="center", va="bottom",
                        fontsize=7)
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(ids)
        ax.set_xlabel("expert")
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("kept tokens")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, [f"{lab} tokens" for lab in labels], loc="upper right", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{title} (% on a bar: its image share)", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _to_image(fig)


def to_pixels(image_CHW: torch.Tensor) -> np.ndarray:
    """Model input in [-1, 1] -> uint8 [H, W, 3]."""
    return ((image_CHW.permute(1, 2, 0).float().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)


def patch_overlay(images_BCHW: torch.Tensor, experts_BI: torch.Tensor, title: str = "") -> Image.Image:
    """One row per image: the image, then its patch grid coloured by expert id (PALETTE), and a
    legend of the experts that appear; 1.6 inches per panel at 100 dpi."""
    from matplotlib.patches import Patch
    B = images_BCHW.shape[0]
    g = int(round(experts_BI.shape[1] ** 0.5))
    fig = _figure(2 * 1.6 + 1.3, 1.6 * B + 0.4)
    axes = fig.subplots(B, 2, squeeze=False)
    palette = np.array(PALETTE, dtype=np.uint8)
    for b in range(B):
        axes[b, 0].imshow(to_pixels(images_BCHW[b]), interpolation="nearest")
        grid = palette[experts_BI[b].long().numpy() % len(PALETTE)].reshape(g, g, 3)
        axes[b, 1].imshow(grid, interpolation="nearest")
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("expert per patch", fontsize=9)
    used = sorted({int(e) for e in experts_BI.flatten().tolist()})
    fig.legend(handles=[Patch(color=_rgb(PALETTE[e % len(PALETTE)]), label=f"expert {e}") for e in used],
               loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 3.2 / 4.5, 1))  # the right 1.3 inches hold the legend
    return _to_image(fig)


def routing_figures(summary: dict[str, dict], images_BCHW: torch.Tensor | None,
                    experts_BI: dict[int, torch.Tensor]) -> dict[str, Image.Image]:
    """{'experts/modality': chart, 'experts/patches_layerL': overlay per MoE layer L}; empty pieces
    (no MoE layer, no sample image) are left out."""
    out = {"experts/modality": modality_chart(summary)} if summary else {}
    if images_BCHW is not None and len(images_BCHW):
        out.update({f"experts/patches_layer{k}": patch_overlay(images_BCHW, v, title=f"MoE layer {k}")
                    for k, v in sorted(experts_BI.items())})
    return out


__all__ = ["modality_chart", "patch_overlay", "routing_figures", "to_pixels", "PALETTE", "IMAGE_RGB", "TEXT_RGB"]
