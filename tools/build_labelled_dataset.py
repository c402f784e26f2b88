#!/usr/bin/env python3
"""Build data/fmnist: Fashion-MNIST as labelled WebDataset shards, the image classifier's (V-MoE,
``model.preset=tiny-vmoe``) bundled real data.

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
                num_shards: int) -> dict:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    shards, counts = [], []
    for s in range(num_shards):
        rel = f"{split}/{split}-{s:03d}.tar"
        idx = order[s::num_shards]
        with tarfile.open(os.path.join(root, rel), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in idx:
                key = f"fm-{split}-{int(i):05d}"
                _add(tar, f"{key}.png", png(images[i]))
                _add(tar, f"{key}.cls", str(int(labels[i])).encode())
        shards.append(rel)
        counts.append(int(len(idx)))
    return {"shards": shards, "shard_samples": counts, "num_samples": int(len(order)),
            "class_counts": np.bincount(labels[order], minlength=len(FMNIST_CLASSES)).tolist()}


def build(out: str, *, seed: int = 0, train_shards: int = 8, test_shards: int = 2) -> dict:
    if not os.path.exists(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")):
        raise SystemExit(f"error: {FMNIST} is missing: apt-get install dataset-fashion-mnist (Debian)")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = np.random.default_rng(seed)
    manifest = {"name": "fashion_mnist", "source": "Debian dataset-fashion-mnist (MIT)", "seed": seed,
                "class_names": FMNIST_CLASSES}
    train_x, train_y = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
    manifest["train"] = write_split(tmp, "train", train_x, train_y, rng.permutation(len(train_x)), train_shards)
    test_x, test_y = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
    manifest["test"] = write_split(tmp, "test", test_x, test_y, np.arange(len(test_x)), test_shards)
    with open(os.path.join(tmp, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(FMNIST_CLASSES) + "\n")
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/fmnist")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    m = build(args.out, seed=args.seed)
    print(f"wrote {args.out}: {m['train']['num_samples']} train, {m['test']['num_samples']} test images, "
          f"{len(m['class_names'])} classes")


if __name__ == "__main__":
    main()
