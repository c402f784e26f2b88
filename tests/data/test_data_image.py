"""Image decoding and transforms: every Pillow mode -> RGB, EXIF orientation, crops, value range."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from limoe_ds.data.errors import SkipSample
from limoe_ds.data.image import (center_crop_box, decode_image, eval_transform, random_crop_box, to_tensor,
                                 train_transform)

BIG = 10**9


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pixel(img: Image.Image, xy=(0, 0)) -> tuple:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    img.putpixel((1, 1), (0, 0, 255, 0))
    out = decode_image(encode(img), BIG)
    # alpha 128/255 over white: g = b = 255 * (1 - 128/255) = 127; fully transparent -> white
    r, g, b = pixel(out)
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    assert pixel(out, (1, 1)) == (255, 255, 255)


def test_la_and_l_modes():
    la = Image.new("LA", (3, 3), (0, 0))  # black, fully transparent -> white
    assert pixel(decode_image(encode(la), BIG)) == (255, 255, 255)
    grey = Image.new("L", (3, 3), 77)
    assert pixel(decode_image(encode(grey), BIG)) == (77, 77, 77)
    one = Image.new("1", (3, 3), 1)
    assert pixel(decode_image(encode(one), BIG)) == (255, 255, 255)


def test_palette_with_transparency():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((2, 2), 1)
    data = encode(img, transparency=0)  # palette index 0 is transparent
    out = decode_image(data, BIG)
    assert pixel(out) == (255, 255, 255) and pixel(out, (2, 2)) == (200, 100, 50)
    gif = decode_image(encode(img, "GIF", transparency=0), BIG)
    assert pixel(gif) == (255, 255, 255) and pixel(gif, (2, 2)) == (200, 100, 50)


def test_cmyk_jpeg_and_tiff():
    # CMYK (0, 0, 0, 0) is white and (0, 255, 255, 0) is red
    tif = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert pixel(decode_image(encode(tif, "TIFF"), BIG)) == (255, 0, 0)
    jpg = decode_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=95), BIG)
    assert all(v >= 250 for v in pixel(jpg))


def test_16bit_grey_is_scaled():
    arr = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    img = Image.fromarray(arr)  # I;16
    assert img.mode.startswith("I;16")
    out = decode_image(encode(img), BIG)  # PNG keeps 16 bits
    # 257 * v / 257 = v
    assert [pixel(out, xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 100, 255, 200]


def test_webp_and_jpeg_rgb():
    img = Image.new("RGB", (10, 6), (30, 160, 90))
    for fmt in ("WEBP", "JPEG", "BMP"):
        out = decode_image(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), BIG)
        assert out.size == (10, 6) and np.allclose(pixel(out, (5, 3)), (30, 160, 90), atol=3)


@pytest.mark.parametrize("orientation, size, red_at", [
    (1, (20, 10), (0, 0)),   # as stored: red block top-left
    (6, (10, 20), (9, 0)),   # rotate 90 CW: top-left -> top-right, width and height swap
    (3, (20, 10), (19, 9)),  # rotate 180
    (8, (10, 20), (0, 19)),  # rotate 90 CCW: top-left -> bottom-left
])
def test_exif_orientation(orientation, size, red_at):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 4, 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95), BIG)
    assert out.size == size
    assert out.getpixel(red_at)[0] > 200 and out.getpixel(red_at)[1] < 60


def test_bad_bytes_are_skips_not_crashes():
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    for data, reason in [(b"", "corrupt_image"), (None, "corrupt_image"), (b"not an image", "corrupt_image"),
                         (good[: len(good) // 2], "corrupt_image"), (good, "too_many_pixels")]:
        with pytest.raises(SkipSample) as e:
            decode_image(data, max_pixels=64 * 64 - 1)
        assert e.value.reason == reason


def test_crop_boxes():
    assert center_crop_box(40, 20) == (10, 0, 30, 20)
    assert center_crop_box(15, 31) == (0, 8, 15, 23)
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(50, 30, rng, (0.5, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
        area = (right - left) * (bottom - top) / (50 * 30)
        assert 0.45 <= area <= 1.0
    # impossible request (aspect >= 4 at full area of a square): torchvision's fallback, a centred crop
    # of the nearest allowed ratio: w = 10, h = round(10 / 4) = 2, top = (10 - 2) // 2 = 4
    assert random_crop_box(10, 10, rng, (1.0, 1.0), (4.0, 5.0)) == (0, 4, 10, 6)


def test_transforms_shape_range_and_determinism():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    a = train_transform(img, 16, np.random.default_rng(5), (0.5, 1.0), (0.75, 1.33))
    b = train_transform(img, 16, np.random.default_rng(5), (0.5, 1.0), (0.75, 1.33))
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and (a == b).all()
    e = eval_transform(img, 12)
    assert e.shape == (12, 12, 3)
    t = to_tensor([e, np.zeros_like(e), np.full_like(e, 255)])
    assert t.shape == (3, 3, 12, 12) and t.dtype == torch.float32 and t.is_contiguous()
    # 0 -> -1, 255 -> +1, x -> x / 127.5 - 1
    assert t[1].eq(-1).all() and t[2].eq(1).all()
    assert torch.allclose(t[0], torch.from_numpy(e.copy()).permute(2, 0, 1).float() / 127.5 - 1)
