"""Standard benchmarks read from the user's own copies: ``--data KIND=PATH[,KEY=VALUE...]``.

Class-folder tree (``imagenet`` or ``classes``; torchvision's ImageFolder layout, e.g. ImageNet val)::

    PATH/<class folder>/**/*.jpg   one folder per class; the SORTED folder names are the label ids
    classnames=FILE                one class name per line, in that same order (required)
    templates=FILE                 one prompt per line with "{}" for the class name (default: the 80
                                   CLIP ImageNet templates, read from open_clip when it is installed)

Karpathy-split captions (``coco``, ``flickr30k`` or ``karpathy``; e.g. ``dataset_coco.json``)::

    PATH = the JSON: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}, ...]}, ...]}
    images=DIR                     image root; a file is DIR/filepath/filename (default: the JSON's folder)
    split=test                     which split to evaluate (default test)

Any kind takes ``name=`` (the report key; default the kind). Images are decoded with the training
pipeline's eval transform (``limoe_ds.data.image``); a bad image (missing, corrupt, too large) is
skipped and counted, never fatal. A bad spec is a ``DataError`` that says what to fix.
Legend: B batch, H = W image size.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import runpy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from limoe_ds.data.errors import DataError, SkipSample, zero_counts
from limoe_ds.data.image import IMAGE_EXTS, decode_image, eval_transform, to_tensor

READERS = {"imagenet": "classes", "classes": "classes", "coco": "karpathy", "flickr30k": "karpathy",
           "karpathy": "karpathy"}
"""--data KIND -> reader; the kind is also the default report name."""
OPTIONS = {"classes": ("classnames", "templates", "name"), "karpathy": ("images", "split", "name")}
SYNTAX = ("expected KIND=PATH[,KEY=VALUE...], e.g. imagenet=/data/imagenet/val,classnames=/data/classnames.txt "
          "or coco=/data/coco/dataset_coco.json,images=/data/coco,split=test")


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: str
    options: dict[str, str]

    @property
    def name(self) -> str:
        return self.options.get("name", self.kind)


def parse_data_spec(text: str) -> DataSpec:
    """'coco=/x.json,split=test' -> DataSpec('coco', '/x.json', {'split': 'test'}). Options start at a
    comma followed by ``word=``; any other comma belongs to the path or value ('/data/a,b/val')."""
    head, *rest = re.split(r",(?=[A-Za-z_]+=)", text)
    kind, sep, path = head.partition("=")
    if not sep or not path:
        raise DataError(f"--data {text!r}: {SYNTAX}")
    if kind not in READERS:
        raise DataError(f"--data {text!r}: unknown kind {kind!r}; one of {', '.join(READERS)}")
    options: dict[str, str] = {}
    allowed = OPTIONS[READERS[kind]]
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise DataError(f"--data {text!r}: option {item!r} is not KEY=VALUE; {SYNTAX}")
        if key not in allowed:
            raise DataError(f"--data {kind}: unknown option {key!r}; {kind} takes {', '.join(allowed)}")
        if key in options:
            raise DataError(f"--data {kind}: option {key!r} given twice")
        options[key] = value
    return DataSpec(kind, path, options)


# ---- images -------------------------------------------------------------------------------------
def load_image(path: str, image_size: int, max_pixels: int) -> np.ndarray:
    """Image file -> centre crop uint8 [H, W, 3], or SkipSample naming why not."""
    if not os.path.isfile(path):
        raise SkipSample("missing_image", path)
    with open(path, "rb") as f:
        return eval_transform(decode_image(f.read(), max_pixels), image_size)


def image_batches(items: list[tuple[str, int]], *, image_size: int, batch_size: int, max_pixels: int,
                  counts: dict[str, int], threads: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(path, id) items in order -> (images float32 [B, 3, H, W] in [-1, 1], ids int64 [B]); a bad
    image is left out and counted in ``counts`` under its reason. ``threads`` > 0 decodes in a thread
    pool (Pillow releases the GIL while decoding and resizing)."""
    def load(item: tuple[str, int]) -> np.ndarray | str:
        try:
            return load_image(item[0], image_size, max_pixels)
        except SkipSample as e:
            return e.reason

    pool = ThreadPoolExecutor(threads) if threads > 0 else None
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            loaded = list(pool.map(load, chunk) if pool else map(load, chunk))
            for x in loaded:
                if isinstance(x, str):
                    counts[x] += 1
            kept = [(x, item[1]) for x, item in zip(loaded, chunk) if not isinstance(x, str)]
            if kept:
                yield to_tensor([x for x, _ in kept]), torch.tensor([i for _, i in kept], dtype=torch.int64)
    finally:
        if pool is not None:
            pool.shutdown()


def rank_share(n: int, dp_rank: int, dp_size: int) -> range:
    """The contiguous part of ``range(n)`` that rank ``dp_rank`` reads (sizes differ by at most one),
    so gathering in rank order restores the original order."""
    return range(n * dp_rank // dp_size, n * (dp_rank + 1) // dp_size)


# ---- class-folder trees (zero-shot classification) ----------------------------------------------
@dataclass
class ClassFolderSet:
    """A labelled image tree; has the interface ``eval.run.zero_shot`` reads (as ``ZeroShotSet``)."""

    name: str
    root: str
    class_names: list[str]
    templates: list[str]
    files: list[tuple[str, int]]
    """(path, label) in sorted order."""
    seen_classes: list[int] = field(default_factory=list)
    """Empty: no seen/unseen split is known for a user's benchmark (only the overall accuracy)."""
    unseen_classes: list[int] = field(default_factory=list)
    max_pixels: int = 50_000_000
    threads: int = 0
    skip_counts: dict[str, int] = field(default_factory=zero_counts)

    def prompts(self) -> list[list[str]]:
        return [[t.format(c) for t in self.templates] for c in self.class_names]

    def iter_batches(self, *, image_size: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                     max_images: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share -> (images [B, 3, H, W], labels [B]); skips counted in ``skip_counts``.
        ``max_images`` (0 = all): the share of the first ``max_images`` files only."""
        self.skip_counts = zero_counts()
        files = self.files[:max_images] if max_images else self.files
        share = [files[i] for i in rank_share(len(files), dp_rank, dp_size)]
        yield from image_batches(share, image_size=image_size, batch_size=batch_size, max_pixels=self.max_pixels,
                                 counts=self.skip_counts, threads=self.threads)


def _lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"{what}: {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def clip_templates() -> list[str] | None:
    """The 80 CLIP ImageNet prompt templates from an installed open_clip (its zero_shot_metadata.py,
    run as a plain file so that open_clip itself is not imported); None when it is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "zero_shot_metadata.py")
    if not os.path.isfile(path):
        return None
    return [t("{}") for t in runpy.run_path(path)["OPENAI_IMAGENET_TEMPLATES"]]


def _templates(spec: DataSpec) -> list[str]:
    if "templates" in spec.options:
        templates = _lines(spec.options["templates"], f"--data {spec.kind} templates")
    else:
        templates = clip_templates()
        if templates is None:
            raise DataError(f"--data {spec.kind}: give templates=FILE (one prompt per line with {{}} for the class "
                            f"name); the default 80 CLIP templates come from open_clip, which is not installed "
                            f"(pip install --no-deps open_clip_torch)")
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise DataError(f"--data {spec.kind} templates: {bad[0]!r} has no '{{}}'" if bad else
                        f"--data {spec.kind} templates: the file is empty")
    return templates


def _class_files(folder: str, label: int) -> list[tuple[str, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                if "." in f and f.rsplit(".", 1)[1].lower() in IMAGE_EXTS]
    return out


def load_class_folders(spec: DataSpec) -> ClassFolderSet:
    root = spec.path
    if not os.path.isdir(root):
        raise DataError(f"--data {spec.kind}: {root!r} is not a directory (expected one subfolder per class)")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not folders:
        raise DataError(f"--data {spec.kind}: {root!r} has no class subfolders")
    if "classnames" not in spec.options:
        raise DataError(f"--data {spec.kind}: give classnames=FILE, one class name per line in the sorted order "
                        f"of the {len(folders)} class folders ({folders[0]!r}, ...)")
    names = _lines(spec.options["classnames"], f"--data {spec.kind} classnames")
    if len(names) != len(folders):
        raise DataError(f"--data {spec.kind} classnames: {len(names)} names in {spec.options['classnames']!r} but "
                        f"{len(folders)} class folders in {root!r}; one name per folder, in sorted folder order")
    files = [x for label, d in enumerate(folders) for x in _class_files(os.path.join(root, d), label)]
    if not files:
        raise DataError(f"--data {spec.kind}: no image files ({', '.join(IMAGE_EXTS)}) under {root!r}")
    return ClassFolderSet(name=spec.name, root=root, class_names=names, templates=_templates(spec), files=files)


# ---- Karpathy-split captions (retrieval) ---------------------------------------------------------
@dataclass
class CaptionSet:
    """Images with several captions each (COCO 5k / Flickr30k 1k test: 5 per image)."""

    name: str
    images: list[str]
    """Image file paths."""
    captions: list[str]
    image_of_caption: list[int]
    """Caption m describes images[image_of_caption[m]]."""
    max_pixels: int = 50_000_000
    threads: int = 0
    skip_counts: dict[str, int] = field(default_factory=zero_counts)

    def iter_batches(self, *, image_size: int, batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the images -> (images [B, 3, H, W], image indices [B])."""
        self.skip_counts = zero_counts()
        share = [(self.images[i], i) for i in rank_share(len(self.images), dp_rank, dp_size)]
        yield from image_batches(share, image_size=image_size, batch_size=batch_size, max_pixels=self.max_pixels,
                                 counts=self.skip_counts, threads=self.threads)


def _read_karpathy(path: str, kind: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"--data {kind}: {path!r} does not exist (expected a Karpathy-split JSON, e.g. "
                        f"dataset_coco.json)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise DataError(f"--data {kind}: {path!r} is not JSON: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"--data {kind}: {path!r} has no \"images\" list (expected a Karpathy-split JSON)")
    bad = next((i for i, e in enumerate(images) if not (isinstance(e, dict) and "filename" in e)), None)
    if bad is not None:
        raise DataError(f"--data {kind}: {path!r}: images[{bad}] has no \"filename\"")
    return images


def load_karpathy(spec: DataSpec) -> CaptionSet:
    entries = _read_karpathy(spec.path, spec.kind)
    image_dir = spec.options.get("images", os.path.dirname(os.path.abspath(spec.path)))
    if not os.path.isdir(image_dir):
        raise DataError(f"--data {spec.kind}: image directory {image_dir!r} does not exist; set images=DIR")
    split = spec.options.get("split", "test")
    splits = sorted({str(e.get("split")) for e in entries})
    chosen = [e for e in entries if e.get("split") == split]
    if not chosen:
        raise DataError(f"--data {spec.kind}: no images in split {split!r} of {spec.path!r}; its splits: "
                        f"{', '.join(splits)}")
    images, captions, image_of_caption = [], [], []
    for e in chosen:
        raws = [s.get("raw", "").strip() for s in e.get("sentences", [])]
        raws = [r for r in raws if r]
        if not raws:
            continue  # an image with no caption cannot be retrieved; COCO/Flickr30k have none
        image_of_caption += [len(images)] * len(raws)
        captions += raws
        images.append(os.path.join(image_dir, e.get("filepath", ""), e["filename"]))
    if not images:
        raise DataError(f"--data {spec.kind}: split {split!r} of {spec.path!r} has no image with a caption")
    return CaptionSet(name=spec.name, images=images, captions=captions, image_of_caption=image_of_caption)


def load_benchmark(spec: DataSpec | str, *, threads: int = 0) -> ClassFolderSet | CaptionSet:
    """Read a benchmark's index (not its images); DataError naming the fix when it is unusable."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    out = load_class_folders(spec) if READERS[spec.kind] == "classes" else load_karpathy(spec)
    out.threads = threads
    return out


__all__ = ["DataSpec", "parse_data_spec", "ClassFolderSet", "CaptionSet", "load_benchmark", "load_class_folders",
           "load_karpathy", "image_batches", "load_image", "rank_share", "clip_templates", "READERS"]
