"""Image decoding and transforms with Pillow.

Any Pillow mode comes out as 8-bit RGB: transparency (RGBA, LA, P/L/RGB with a tRNS key) is composited
on white, CMYK/YCbCr/LAB/HSV converted, 16-bit (I;16*, I) scaled by 1/257. EXIF orientation is applied
first. Train: random resized crop; eval: resize the shorter side and centre crop; both are one
``Image.resize(box=...)`` call (crop and resample together, antialiased).
Legend: B batch, H height, W width, C channels (3).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from limoe_ds.data.errors import SkipSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""Member / file extensions read as raster images (others, e.g. svg, are unsupported_format)."""

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


def decode_image(data: bytes | None, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB image, or SkipSample(corrupt_image | too_many_pixels)."""
    if not data:
        raise SkipSample("corrupt_image", "zero bytes")
    try:
        with warnings.catch_warnings():
            # Our own limit (checked below, from the header) replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipSample("too_many_pixels", str(e)) from None
    except Exception as e:  # untrusted bytes: Pillow raises many types (OSError, SyntaxError, ...)
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise SkipSample("too_many_pixels", f"{width}x{height} > {max_pixels}")
    try:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels become white."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _wide_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit L. 16-bit (I;16*, or I with values > 255) is / 257."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    out = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if "transparency" in img.info:
        out.info["transparency"] = min(255, int(img.info["transparency"]) // 257)
    return out


def random_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """Inception-style random resized crop (torchvision's RandomResizedCrop.get_params): 10 tries."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return _fallback_box(width, height, ratio)


def _fallback_box(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of side min(width, height): resize-shorter-side then centre-crop."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` and resample to size x size (bicubic, antialiased) -> uint8 array [H, W, 3]."""
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


def train_transform(img: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> np.ndarray:
    return crop_resize(img, random_crop_box(*img.size, rng, scale, ratio), size)


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    return crop_resize(img, center_crop_box(*img.size), size)


def to_tensor(images_BHWC: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (x / 127.5 - 1, big_vision value_range)."""
    # In numpy: torch's intra-op threads would compete with the training process for the same cores.
    arr_BCHW = np.stack(images_BHWC).transpose(0, 3, 1, 2).astype(np.float32, order="C")
    arr_BCHW /= 127.5
    arr_BCHW -= 1.0
    return torch.from_numpy(arr_BCHW)


__all__ = ["IMAGE_EXTS", "decode_image", "to_rgb", "random_crop_box", "center_crop_box", "crop_resize",
           "train_transform", "eval_transform", "to_tensor"]
