#!/usr/bin/env python
"""Build the bundled mini image-text dataset from Debian packages (real images, real captions).

    python tools/build_mini_dataset.py --out data/mini        # about 2-4 minutes on 2 cores

Sources (see shared/DATA.md): Openclipart titles (+ folder category), Tux Paint stamp captions (first
line of each .txt), Fashion-MNIST train images of the *seen* classes with captions drawn from varied
phrasings. Three Fashion-MNIST classes (sandal, bag, ankle boot) are kept out of training entirely
(images and names in Fashion-MNIST captions) so evaluation can report seen and unseen classes apart.

Writes under --out: train/train-00{0..7}.tar and val/val-00{0,1}.tar (WebDataset: KEY.png + KEY.json
with "caption", "source"), zeroshot/fashion_mnist/ (test set: KEY.png + KEY.cls, classnames.txt,
templates.txt, info.json), tokenizer.json (byte-level BPE, vocab <= 4096) and manifest.json
(per split: shards, num_samples, shard_samples: the reader counts a shard holding fewer as damaged).
Deterministic given --seed. Missing packages are installed when run as root; otherwise the exact
apt-get command is printed and the exit status is 2.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
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

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from limoe_ds.data.tokenizer import train_bpe  # noqa: E402

PACKAGES = {  # Debian package -> a path it installs
    "dataset-fashion-mnist": "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
    "openclipart-png": "/usr/share/openclipart/png",
    "tuxpaint-stamps-default": "/usr/share/tuxpaint/stamps",
}
FMNIST = "/usr/share/datasets/fashion-mnist"
OPENCLIPART = "/usr/share/openclipart/png"
TUXPAINT = "/usr/share/tuxpaint/stamps"

FMNIST_CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot"]
UNSEEN = [5, 8, 9]
"""sandal, bag, ankle boot: of the ten names these have the most support in the other sources'
captions (bag, boot, shoe, sandal occur in Openclipart/Tux Paint), so zero-shot transfer is possible."""
SEEN_NAMES = {  # training captions vary the name, too
    0: ["t-shirt", "top", "tee shirt"], 1: ["pair of trousers", "trousers", "pants"],
    2: ["pullover", "sweater", "jumper"], 3: ["dress", "frock"], 4: ["coat", "jacket"],
    6: ["shirt", "button-up shirt"], 7: ["sneaker", "trainer", "running shoe"],
}
TRAIN_PHRASINGS = [
    "{a} {c}", "a photo of {a} {c}", "a small grey photo of {a} {c}", "{a} {c} on a black background",
    "a low resolution image of {a} {c}", "a grayscale picture of {a} {c}", "a thumbnail of {a} {c}", "{c}",
    "a product shot of {a} {c}", "this is {a} {c}", "{a} {c}, seen from the front", "an image showing {a} {c}",
    "a tiny 28 pixel {c}", "a fashion item: {a} {c}", "catalog image of {a} {c}", "the {c}",
]
ZS_TEMPLATES = [
    "a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a photo of the {}.", "a cropped photo of a {}.", "a photo of a small {}.", "a close-up photo of a {}.",
    "a drawing of a {}.",
]
MAX_SOURCE_PIXELS = 25_000_000  # a handful of Openclipart PNGs are up to 623 MP; not worth decoding
MAX_SAME_CAPTION = 8            # collection titles ("gramastar": 1375 stars) would flood the batches


# ------------------------------------------------------------------------------------------------
# Packages
# ------------------------------------------------------------------------------------------------

def ensure_packages(install: bool) -> None:
    missing = [p for p, path in PACKAGES.items() if not os.path.exists(path)]
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([*cmd, "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        return
    print(f"missing Debian packages: {' '.join(missing)}\ninstall them with:\n"
          f"  sudo apt-get update && sudo {' '.join(cmd)}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------

def _clean_words(text: str, drop: set[str]) -> str:
    words = re.sub(r"[_\-]+", " ", text).split()
    keep = [w for w in words if not re.search(r"\d", w) and len(w) > 1
            and not any(len(w) >= 3 and (d.startswith(w.lower()) or w.lower().startswith(d)) for d in drop)]
    return " ".join(keep).strip(" ,.")


def openclipart_caption(path: str, title: str, author: str, generic: bool) -> str:
    """'<title or cleaned file name>, <folder>': 'soft blue couch, furniture'."""
    rel = os.path.relpath(path, OPENCLIPART)
    folders = [f.replace("_", " ") for f in os.path.dirname(rel).split(os.sep)]
    drop = {a for a in author.lower().split() if len(a) >= 3} | {"architetto", "arch", "clipart", "svg"}
    main = "" if generic else _clean_words(title, set())
    if not main:
        main = _clean_words(os.path.splitext(os.path.basename(rel))[0], drop)
    category = folders[-1] if folders[-1].lower() != main.lower() or len(folders) == 1 else folders[-2]
    return f"{main}, {category}" if main else category


def _article(name: str) -> str:
    if name in ("trousers", "pants"):  # plural: "a photo of trousers"
        return ""
    return "an" if name[0] in "aeiou" else "a"


def fmnist_caption(label: int, rng: np.random.Generator) -> str:
    name = SEEN_NAMES[label][rng.integers(len(SEEN_NAMES[label]))]
    text = TRAIN_PHRASINGS[rng.integers(len(TRAIN_PHRASINGS))].format(a=_article(name), c=name)
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------
# Collecting pairs: each is {"key", "source", "caption", "path" | "array", ...}
# ------------------------------------------------------------------------------------------------

def collect_openclipart(rng: np.random.Generator, stats: collections.Counter) -> list[dict]:
    rows = []
    Image.MAX_IMAGE_PIXELS = None  # deliberate: sizes are read from the header and checked just below
    for path in sorted(glob.glob(f"{OPENCLIPART}/**/*.png", recursive=True)):
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_SOURCE_PIXELS:
                stats["openclipart_too_large"] += 1
                continue
            rows.append((path, (im.info.get("Title") or "").strip(), im.info.get("Author") or ""))
    title_counts = collections.Counter(t for _, t, _ in rows)
    pairs = [{"source": "openclipart", "path": p, "origin": os.path.relpath(p, OPENCLIPART),
              "caption": openclipart_caption(p, t, a, generic=not t or title_counts[t] >= 5)} for p, t, a in rows]
    return _cap_duplicates(pairs, rng, stats, "openclipart")


def _cap_duplicates(pairs: list[dict], rng: np.random.Generator, stats: collections.Counter, name: str) -> list[dict]:
    seen: collections.Counter = collections.Counter()
    out = []
    for i in rng.permutation(len(pairs)):
        cap = pairs[i]["caption"].lower()
        seen[cap] += 1
        if seen[cap] <= MAX_SAME_CAPTION:
            out.append(pairs[i])
        else:
            stats[f"{name}_caption_repeats_dropped"] += 1
    return sorted(out, key=lambda p: p["origin"])


def collect_tuxpaint(stats: collections.Counter) -> list[dict]:
    pairs = []
    for path in sorted(glob.glob(f"{TUXPAINT}/**/*.png", recursive=True)):
        stem = path[:-4]
        if not os.path.exists(stem + ".txt"):
            base = re.sub(r"_(mirror|back|flip)$", "", stem)
            stats["tuxpaint_variant_skipped" if os.path.exists(base + ".txt") else "tuxpaint_no_caption"] += 1
            continue
        with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
            caption = f.readline().strip()
        if caption:
            pairs.append({"source": "tuxpaint", "path": path, "origin": os.path.relpath(path, TUXPAINT),
                          "caption": caption})
    stats["tuxpaint_svg_only"] = sum(1 for s in glob.glob(f"{TUXPAINT}/**/*.svg", recursive=True)
                                     if not os.path.exists(s[:-4] + ".png"))
    return pairs


def read_idx(name: str) -> np.ndarray:
    with gzip.open(os.path.join(FMNIST, name), "rb") as f:
        data = f.read()
    if "images" in name:
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)


def collect_fmnist_train(per_class: int, rng: np.random.Generator) -> list[dict]:
    images, labels = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
    pairs = []
    for label in sorted(SEEN_NAMES):
        idx = np.sort(rng.permutation(np.flatnonzero(labels == label))[:per_class])
        pairs += [{"source": "fashion_mnist", "array": images[i], "label": label, "origin": f"train/{i}",
                   "caption": fmnist_caption(label, rng)} for i in idx]
    return pairs


# ------------------------------------------------------------------------------------------------
# Images and shards
# ------------------------------------------------------------------------------------------------

def to_png(task: tuple) -> bytes:
    """(path | array, max_side) -> PNG bytes, at most max_side on the longer side; alpha kept."""
    src, max_side = task
    if isinstance(src, np.ndarray):
        img = Image.fromarray(src, "L")
    else:
        Image.MAX_IMAGE_PIXELS = None  # sizes were checked against MAX_SOURCE_PIXELS when collecting
        img = Image.open(src)
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def encode_images(pairs: list[dict], max_side: int, workers: int) -> None:
    tasks = [(p.get("array", p.get("path")), max_side) for p in pairs]
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            pngs = pool.map(to_png, tasks, chunksize=64)
    else:
        pngs = [to_png(t) for t in tasks]
    for p, png in zip(pairs, pngs):
        p["png"] = png


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_pair_shards(pairs: list[dict], out_dir: str, prefix: str, num_shards: int) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for s in range(num_shards):
        name = f"{prefix}-{s:03d}.tar"
        with tarfile.open(os.path.join(out_dir, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for p in pairs[s::num_shards]:
                meta = {"caption": p["caption"], "source": p["source"], "origin": p["origin"]}
                if "label" in p:
                    meta["label"] = int(p["label"])
                _add(tar, f"{p['key']}.png", p["png"])
                _add(tar, f"{p['key']}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())
        names.append(name)
    return names


def write_zeroshot(out: str, num_shards: int) -> dict:
    root = os.path.join(out, "zeroshot", "fashion_mnist")
    os.makedirs(root, exist_ok=True)
    images, labels = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
    shards = []
    for s in range(num_shards):
        name = f"test-{s:03d}.tar"
        with tarfile.open(os.path.join(root, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s, len(images), num_shards):
                _add(tar, f"fm-test-{i:05d}.png", to_png((images[i], 28)))
                _add(tar, f"fm-test-{i:05d}.cls", str(int(labels[i])).encode())
        shards.append(name)
    with open(os.path.join(root, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(FMNIST_CLASSES) + "\n")
    with open(os.path.join(root, "templates.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(ZS_TEMPLATES) + "\n")
    info = {"name": "fashion_mnist", "num_samples": int(len(images)), "shards": shards,
            "class_counts": np.bincount(labels, minlength=10).tolist(),
            "seen_classes": sorted(SEEN_NAMES), "unseen_classes": UNSEEN}
    with open(os.path.join(root, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def split_pairs(pairs: list[dict], val_fraction: float, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Hold out val_fraction of every source; both halves in a seeded shuffled order."""
    by_source: dict[str, list[dict]] = collections.defaultdict(list)
    for p in pairs:
        by_source[p["source"]].append(p)
    train, val = [], []
    for name in sorted(by_source):
        items = by_source[name]
        perm = rng.permutation(len(items))
        n_val = int(round(len(items) * val_fraction))
        val += [items[i] for i in perm[:n_val]]
        train += [items[i] for i in perm[n_val:]]
    return [train[i] for i in rng.permutation(len(train))], [val[i] for i in rng.permutation(len(val))]


def assign_keys(pairs: list[dict], prefix: str) -> None:
    for i, p in enumerate(pairs):
        p["key"] = f"{prefix}-{i:06d}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "data", "mini"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-side", type=int, default=64, help="longest image side stored (pixels)")
    ap.add_argument("--fmnist-per-class", type=int, default=800, help="Fashion-MNIST train images per seen class")
    ap.add_argument("--train-shards", type=int, default=8)
    ap.add_argument("--val-shards", type=int, default=2)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--zeroshot-shards", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-install", action="store_true", help="never run apt-get; exit 2 if packages are missing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    ensure_packages(install=not args.no_install)
    rng = np.random.default_rng(args.seed)
    stats: collections.Counter = collections.Counter()
    pairs = collect_openclipart(rng, stats) + collect_tuxpaint(stats) + collect_fmnist_train(args.fmnist_per_class, rng)
    train, val = split_pairs(pairs, args.val_fraction, rng)
    assign_keys(train, "train")
    assign_keys(val, "val")
    print(f"{len(train)} train + {len(val)} val pairs; encoding images ...", flush=True)
    encode_images(train + val, args.max_side, args.workers)
    for sub in ("train", "val", "zeroshot"):  # no stale shards from an earlier build
        shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    manifest = {
        "seed": args.seed, "max_side": args.max_side,
        "train": {"shards": [f"train/{n}" for n in write_pair_shards(train, os.path.join(args.out, "train"), "train",
                                                                      args.train_shards)],
                  "num_samples": len(train), "shard_samples": [len(train[s::args.train_shards])
                                                               for s in range(args.train_shards)],
                  "by_source": dict(collections.Counter(p["source"] for p in train))},
        "val": {"shards": [f"val/{n}" for n in write_pair_shards(val, os.path.join(args.out, "val"), "val",
                                                                  args.val_shards)],
                "num_samples": len(val),
                "shard_samples": [len(val[s::args.val_shards]) for s in range(args.val_shards)],
                "by_source": dict(collections.Counter(p["source"] for p in val))},
        "zeroshot": {"fashion_mnist": "zeroshot/fashion_mnist"},
        "fashion_mnist": {"class_names": FMNIST_CLASSES, "seen_classes": sorted(SEEN_NAMES), "unseen_classes": UNSEEN,
                          "train_per_seen_class": args.fmnist_per_class,
                          "zeroshot": write_zeroshot(args.out, args.zeroshot_shards)},
        "skipped": dict(sorted(stats.items())),
    }
    tok = train_bpe([p["caption"] for p in train], vocab_size=args.vocab_size)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    manifest["tokenizer"] = {"path": "tokenizer.json", "vocab_size": tok.get_vocab_size(),
                             "trained_on": "train captions"}
    manifest["bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs
                            if f != "manifest.json")
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    print(f"wrote {args.out}: {len(train)} train, {len(val)} val, "
          f"{manifest['fashion_mnist']['zeroshot']['num_samples']} zero-shot, vocab {tok.get_vocab_size()}, "
          f"{manifest['bytes'] / 1e6:.1f} MB in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
