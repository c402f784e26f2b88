"""Record -> (image, caption) checks, in a fixed order so each bad sample is counted once:
a problem seen by the reader, then the caption (cheap), then the image (decode). A classifier's
records (V-MoE): -> (image, label), the label checked where the caption would be.
"""

from __future__ import annotations

from PIL import Image

from limoe_ds.data.errors import SkipSample
from limoe_ds.data.image import decode_image
from limoe_ds.data.sources import Record


def check_caption(raw: bytes | str | None, max_chars: int) -> tuple[str, bool]:
    """-> (caption with whitespace collapsed, was_truncated) or SkipSample."""
    if raw is None:
        raise SkipSample("missing_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("non_utf8_caption", str(e)) from None
    try:
        raw.encode("utf-8")  # surrogate escapes from a captions file that was not UTF-8
    except UnicodeEncodeError as e:
        raise SkipSample("non_utf8_caption", str(e)) from None
    text = " ".join(raw.split())
    if not text:
        raise SkipSample("empty_caption")
    if len(text) > max_chars:
        return text[:max_chars], True
    return text, False


def decode_record(rec: Record, *, max_pixels: int, max_caption_chars: int) -> tuple[Image.Image, str, bool]:
    """-> (RGB image, caption, caption_was_truncated) or SkipSample naming the reason."""
    if rec.problem is not None:
        raise SkipSample(rec.problem, rec.detail)
    if rec.render is not None:  # a procedural record: drawn now, already RGB (data/synthetic.py)
        img, text = rec.render()
        caption, truncated = check_caption(text, max_caption_chars)
        return img, caption, truncated
    caption, truncated = check_caption(rec.caption, max_caption_chars)
    return decode_image(rec.image, max_pixels), caption, truncated


def decode_labelled(rec: Record, *, max_pixels: int) -> tuple[Image.Image, int]:
    """-> (RGB image, integer label) or SkipSample naming the reason; the caption is not read."""
    if rec.problem is not None:
        raise SkipSample(rec.problem, rec.detail)
    if rec.render is not None:
        raise SkipSample("missing_label", "a procedural (synthetic) source has captions, not labels")
    if rec.label is None:
        raise SkipSample("missing_label", "no integer .cls member or label field")
    return decode_image(rec.image, max_pixels), rec.label


__all__ = ["check_caption", "decode_record", "decode_labelled"]
