"""The data error type and the closed list of reasons a sample can be skipped for."""

from __future__ import annotations

SKIP_REASONS = (
    "corrupt_image",       # zero bytes, truncated, or bytes Pillow cannot decode
    "too_many_pixels",     # width * height over DataConfig.max_image_pixels (read from the header)
    "unsupported_format",  # only a non-raster / unknown member (e.g. .svg) where an image should be
    "missing_image",       # a caption with no image member, null image cell, or a listed file that is absent
    "missing_caption",     # no .txt/.json member, no caption field, or a null caption cell
    "malformed_json",      # a .json member (or .jsonl line) that is not a JSON object
    "empty_caption",       # caption empty or whitespace only
    "non_utf8_caption",    # caption bytes that are not valid UTF-8
    "duplicate_key",       # a key seen before in the same shard (the first occurrence is kept)
    "unreadable_shard",    # a shard that is missing, not readable, or corrupt (counted once per pass)
    "damaged_shard",       # a tar that stops short: a bad header before the end of the file, data after its
                           # end-of-archive marker, or fewer samples than its index (_stats.json, manifest)
    "missing_label",       # a classifier's sample (model.num_classes) with no .cls member, a .cls that is not
                           # an integer, or no integer label field
)
"""Reasons a sample (or shard) is dropped. Every drop is counted under exactly one of these."""

NOTE_REASONS = ("caption_truncated", "caption_glyphs_missing", "caption_render_truncated")
"""Counted but the sample is kept: caption cut to DataConfig.max_caption_chars; a CLIPPO model's
rendered caption with a character the font lacks (drawn as a gap), or cut at the image's last
line (limoe_ds.data.render.PixelText)."""

LOSS_KEYS = ("samples_lost",)
"""Samples a damaged or unreadable shard should have held (its index says how many) but did not
yield: counted with the shard's damaged_shard / unreadable_shard, only where a count is known."""

COUNT_KEYS = SKIP_REASONS + NOTE_REASONS + LOSS_KEYS


class DataError(ValueError):
    """Raised when nothing usable remains (no files, or a source yields no usable sample)."""


class SkipSample(Exception):
    """Internal: raised by the per-sample decoders, carrying one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def zero_counts() -> dict[str, int]:
    return {k: 0 for k in COUNT_KEYS}


__all__ = ["DataError", "SkipSample", "SKIP_REASONS", "NOTE_REASONS", "LOSS_KEYS", "COUNT_KEYS", "zero_counts"]
