"""CLIPPO's text renderer (limoe_ds.data.render): golden pixels, wrapping, truncation, missing glyphs."""

from __future__ import annotations

import numpy as np
import pytest

from limoe_ds.data.render import UNIFONT, UnifontRenderer, coverage_problems, load_unifont, script_of

# "Hi. ab" at 32 x 32: lower-cased, glyphs trimmed to their ink + 1 column, wrapped at the
# character (the space ends line 1), 16 px lines; '#' is ink (0), '.' the grey background (127).
GOLDEN = """
................................
................................
................................
.#........#.....................
.#........#.....................
.#..............................
.#.###...##.....................
.##...#...#.....................
.#....#...#.....................
.#....#...#.....................
.#....#...#.....................
.#....#...#.....................
.#....#...#...##................
.#....#.#####.##................
................................
................................
................................
................................
................................
........#.......................
........#.......................
........#.......................
..####..#.###...................
.#....#.##...#..................
......#.#....#..................
..#####.#....#..................
.#....#.#....#..................
.#....#.#....#..................
.#...##.##...#..................
..###.#.#.###...................
................................
................................
"""


@pytest.fixture(scope="module")
def small():
    return UnifontRenderer(32)


def _ascii(image: np.ndarray) -> str:
    assert image.dtype == np.uint8 and image.shape[2] == 3 and (image == image[..., :1]).all()  # grey
    return "\n".join("".join("#" if v == 0 else "." for v in row) for row in image[..., 0])


def test_golden_pixels_of_a_short_caption(small):
    r = small.render("Hi. ab")
    assert (r.chars, r.missing, r.truncated) == (6, 0, 0)
    assert _ascii(r.image) == GOLDEN.strip()
    assert set(np.unique(r.image)) == {0, 127}
    assert small.render("HI. AB").image.tobytes() == r.image.tobytes()  # lower-cased


def test_the_glyphs_are_unifonts_bitmaps():
    """'A' (U+0041) in Debian's unifont.hex is 0000000018242442427E424242420000: 16 rows of 8 bits."""
    bitmaps, has = load_unifont()
    want = np.unpackbits(np.frombuffer(bytes.fromhex("0000000018242442427E424242420000"), np.uint8)[:, None], axis=1)
    assert (bitmaps[0x41, :, :8] == want).all() and not bitmaps[0x41, :, 8:].any()
    assert has[0x41] and has[0x4E00] and not has[0x07] and has[0x20] and not bitmaps[0x20].any()


def test_a_caption_longer_than_the_image_is_cut_at_the_last_line(small):
    long = small.render("abcdefghij" * 10)
    assert long.chars == 100 and 0 < long.truncated < 100
    lines = _ascii(long.image).splitlines()
    assert all("#" in "".join(lines[y:y + 16]) for y in (0, 16))  # both lines drawn
    big = UnifontRenderer(224, max_chars=50).render("x" * 3000)
    assert big.chars == 50 and big.truncated == 0  # max_chars cuts before layout
    r = UnifontRenderer(224).render("a" * 2000)
    # 'a' is 7 columns (ink in 1..6, + 1); glyph i goes to line (7 (i + 1)) // (224 - 7): the first
    # 433 of the 768 characters (max_chars) fall on the 14 lines
    assert r.chars == 768 and r.truncated == 768 - 433
    assert (r.image[..., 0] == 0).any(axis=1).reshape(14, 16).any(axis=1).all()  # every line inked


def test_an_empty_caption_is_an_empty_grey_image(small):
    for text in ("", "   ", "\n\t"):
        r = small.render(text)
        assert r.missing == 0 and (r.image == 127).all(), repr(text)


def test_a_character_without_a_glyph_is_a_counted_gap_never_a_box(small):
    r = small.render("a\x07b\U0001F600c")  # a control character (Unifont draws a box) and an emoji (plane 1)
    assert r.missing == 2 and r.chars == 5
    gap = small.render("a b c")  # the same layout: each missing character is a space's gap
    assert r.image.tobytes() == gap.image.tobytes()


def test_coverage_names_each_script_the_font_cannot_draw():
    r = UnifontRenderer(64)
    cov = r.coverage(["a cat", "кошка", "猫", "\U0001F408 \U00010330"])  # cat emoji, Gothic letter (plane 1)
    assert cov["LATIN"] == {"chars": 4, "missing": 0} and cov["CYRILLIC"] == {"chars": 5, "missing": 0}
    assert cov["CJK"] == {"chars": 1, "missing": 0}
    assert cov["SYMBOL"] == {"chars": 1, "missing": 1} and cov["GOTHIC"] == {"chars": 1, "missing": 1}
    assert coverage_problems(cov) == [
        "font: 1 of 1 GOTHIC characters have no Unifont glyph and render as gaps",
        "font: 1 of 1 SYMBOL characters have no Unifont glyph and render as gaps"]
    assert script_of("é") == "LATIN" and script_of("!") == "PUNCTUATION" and script_of("ä") == "LATIN"


def test_a_smaller_font_fits_more_lines_and_bad_settings_are_clear_errors(tmp_path):
    r = UnifontRenderer(32, font_size=8).render("abcdefghijklmnop")
    assert r.truncated == 0 and set(np.unique(r.image)) <= {0, 127}
    ink_rows = (r.image[..., 0] == 0).any(axis=1)
    assert ink_rows[:8].any() and ink_rows[8:16].any()  # 8 px lines
    with pytest.raises(FileNotFoundError, match="install Debian's unifont"):
        UnifontRenderer(32, font=str(tmp_path / "none.hex"))
    with pytest.raises(ValueError, match="font_size must be in"):
        UnifontRenderer(32, font_size=64)
    bad = tmp_path / "bad.hex"
    bad.write_text("0041:00ZZ\n")
    with pytest.raises(ValueError, match="bad.hex:1: not a Unifont hex line"):
        UnifontRenderer(32, font=str(bad))
    assert UNIFONT.endswith("unifont.hex")


def test_the_loader_notes_captions_with_missing_glyphs_or_cut_off(tmp_path):
    """A CLIPPO loader counts, per caption, what its renderer could not draw (data/skipped/<note>),
    and keeps the sample; a token model's loader notes nothing of the kind."""
    from data_helpers import image_bytes, write_tar
    from limoe_ds.data import DataConfig, build_eval_loader
    from limoe_ds.data.render import PixelText
    captions = ["a cat", "a dog \U0001F415", "x" * 200, "a bird", "\u4e00 and more text than four lines hold " * 3]
    members = [m for i, c in enumerate(captions) for m in ((f"s{i}.png", image_bytes(i)), (f"s{i}.txt", c.encode()))]
    path = write_tar(tmp_path / "cap-000.tar", members)
    ev = build_eval_loader(DataConfig(val=str(path), num_workers=0), image_size=32, tokenizer=PixelText(32, 8),
                           text_len=16, batch_size=2, dp_rank=0, dp_size=1)
    assert sum(b["tokens"].shape[0] for b in ev) == 5  # every caption kept
    counts = {k: v for k, v in ev.skip_counts().items() if v}
    assert counts == {"caption_glyphs_missing": 1, "caption_render_truncated": 2}, counts
