"""Text as pixels (CLIPPO): a caption rendered to a grey image with GNU Unifont's 16 px glyphs.

CLIPPO (Tschannen, Mustafa, Houlsby, CVPR 2023) has no tokenizer: a caption is rendered to an
image and goes through the same patch embedding and tower as a photo. This follows big_vision's
``render_unifont`` (``big_vision/pp/proj/clippo/pp_ops.py``), written again in numpy:

* the text is lower-cased and cut at ``max_chars`` code points; every whitespace character is a space;
* each character is its 16 x 16 Unifont bitmap (an 8-wide glyph fills the left half); outside
  monospace mode a glyph keeps only its inked columns, widened by ``spacing`` on each side and to
  at least ``min_width`` columns (a space or a full stop does not vanish);
* the glyphs are laid out left to right and wrapped at the character, big_vision's rule: glyph i
  goes to line floor(c_i / (W - w_max)), c_i the width of glyphs 0..i and w_max the widest glyph
  of the caption; lines are 16 px high, and what falls below the image's last line is cut
  (``Rendered.truncated`` counts its characters);
* ink is ``text_brightness`` (0) on ``background_brightness`` (127), three equal channels.

A character Unifont has no glyph for (outside the Basic Multilingual Plane, an unassigned code
point, a control character) renders as an empty ``min_width`` gap and is counted
(``Rendered.missing``): never a box that looks like a letter. ``UnifontRenderer.coverage`` reports,
per script, the characters of a set of captions the font cannot draw, so that a run learns at
start-up, not from its images, that a script is missing. The font is Debian's ``unifont`` package
(``/usr/share/unifont/unifont.hex``, installed by ``make data``).

Why not Pillow's ``ImageDraw.text`` with ``unifont.otf``: the outline font goes through FreeType's
rasteriser and hinting, so pixels depend on the FreeType build, and it has no per-glyph
"missing" signal (it draws .notdef). The hex file is the bitmap itself: exact pixels on any
machine, and a missing glyph is a missing line.
"""

from __future__ import annotations

import collections
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

UNIFONT = "/usr/share/unifont/unifont.hex"
"""GNU Unifont's Basic Multilingual Plane as hex bitmaps (Debian package ``unifont``)."""
GLYPH = 16
"""Unifont's glyphs are 16 rows high and 8 or 16 columns wide."""


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray
    """uint8 [H, W, 3]."""
    chars: int
    """Characters laid out (after ``max_chars``)."""
    missing: int
    """Characters without a glyph (rendered as an empty gap)."""
    truncated: int
    """Characters on lines below the image's last line (not drawn)."""


class UnifontRenderer:
    """Renders captions as ``image_size`` x ``image_size`` images (see the module docstring)."""

    def __init__(self, image_size: int, *, font: str = UNIFONT, font_size: int = GLYPH, max_chars: int = 768,
                 background_brightness: int = 127, text_brightness: int = 0, lower: bool = True,
                 monospace: bool = False, spacing: int = 1, min_width: int = 4) -> None:
        if not Path(font).is_file():
            raise FileNotFoundError(f"{font}: no Unifont hex file; install Debian's unifont package "
                                    f"(apt-get install -y unifont, or make data)")
        if not 4 <= font_size <= image_size:
            raise ValueError(f"font_size must be in [4, image_size={image_size}], got {font_size}")
        self.image_size, self.font_size, self.max_chars = image_size, font_size, max_chars
        self.background, self.ink = background_brightness, text_brightness
        self.lower, self.monospace, self.spacing, self.min_width = lower, monospace, spacing, min_width
        self.bitmaps, self.has_glyph = load_unifont(font)
        # each glyph's kept columns [first, last): the inked ones, widened (big_vision's trim_letter)
        inked = self.bitmaps.any(axis=1)  # [N, 16] columns with ink
        any_ink = inked.any(axis=1)
        first = np.where(any_ink, inked.argmax(axis=1), 0)
        last = np.where(any_ink, GLYPH - 1 - inked[:, ::-1].argmax(axis=1), 0)
        if monospace:
            first, end = np.zeros_like(first), np.full_like(first, GLYPH)
        else:
            first = np.maximum(first - spacing, 0)
            end = np.minimum(np.maximum(last + spacing, first + min_width), GLYPH)
        self.first, self.end = first.astype(np.int64), end.astype(np.int64)
        self._scaled: dict[int, np.ndarray] = {}

    def codepoints(self, text: str) -> tuple[np.ndarray, int]:
        """The glyph indices of ``text`` (a character without a glyph -> U+0020's slot, counted)."""
        if self.lower:
            text = text.lower()
        text = text[:self.max_chars]
        ids = np.fromiter((32 if c.isspace() else ord(c) for c in text), dtype=np.int64, count=len(text))
        ok = (ids < len(self.has_glyph)) & self.has_glyph[np.minimum(ids, len(self.has_glyph) - 1)]
        return np.where(ok, ids, 32), int((~ok).sum())

    def render(self, text: str) -> Rendered:
        ids, missing = self.codepoints(text)
        size, fs = self.image_size, self.font_size
        out = np.zeros((size, size), dtype=np.uint8)  # 1 = ink
        drawn = len(ids)
        if len(ids):
            widths = self.end[ids] - self.first[ids]
            if fs != GLYPH:  # glyphs resized (area); their kept widths scale with them
                widths = np.maximum(1, np.round(widths * fs / GLYPH).astype(np.int64))
            div = size - int(widths.max())
            line = np.cumsum(widths) // max(div, 1)
            lines_fit = size // fs
            drawn = int((line < lines_fit).sum())
            x = 0
            for i in range(drawn):
                if i and line[i] != line[i - 1]:
                    x = 0
                glyph = self._glyph(int(ids[i]))
                w = glyph.shape[1]
                y = int(line[i]) * fs
                out[y:y + fs, x:x + w] = glyph[:, :max(0, min(w, size - x))]
                x += w
        img = (out.astype(np.int16) * (self.ink - self.background) + self.background).astype(np.uint8)
        return Rendered(np.repeat(img[..., None], 3, axis=2), len(ids), missing, len(ids) - drawn)

    def _glyph(self, cp: int) -> np.ndarray:
        g = self.bitmaps[cp][:, self.first[cp]:self.end[cp]]
        if self.font_size == GLYPH:
            return g
        if cp not in self._scaled:  # resized once per character (area filter, then ink where >= half)
            from PIL import Image
            w = max(1, round(g.shape[1] * self.font_size / GLYPH))
            scaled = Image.fromarray(g * np.uint8(255)).resize((w, self.font_size), Image.Resampling.BOX)
            self._scaled[cp] = (np.asarray(scaled) >= 128).astype(np.uint8)
        return self._scaled[cp]

    def coverage(self, texts) -> dict[str, dict[str, int]]:
        """{script: {"chars": n, "missing": m}} over ``texts`` (script: the first word of the
        character's Unicode name, 'LATIN', 'CYRILLIC', 'CJK', ...; spaces and digits left out)."""
        out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for text in texts:
            for c in (text.lower() if self.lower else text):
                if c.isspace() or c.isdigit():
                    continue
                script = script_of(c)
                cp = ord(c)
                out[script]["chars"] += 1
                out[script]["missing"] += int(not (cp < len(self.has_glyph) and self.has_glyph[cp]))
        return {s: dict(c) for s, c in sorted(out.items())}


def script_of(c: str) -> str:
    """A character's script, approximately (the standard library has no Script property): the
    first word of its Unicode name ('LATIN SMALL LETTER A' -> 'LATIN', 'CJK UNIFIED IDEOGRAPH-4E00'
    -> 'CJK', 'HIRAGANA LETTER KO' -> 'HIRAGANA'); 'SYMBOL' and 'PUNCTUATION' by general category
    (emoji are symbols); 'UNKNOWN' without a name."""
    category = unicodedata.category(c)
    if category[0] in "SP":
        return "SYMBOL" if category[0] == "S" else "PUNCTUATION"
    name = unicodedata.name(c, "")
    return name.split(" ")[0] if name else "UNKNOWN"


def coverage_problems(coverage: dict[str, dict[str, int]]) -> list[str]:
    """One line per script of ``UnifontRenderer.coverage`` with characters the font cannot draw
    (what a run prints at start-up)."""
    return [f"font: {c['missing']} of {c['chars']} {script} characters have no Unifont glyph and render as "
            f"gaps" for script, c in coverage.items() if c["missing"]]


_FONTS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load_unifont(path: str = UNIFONT) -> tuple[np.ndarray, np.ndarray]:
    """(bitmaps uint8 [0x10000, 16, 16] with 1 = ink, has_glyph bool [0x10000]) from a Unifont
    .hex file (``XXXX:`` then 32 hex digits for an 8-wide glyph or 64 for a 16-wide one); control
    characters (U+0000..U+001F, U+007F..U+009F), which Unifont draws as boxes naming their code,
    count as missing. Cached per path (a data worker forked after the first load shares it)."""
    if path in _FONTS:
        return _FONTS[path]
    bitmaps = np.zeros((0x10000, GLYPH, GLYPH), dtype=np.uint8)
    has = np.zeros(0x10000, dtype=bool)
    with open(path, encoding="ascii") as f:
        for n, line in enumerate(f, 1):
            code, _, bits = line.strip().partition(":")
            if len(code) != 4 or len(bits) not in (32, 64):
                raise ValueError(f"{path}:{n}: not a Unifont hex line (XXXX: then 32 or 64 hex digits)")
            cp, raw = int(code, 16), np.frombuffer(bytes.fromhex(bits), dtype=np.uint8)
            rows = np.unpackbits(raw.reshape(GLYPH, -1), axis=1)  # [16, 8] or [16, 16]
            bitmaps[cp, :, :rows.shape[1]] = rows
            has[cp] = True
    has[0x00:0x20] = has[0x7F:0xA0] = False
    has[0x20] = True  # the space: no ink, min_width wide
    _FONTS[path] = bitmaps, has
    return bitmaps, has


class PixelText:
    """The text input of a CLIPPO model (``model.text_input='pixels'``): where a token model has a
    tokenizer, ``encode_batch(captions)`` renders them at the model's image size and glyph size and
    returns what a photo batch is, float32 [B, 3, H, W] in [-1, 1]. Counts what it could not draw
    (``missing``, ``truncated``: characters, in this process); ``encode_batch(..., notes=d)`` also
    counts into ``d`` per caption what the data loader adds to its counts: ``caption_glyphs_missing``
    (a character the font lacks) and ``caption_render_truncated`` (cut at the image's last line),
    logged as ``data/skipped/<note>`` though the caption is kept."""

    vocab_size = 0
    """No vocabulary (the trainer's vocabulary check passes)."""

    def __init__(self, image_size: int, font_size: int = GLYPH, font: str = UNIFONT) -> None:
        self.renderer = UnifontRenderer(image_size, font=font, font_size=font_size)
        self.missing = self.truncated = 0

    @classmethod
    def for_model(cls, cfg, font: str = UNIFONT) -> "PixelText":
        return cls(cfg.image_size, cfg.text_font_size, font)

    def encode_batch(self, texts: list[str], text_len: int | None = None,
                     notes: dict[str, int] | None = None) -> torch.Tensor:
        """Rendered captions as float32 [B, 3, H, W] in [-1, 1] (``text_len``, a tokenizer's
        argument, is ignored); ``notes``: per-caption counts added to it (see the class)."""
        from limoe_ds.data.image import to_tensor
        out = []
        for t in texts:
            r = self.renderer.render(t)
            self.missing += r.missing
            self.truncated += r.truncated
            if notes is not None:
                for key, hit in (("caption_glyphs_missing", r.missing), ("caption_render_truncated", r.truncated)):
                    if hit:
                        notes[key] = notes.get(key, 0) + 1
            out.append(r.image)
        if not out:
            size = self.renderer.image_size
            return to_tensor(np.zeros((0, size, size, 3), dtype=np.uint8))
        return to_tensor(out)


def text_encoder(model_cfg, tokenizer: str | None):
    """What turns a run's captions into its model's text input (``encode_batch``): the tokenizer
    at ``tokenizer``, for a CLIPPO model (``model.text_input='pixels'``) a ``PixelText``, for a
    classifier (``model.num_classes``, V-MoE) the labels' ``data.labels.Labels``."""
    if model_cfg.classifier:
        from limoe_ds.data.labels import Labels
        return Labels(model_cfg.num_classes)
    if model_cfg.pixels:
        return PixelText.for_model(model_cfg)
    from limoe_ds.data.tokenizer import Tokenizer
    return Tokenizer.from_file(tokenizer)
