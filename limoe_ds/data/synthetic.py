"""The procedural source ``synthetic:scenes``: one- and two-object scenes drawn with Pillow, captioned
from a small grammar, with a fixed set of held-out attribute combinations for compositional evaluation.

Everything is a pure function of ``(seed, split, index)``: ``scene(seed, split, index)`` draws the
attributes, the layout, the background and the caption wording from ONE numpy Generator seeded with
``[seed, _TAG, split code, index]``, so sample i is the same on every run and machine. ``render``
draws it (at 2x, then a 2x box reduction for anti-aliasing) as RGB.

Attributes: 8 shapes x 8 colours (chosen to stay apart at 32 x 32 on light backgrounds), 2 sizes,
4 textures; two-object scenes have one relation (left of / right of / above / below), backgrounds are
plain light tones, gradients or a plain tone with mild noise.

**Held-out compositions** (``HELDOUT_COLOUR_SHAPE``, ``HELDOUT_ARRANGEMENTS``; this module is the one
place they are listed): scenes of the ``train`` and ``val`` splits never hold them, on any object;
``heldout`` scenes are built from them only (``heldout_scene``), and the compositional evaluation
(``CompositionalSet``) is made of those. Every colour and every shape still appears in training with
other partners, and the reverse of every held-out arrangement is a training arrangement.

**In the data pipeline** (``data/sources.py``): a source ``path: "synthetic:scenes"`` resolves to
``shards`` virtual shards; shard s of epoch e holds the scene indices
``[(e * shards + s) * shard_size, ... + shard_size)`` (``shard_range``), so an endless training stream
never repeats a scene, and the generic split / block shuffle / mixing / resume of ``data/stream.py``
apply unchanged. Records carry the scene and draw it on decode (``Record.render``): no PNG round trip,
and a resume that re-reads a shuffle block draws only what it hands out.

``write_shard`` writes scenes of one split to a WebDataset tar (``KEY.png`` + ``KEY.json``), byte-identical
on rebuild, for a builder that wants synthetic pairs on disk.
Legend: S image side (pixels), D = 2 S (drawing canvas).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw

from limoe_ds.config.data import SyntheticConfig, check_synthetic_name
from limoe_ds.data.image import eval_transform, to_tensor

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "moon")
COLOURS = {"red": (220, 30, 30), "orange": (245, 130, 0), "yellow": (235, 200, 0), "green": (30, 150, 40),
           "cyan": (0, 190, 210), "blue": (30, 60, 220), "purple": (140, 40, 180), "black": (20, 20, 20)}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted", "checked")
RELATIONS = ("left of", "right of", "above", "below")
"""From the first-named object's point of view; left of / right of share the horizontal axis."""

HELDOUT_COLOUR_SHAPE: tuple[tuple[str, str], ...] = (
    ("red", "square"), ("orange", "diamond"), ("yellow", "moon"), ("green", "triangle"), ("cyan", "cross"),
    ("blue", "circle"), ("purple", "star"), ("black", "heart"), ("green", "heart"), ("blue", "star"))
"""(colour, shape) pairs no train / val scene ever holds on any object: 10 of the 64 (15.6%); each
colour and each shape is held out with at most two partners and appears in training with six or more."""

HELDOUT_ARRANGEMENTS: tuple[tuple[str, str, str], ...] = (
    ("h", "circle", "square"), ("h", "triangle", "star"), ("h", "diamond", "cross"), ("h", "heart", "moon"),
    ("h", "square", "triangle"), ("h", "star", "diamond"), ("h", "cross", "heart"), ("h", "moon", "circle"),
    ("v", "star", "circle"), ("v", "moon", "triangle"), ("v", "circle", "diamond"), ("v", "cross", "square"),
    ("v", "triangle", "heart"), ("v", "diamond", "moon"), ("v", "square", "star"), ("v", "heart", "cross"))
"""(axis, first shape, second shape): on axis ``h`` the first is LEFT of the second, on ``v`` it is
ABOVE it, whatever the colours, sizes and textures. 8 of the 56 ordered pairs of distinct shapes per
axis (14%). Train / val scenes never hold them; the reverse (second left of / above first) is always a
training arrangement, so the held-out test is the order itself ("a circle to the left of a square" vs
"a square to the left of a circle")."""

SPLITS = {"train": 0, "val": 1, "heldout": 2}
_TAG = 71  # keeps the scene streams apart from data/stream.py's tags
_HELDOUT_CS = frozenset(HELDOUT_COLOUR_SHAPE)
_HELDOUT_ARR = frozenset(HELDOUT_ARRANGEMENTS)
HELDIN_COLOUR_SHAPE = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in _HELDOUT_CS)
MAX_CAPTION_WORDS = 12


def _check_lists() -> None:
    for c, s in HELDOUT_COLOUR_SHAPE:
        assert c in COLOURS and s in SHAPES, (c, s)
    for c in COLOUR_NAMES:
        assert sum(cs[0] == c for cs in HELDIN_COLOUR_SHAPE) >= 6, c
    for s in SHAPES:
        assert sum(cs[1] == s for cs in HELDIN_COLOUR_SHAPE) >= 6, s
    for axis, a, b in HELDOUT_ARRANGEMENTS:
        assert axis in "hv" and a != b and a in SHAPES and b in SHAPES and (axis, b, a) not in _HELDOUT_ARR


_check_lists()


def is_heldout_pair(colour: str, shape: str) -> bool:
    return (colour, shape) in _HELDOUT_CS


def is_heldout_arrangement(axis: str, first: str, second: str) -> bool:
    return (axis, first, second) in _HELDOUT_ARR


# ---------------------------------------------------------------------------------------------
# Scenes: attributes and layout (no pixels)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    texture: str
    x: float
    """Centre, in units of the image side (0..1)."""
    y: float
    r: float
    """Radius, in units of the image side."""


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    axis: str | None
    """Two objects: 'h' (objects[0] is left of objects[1]) or 'v' (objects[0] above objects[1])."""
    background: tuple
    """('plain', rgb) | ('gradient', rgb, rgb, direction) | ('noise', rgb, amplitude, noise seed)."""
    caption: str
    split: str
    index: int

    def attributes(self) -> dict:
        """What the scene holds, as JSON (the tar writer's KEY.json, the tests' check)."""
        rel = None if self.axis is None else ("left of" if self.axis == "h" else "above")
        return {"objects": [{k: v for k, v in asdict(o).items() if k in ("shape", "colour", "size", "texture")}
                            for o in self.objects], "relation": rel}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TAG, SPLITS[split], index])


def _layout_one(rng: np.random.Generator, r: float) -> tuple[float, float]:
    m = 0.02
    return float(rng.uniform(r + m, 1 - r - m)), float(rng.uniform(r + m, 1 - r - m))


def _layout_two(rng: np.random.Generator, r1: float, r2: float) -> tuple[float, float, float, float]:
    """Along the axis (u) the first centre before the second, apart by more than r1 + r2 plus a gap;
    across it (v) an offset under a third of the distance: the relation is never ambiguous."""
    m, gap = 0.02, 0.05
    slack = max(0.0, 1 - 2 * m - 2 * r1 - 2 * r2 - gap)
    a = float(rng.uniform(0, slack))
    extra = float(rng.uniform(0, slack - a))
    u1 = m + a + r1
    u2 = u1 + r1 + gap + extra + r2
    v1 = float(rng.uniform(r1 + m, 1 - r1 - m))
    du = u2 - u1
    v2 = float(np.clip(v1 + rng.uniform(-du / 3, du / 3), r2 + m, 1 - r2 - m))
    return u1, v1, u2, v2


def _radius(rng: np.random.Generator, size: str) -> float:
    return (0.12 if size == "small" else 0.2) * float(rng.uniform(0.92, 1.08))


def _background(rng: np.random.Generator) -> tuple:
    kind = int(rng.integers(3))
    light = tuple(int(v) for v in rng.integers(195, 250, 3))
    if kind == 0:
        return ("plain", light)
    if kind == 1:
        return ("gradient", light, tuple(int(v) for v in rng.integers(195, 250, 3)), int(rng.integers(3)))
    return ("noise", light, int(rng.integers(4, 11)), int(rng.integers(2 ** 31)))


def _pick_heldin(rng: np.random.Generator, shape: str | None = None) -> tuple[str, str]:
    if shape is None:
        return HELDIN_COLOUR_SHAPE[int(rng.integers(len(HELDIN_COLOUR_SHAPE)))]
    colours = [c for c in COLOUR_NAMES if (c, shape) not in _HELDOUT_CS]
    return colours[int(rng.integers(len(colours)))], shape


def _obj(rng: np.random.Generator, colour: str, shape: str) -> tuple[str, str, str, str, float]:
    size = SIZES[int(rng.integers(2))]
    return shape, colour, size, TEXTURES[int(rng.integers(len(TEXTURES)))], _radius(rng, size)


def _place(rng: np.random.Generator, specs: list, axis: str | None) -> tuple[Obj, ...]:
    if axis is None:
        (shape, colour, size, texture, r), = specs
        x, y = _layout_one(rng, r)
        return (Obj(shape, colour, size, texture, x, y, r),)
    (s1, c1, z1, t1, r1), (s2, c2, z2, t2, r2) = specs
    u1, v1, u2, v2 = _layout_two(rng, r1, r2)
    (x1, y1, x2, y2) = (u1, v1, u2, v2) if axis == "h" else (v1, u1, v2, u2)
    return (Obj(s1, c1, z1, t1, x1, y1, r1), Obj(s2, c2, z2, t2, x2, y2, r2))


def scene(seed: int, split: str, index: int, *, max_objects: int = 2) -> Scene:
    """Scene ``index`` of ``split`` (train / val: held-in compositions only; heldout: ``heldout_scene``)."""
    if split == "heldout":
        return heldout_scene(seed, index)
    rng = _rng(seed, split, index)
    two = max_objects >= 2 and rng.random() < 0.5
    if not two:
        specs, axis = [_obj(rng, *_pick_heldin(rng))], None
    else:
        specs = [_obj(rng, *_pick_heldin(rng)), _obj(rng, *_pick_heldin(rng))]
        axis = "h" if rng.random() < 0.5 else "v"
        if is_heldout_arrangement(axis, specs[0][0], specs[1][0]):
            specs.reverse()  # the reverse arrangement is always held in
    objects = _place(rng, specs, axis)
    bg = _background(rng)
    return Scene(objects, axis, bg, caption(objects, axis, rng), split, index)


def heldout_scene(seed: int, index: int) -> Scene:
    """Even indices: one object of a held-out (colour, shape), cycling through the list; odd: two
    objects (held-in colour-shape pairs) in a held-out arrangement, cycling through those."""
    rng = _rng(seed, "heldout", index)
    j = index // 2
    if index % 2 == 0:
        colour, shape = HELDOUT_COLOUR_SHAPE[j % len(HELDOUT_COLOUR_SHAPE)]
        specs, axis = [_obj(rng, colour, shape)], None
    else:
        axis, first, second = HELDOUT_ARRANGEMENTS[j % len(HELDOUT_ARRANGEMENTS)]
        specs = [_obj(rng, *_pick_heldin(rng, first)), _obj(rng, *_pick_heldin(rng, second))]
    objects = _place(rng, specs, axis)
    bg = _background(rng)
    return Scene(objects, axis, bg, caption(objects, axis, rng), "heldout", index)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(o: Obj, *, size: bool, texture: bool) -> str:
    """'a small striped red star' (size and texture when asked; texture 'plain' only when asked)."""
    words = ([o.size] if size else []) + ([o.texture] if texture else []) + [o.colour, o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _relation_words(axis: str, subject_first: bool, rng: np.random.Generator) -> str:
    if axis == "h":
        return "to the left of" if subject_first else "to the right of"
    options = ("above", "over") if subject_first else ("below", "under")
    return options[int(rng.integers(2))]


_ONE = ("{np}", "there is {np}", "a picture of {np}", "{np} on a light background")
_TWO = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}")


def caption(objects: tuple[Obj, ...], axis: str | None, rng: np.random.Generator) -> str:
    """A seeded phrasing of the scene: every object's colour and shape always; size and texture
    sometimes (in a two-object caption at most one of them per object, and one texture word in all);
    at most 12 words, and 16 tokens of the bundled tokenizer (with its end token) for all but a few."""
    if axis is None:
        o, = objects
        texture = o.texture != "plain" and rng.random() < 0.75 or o.texture == "plain" and rng.random() < 0.15
        np_ = noun_phrase(o, size=bool(rng.random() < 0.6), texture=bool(texture))
        return _ONE[int(rng.integers(len(_ONE)))].format(np=np_)
    phrases, textured = [], False
    for o in objects:
        choice = int(rng.integers(3))  # 0: colour + shape, 1: + size, 2: + texture (if not plain)
        if choice == 2 and (textured or o.texture == "plain"):
            choice = 1  # one texture word per caption: they are the long ones in tokens ("striped": 3)
        textured |= choice == 2
        phrases.append(noun_phrase(o, size=choice == 1, texture=choice == 2))
    subject_first = bool(rng.random() < 0.5)
    a, b = (phrases[0], phrases[1]) if subject_first else (phrases[1], phrases[0])
    template = int(rng.integers(len(_TWO)))
    text = _TWO[template].format(a=a, b=b, rel=_relation_words(axis, subject_first, rng))
    if len(text.split()) > (MAX_CAPTION_WORDS if template < 2 else 10):  # "there" is 2 tokens, "above" 3
        text = _TWO[0].format(a=a, b=b, rel=_relation_words(axis, subject_first, rng))
    return text


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Outline points around (0, 0) with radius about 1 (y down)."""
    if shape == "square":
        return [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
    if shape == "diamond":
        return [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)]
    if shape == "triangle":
        return [(math.cos(a) * 1.05, math.sin(a) * 1.05 + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5) + 0.08) for k in range(10)]
    if shape == "cross":
        w = 0.34
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
                (-w, -w)]
    if shape == "heart":
        pts = []
        for k in range(32):
            t = 2 * math.pi * k / 32
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -y / 16.5 - 0.1))
        return pts
    raise KeyError(shape)


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s not in ("circle", "moon")}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "moon":  # a disc with an offset disc cut away: a crescent opening to the upper right
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy, q = cx + 0.45 * r, cy - 0.3 * r, 0.85 * r
        draw.ellipse((ox - q, oy - q, ox + q, oy + q), fill=0)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _POLYGONS[shape]], fill=255)


@lru_cache(maxsize=16)
def _pattern(texture: str, D: int) -> Image.Image:
    """A D x D mask of the texture (255 = texture colour), in canvas coordinates."""
    p = max(4, round(D / 11))  # the period: about 3 pixels at 32 x 32
    yy, xx = np.mgrid[0:D, 0:D]
    if texture == "striped":
        m = ((xx + yy) % p) < p / 2
    elif texture == "dotted":
        q = round(1.5 * p)
        m = ((xx % q - q / 2) ** 2 + (yy % q - q / 2) ** 2) <= (0.24 * q) ** 2
    elif texture == "checked":
        m = ((xx // p) + (yy // p)) % 2 == 0
    else:
        raise KeyError(texture)
    return Image.fromarray((m * 255).astype(np.uint8), "L")


def _texture_colour(rgb: tuple[int, int, int]) -> tuple[int, ...]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum < 110:
        return tuple(int(c + (255 - c) * 0.6) for c in rgb)
    return tuple(int(c * 0.4) for c in rgb)


@lru_cache(maxsize=16)
def _ramp(direction: int, D: int) -> Image.Image:
    """A D x D mask rising 0 -> 255: left to right (0), top to bottom (1), diagonal (2)."""
    t = np.linspace(0.0, 255.0, D, dtype=np.float32)
    ramp = t[None, :] if direction == 0 else t[:, None] if direction == 1 else (t[None, :] + t[:, None]) / 2
    return Image.fromarray(np.broadcast_to(ramp, (D, D)).astype(np.uint8), "L")


def _background_image(bg: tuple, D: int) -> Image.Image:
    if bg[0] in ("plain", "noise"):
        return Image.new("RGB", (D, D), bg[1])
    _, c1, c2, direction = bg
    return Image.composite(Image.new("RGB", (D, D), c2), Image.new("RGB", (D, D), c1), _ramp(direction, D))


def render(sc: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` (drawn at 2x, box-reduced: anti-aliased)."""
    D = 2 * size
    img = _background_image(sc.background, D)
    for o in sc.objects:
        cx, cy, r = o.x * D, o.y * D, o.r * D
        box = (max(0, int(cx - 1.1 * r) - 1), max(0, int(cy - 1.1 * r) - 1),
               min(D, int(cx + 1.1 * r) + 2), min(D, int(cy + 1.1 * r) + 2))
        mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)  # only the object's box: 5x faster
        _draw_shape(ImageDraw.Draw(mask), o.shape, cx - box[0], cy - box[1], r)
        rgb = COLOURS[o.colour]
        img.paste(rgb, box, mask)
        if o.texture != "plain":
            img.paste(_texture_colour(rgb), box, ImageChops.multiply(mask, _pattern(o.texture, D).crop(box)))
    img = img.reduce(2)
    if sc.background[0] == "noise":
        _, _, amp, noise_seed = sc.background
        noise = np.random.default_rng(noise_seed).integers(-amp, amp + 1, (size, size, 1), dtype=np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8), "RGB")
    return img


def render_array(sc: Scene, size: int = 64) -> np.ndarray:
    """uint8 [S, S, 3]."""
    return np.asarray(render(sc, size), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# The pipeline's view: virtual shards
# ---------------------------------------------------------------------------------------------

def shard_names(name: str, cfg: SyntheticConfig) -> tuple[str, ...]:
    """The virtual shards of a source: 'synthetic:scenes#00003' ... (names for messages and logs)."""
    return tuple(f"{name}#{s:05d}" for s in range(cfg.shards))


def shard_range(cfg: SyntheticConfig, shard: int, epoch: int) -> range:
    """Scene indices of virtual shard ``shard`` in ``epoch``: every epoch draws new ones."""
    start = (epoch * cfg.shards + shard) * cfg.shard_size
    return range(start, start + cfg.shard_size)


def shard_of(path: str) -> int:
    return int(path.rsplit("#", 1)[1])


def draw(cfg: SyntheticConfig, index: int) -> tuple[Image.Image, str]:
    """Scene ``index`` of a source's split, drawn: (RGB image of cfg.image_size, caption)."""
    sc = scene(cfg.seed, cfg.split, index, max_objects=cfg.max_objects)
    return render(sc, cfg.image_size), sc.caption


# ---------------------------------------------------------------------------------------------
# Writing a WebDataset shard
# ---------------------------------------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, *, split: str, start: int, count: int, seed: int = 0, image_size: int = 64,
                max_objects: int = 2) -> int:
    """Write scenes ``start .. start + count - 1`` of ``split`` ('val': held-in compositions, a stream
    apart from what training draws; 'heldout': the held-out compositions) to the WebDataset tar
    ``path``: ``KEY.png`` + ``KEY.json`` {"caption", "source": "synthetic", "split", "index", "seed",
    "objects": [{shape, colour, size, texture}], "relation"}. Byte-identical on rebuild (members in
    key order, mtime 0, no owner names, JSON with sorted keys). -> the number of samples written."""
    if split not in ("val", "heldout"):
        raise ValueError(f"split: must be 'val' or 'heldout', got {split!r}; training draws its own scenes "
                         "on the fly (data.train: synthetic:scenes)")
    if start < 0 or count < 1:
        raise ValueError(f"start, count: need start >= 0 and count >= 1, got {start}, {count}")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, start + count):
            sc = scene(seed, split, i, max_objects=max_objects)
            key = f"synthetic-{split}-{seed}-{i:08d}"
            meta = {"caption": sc.caption, "source": "synthetic", "split": split, "index": i, "seed": seed,
                    **sc.attributes()}
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            _add(tar, f"{key}.png", _png(render(sc, image_size)))
    return count


# ---------------------------------------------------------------------------------------------
# The compositional evaluation set
# ---------------------------------------------------------------------------------------------

CLASS_TEMPLATES = ("{}", "a picture of {}", "there is {}")
"""Zero-shot prompts for the 64 colour x shape classes; "{}" is the class with its article
("a red star", "an orange moon")."""
NEGATIVE_TYPES = ("colour", "shape", "size", "texture", "order")


def _eval_caption(objects: tuple[Obj, ...], axis: str | None) -> str:
    """The one canonical wording the hard-negative test compares: all four attributes of one object;
    colour + shape of each of two ('... to the left of ...' / '... above ...')."""
    if axis is None:
        return noun_phrase(objects[0], size=True, texture=True)
    a, b = (noun_phrase(o, size=False, texture=False) for o in objects)
    return f"{a} {'to the left of' if axis == 'h' else 'above'} {b}"


def _swap(o: Obj, **kw) -> Obj:
    return Obj(**{**asdict(o), **kw})


def _other(values: tuple[str, ...], current: str, rng: np.random.Generator) -> str:
    rest = [v for v in values if v != current]
    return rest[int(rng.integers(len(rest)))]


def hard_negatives(sc: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """[(type, caption)]: the canonical caption with exactly one thing changed. One object: colour,
    shape, size, texture; two objects: colour or shape of one of them, and the order (A left of B ->
    B left of A)."""
    objs, axis = sc.objects, sc.axis
    if axis is None:
        o = objs[0]
        return [(t, _eval_caption((_swap(o, **{t: _other(values, getattr(o, t), rng)}),), None))
                for t, values in (("colour", COLOUR_NAMES), ("shape", SHAPES), ("size", SIZES),
                                  ("texture", TEXTURES))]
    out = []
    for t, values in (("colour", COLOUR_NAMES), ("shape", SHAPES)):
        k = int(rng.integers(2))
        changed = list(objs)
        changed[k] = _swap(objs[k], **{t: _other(values, getattr(objs[k], t), rng)})
        out.append((t, _eval_caption(tuple(changed), axis)))
    out.append(("order", _eval_caption((objs[1], objs[0]), axis)))
    return out


@dataclass
class CompositionalSet:
    """``n`` held-out scenes (``heldout_scene`` 0 .. n-1: half one object of a held-out colour x shape,
    half two objects in a held-out arrangement) with their canonical captions, hard negatives and the
    64 colour x shape class prompts; what ``eval.run.compositional`` reads. Nothing on disk."""

    name: str
    scenes: list[Scene]
    captions: list[str]
    negatives: list[list[tuple[str, str]]]
    class_names: list[str] = field(default_factory=lambda: [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES])
    render_size: int = 64
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def heldout_classes(self) -> list[int]:
        return [self.class_names.index(f"{c} {s}") for c, s in HELDOUT_COLOUR_SHAPE]

    def label(self, i: int) -> int:
        """Class id of a one-object scene (-1 for two objects)."""
        sc = self.scenes[i]
        return -1 if sc.axis is not None else self.class_names.index(f"{sc.objects[0].colour} {sc.objects[0].shape}")

    def prompts(self) -> list[list[str]]:
        return [[t.format(f"{_article(c)} {c}") for t in CLASS_TEMPLATES] for c in self.class_names]

    def iter_batches(self, *, image_size: int, batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous share of the scenes -> (images float32 [B, 3, H, W] in [-1, 1],
        scene ids [B]); drawn once per image size and rank, then kept (a few MB)."""
        from limoe_ds.data.benchmarks import rank_share
        share = rank_share(len(self.scenes), dp_rank, dp_size)
        key = (image_size, share.start, share.stop)
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = np.stack([eval_transform(render(self.scenes[i], self.render_size), image_size)
                                         for i in share]) if len(share) else np.zeros((0, image_size, image_size, 3),
                                                                                      np.uint8)
        arr = self._cache[key]
        for b in range(0, len(share), batch_size):
            ids = torch.arange(share.start + b, min(share.stop, share.start + b + batch_size), dtype=torch.int64)
            yield to_tensor(arr[b:b + batch_size]), ids


def compositional_set(name: str, n: int = 1000, *, seed: int = 0, render_size: int = 64) -> CompositionalSet:
    """The compositional evaluation set of the procedural source ``name`` ('synthetic:scenes'):
    deterministic from (seed, n); ConfigError for an unknown name."""
    check_synthetic_name(name, "eval.compositional")
    scenes = [heldout_scene(seed, i) for i in range(n)]
    captions = [_eval_caption(sc.objects, sc.axis) for sc in scenes]
    negatives = [hard_negatives(sc, np.random.default_rng([seed, _TAG, 9, sc.index])) for sc in scenes]
    return CompositionalSet(name=name.split(":", 1)[1], scenes=scenes, captions=captions, negatives=negatives,
                            render_size=render_size)


__all__ = ["SHAPES", "COLOURS", "COLOUR_NAMES", "SIZES", "TEXTURES", "RELATIONS", "HELDOUT_COLOUR_SHAPE",
           "HELDOUT_ARRANGEMENTS", "HELDIN_COLOUR_SHAPE", "Obj", "Scene", "scene", "heldout_scene", "caption",
           "noun_phrase", "render", "render_array", "shard_names", "shard_range", "shard_of", "write_shard",
           "CompositionalSet", "compositional_set", "hard_negatives", "NEGATIVE_TYPES", "CLASS_TEMPLATES",
           "is_heldout_pair", "is_heldout_arrangement"]
