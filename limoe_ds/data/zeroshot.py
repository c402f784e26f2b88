"""Zero-shot classification sets: labelled images, class names and prompt templates.

Layout (written by tools/build_mini_dataset.py, e.g. ``data/mini/zeroshot/fashion_mnist``)::

    info.json        {"name", "num_samples", "seen_classes", "unseen_classes", "shards"}
    classnames.txt   one class name per line; line i is label i
    templates.txt    one prompt per line with "{}" where the class name goes
    test-000000.tar  WebDataset: KEY.png + KEY.cls (the integer label)

Legend: B batch, H = W image size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from limoe_ds.config.errors import ConfigError
from limoe_ds.config.typed import build
from limoe_ds.data.benchmarks import rank_share
from limoe_ds.data.errors import DataError, SkipSample, zero_counts
from limoe_ds.data.image import decode_image, eval_transform, to_tensor
from limoe_ds.data.sources import ResolvedSource, read_shard
from limoe_ds.data.stream import ReaderId, assign


@dataclass(kw_only=True)
class ZeroShotInfo:
    """``info.json``, type-checked by ``limoe_ds.config.typed`` (other keys, e.g. class_counts, are kept
    for people and not read)."""

    open_keys = True
    name: str
    num_samples: int
    shards: list[str]
    seen_classes: list[int]
    unseen_classes: list[int]


@dataclass
class ZeroShotSet:
    name: str
    root: str
    class_names: list[str]
    templates: list[str]
    shards: list[str]
    num_samples: int
    seen_classes: list[int]
    """Classes whose images (and names, in their captions) were in training: not zero-shot."""
    unseen_classes: list[int]
    """Classes kept out of training entirely: the zero-shot part."""
    max_pixels: int = 50_000_000
    skip_counts: dict[str, int] = field(default_factory=zero_counts)

    def prompts(self) -> list[list[str]]:
        """[class][template] prompt strings, e.g. 'a photo of a sneaker.'."""
        return [[t.format(c) for t in self.templates] for c in self.class_names]

    def iter_batches(self, *, image_size: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                     max_images: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """-> (images float32 [B, 3, H, W] in [-1, 1], labels int64 [B]); resize + centre crop,
        file order, the last batch partial; ranks read disjoint parts that together cover the set.
        ``max_images`` (0 = all): only the first records of each shard, ``max_images`` in all split
        evenly over the shards, so the same records whatever the number of ranks."""
        self.skip_counts = zero_counts()
        src = ResolvedSource(0, self.name, tuple(self.shards), "webdataset", 1.0, "caption", None, None)
        asg = assign(list(range(len(self.shards))), ReaderId(dp_rank, dp_size, 0, 1))
        images, labels = [], []
        for shard in asg.shards:
            limit = len(rank_share(max_images, shard, len(self.shards))) if max_images else None
            for rec in read_shard(src, self.shards[shard], 0, lambda i: i % asg.stride == asg.phase,
                                  count_failure=asg.phase == 0):
                if limit is not None and rec.index >= limit:
                    break
                sample = self._decode(rec, image_size)
                if sample is None:
                    continue
                images.append(sample[0])
                labels.append(sample[1])
                if len(images) == batch_size:
                    yield to_tensor(images), torch.tensor(labels, dtype=torch.int64)
                    images, labels = [], []
        if images:
            yield to_tensor(images), torch.tensor(labels, dtype=torch.int64)

    def _decode(self, rec, image_size: int):
        try:
            if rec.problem is not None:
                raise SkipSample(rec.problem, rec.detail)
            if rec.label is None or not 0 <= rec.label < len(self.class_names):
                raise SkipSample("missing_caption", "no valid .cls label")
            return eval_transform(decode_image(rec.image, self.max_pixels), image_size), rec.label
        except SkipSample as e:
            self.skip_counts[e.reason] += 1
            self.skip_counts["samples_lost"] += rec.lost
            return None


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def load_zeroshot_set(root: str) -> ZeroShotSet:
    """Read a zero-shot set directory; DataError naming the path if it is missing or incomplete."""
    info_path = os.path.join(root, "info.json")
    if not os.path.isfile(info_path):
        raise DataError(f"zero-shot set: no {info_path!r}; build it with tools/build_mini_dataset.py")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = build(ZeroShotInfo, json.load(f), "")
    except json.JSONDecodeError as e:
        raise DataError(f"{info_path}: not valid JSON ({e}); rebuild it with tools/build_mini_dataset.py") from None
    except ConfigError as e:  # a set built by hand: name the file and the key
        raise DataError(f"{info_path}: {e}") from None
    class_names = _lines(os.path.join(root, "classnames.txt"))
    templates = _lines(os.path.join(root, "templates.txt"))
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DataError(f"zero-shot set: template {bad[0]!r} in {root!r}/templates.txt has no '{{}}'")
    shards = [os.path.join(root, s) for s in info.shards]
    return ZeroShotSet(name=info.name, root=root, class_names=class_names, templates=templates, shards=shards,
                       num_samples=info.num_samples, seen_classes=info.seen_classes,
                       unseen_classes=info.unseen_classes)


__all__ = ["ZeroShotSet", "load_zeroshot_set"]
