"""Typed data configuration: where image-text pairs come from and how they are read.

Types are checked against the annotations by ``limoe_ds.config.typed`` (``DataConfig.from_dict``,
and every source however given), then ``__post_init__`` runs the range checks; every error is a
``ConfigError`` that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from limoe_ds.config.errors import check as _check
from limoe_ds.config.typed import build

FORMATS = ("auto", "webdataset", "parquet", "arrow", "folder", "synthetic")

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_FAMILIES = ("scenes",)
"""Procedural sources (``limoe_ds.data.synthetic``), named ``synthetic:FAMILY`` where a path goes."""
SYNTHETIC_SPLITS = ("train", "val", "heldout")


def is_synthetic(path: Any) -> bool:
    """A procedural source's name (``synthetic:scenes``), not a file."""
    return isinstance(path, str) and path.startswith(SYNTHETIC_PREFIX)


def check_synthetic_name(name: str, key: str) -> str:
    """``synthetic:FAMILY`` -> FAMILY, or a ConfigError naming ``key``."""
    family = name[len(SYNTHETIC_PREFIX):]
    _check(family in SYNTHETIC_FAMILIES, key,
           f"unknown procedural source {name!r}; known: {[SYNTHETIC_PREFIX + f for f in SYNTHETIC_FAMILIES]}")
    return family


@dataclass(kw_only=True)
class SyntheticConfig:
    """Options of a procedural source (``path: "synthetic:scenes"``): scenes drawn on the fly, sample i
    a pure function of (seed, split, i). A training source is endless and never repeats a scene:
    epoch e's virtual shard s holds the indices ``[(e * shards + s) * shard_size, ... + shard_size)``.
    An evaluation source (data.val) is one epoch: ``shards * shard_size`` scenes."""

    seed: int = 0
    """Seeds the scenes themselves (data.seed still orders, shuffles and crops them)."""
    split: str | None = None
    """train (held-in compositions) | val (held-in, another stream than train) | heldout (the held-out
    compositions, never in train); None = train for data.train, val for data.val."""
    max_objects: int = 2
    """1: one object per scene; 2: one or two (half each), two with a relation (left of / above ...)."""
    image_size: int = 64
    """Side of the drawn image in pixels (the loader then crops / resizes to the model's size)."""
    shards: int = 64
    """Virtual shards per epoch (the unit split among ranks and workers: make it divisible by them)."""
    shard_size: int = 1000
    """Scenes per virtual shard."""

    check_key = "data.source.synthetic"

    def __post_init__(self) -> None:
        k = self.check_key
        _check(self.split is None or self.split in SYNTHETIC_SPLITS, f"{k}.split",
               f"must be one of {SYNTHETIC_SPLITS} or null, got {self.split!r}")
        _check(self.max_objects in (1, 2), f"{k}.max_objects", f"must be 1 or 2, got {self.max_objects}")
        _check(16 <= self.image_size <= 1024, f"{k}.image_size", f"must be in [16, 1024], got {self.image_size}")
        _check(self.shards >= 1, f"{k}.shards", f"must be >= 1, got {self.shards}")
        _check(self.shard_size >= 1, f"{k}.shard_size", f"must be >= 1, got {self.shard_size}")
        _check(self.seed >= 0, f"{k}.seed", f"must be >= 0, got {self.seed}")


@dataclass(kw_only=True)
class SourceConfig:
    """One data source: a set of shards (or one image folder) in one format."""

    path: str | list[str]
    """A file, a directory, a glob (``shards/*.tar``), a brace range (``train-{000..007}.tar``) or a list
    of those. A directory means its shards (webdataset/parquet/arrow) or, for ``folder``, the images."""
    format: str = "auto"
    """webdataset (tar of KEY.ext members) | parquet | arrow | folder (images + captions .jsonl/.csv) |
    auto (from the file extension: .tar/.tgz/.tar.gz, .parquet, .arrow; a directory with a captions
    file is a folder)."""
    weight: float = 1.0
    """Relative sampling weight when several training sources are mixed (normalised over sources)."""
    caption_key: str | None = None
    """JSON field / column / captions-file column holding the caption; None = DataConfig.caption_key."""
    image_key: str | None = None
    """Column with the image bytes (parquet/arrow) or file name (folder captions file);
    None = DataConfig.image_key for parquet/arrow and ``file_name`` for folders."""
    captions_file: str | None = None
    """folder only: the captions .jsonl/.csv; None = the single *.jsonl or *.csv inside ``path``."""
    synthetic: SyntheticConfig | None = None
    """synthetic only (``path: "synthetic:scenes"``): the procedural source's options; None = the
    defaults (filled in, so the resolved config records them)."""

    # config.typed hooks: how a message names a source, the prefix of the keys below (replaced by
    # the real one: data.train[1].weight), and a plain path or list of paths as the whole source.
    expects = "a path, a list of paths or a mapping with 'path'"
    expects_plural = "sources (paths, lists of paths or mappings with 'path')"
    check_key = "data.source"

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, (str, list)) else value

    def __post_init__(self) -> None:
        paths = self.paths
        _check(len(paths) > 0 and all(paths), "data.source.path",
               f"must be a non-empty path, glob or list of them, got {self.path!r}")
        _check(self.format in FORMATS, "data.source.format", f"must be one of {FORMATS}, got {self.format!r}")
        _check(self.weight > 0, "data.source.weight", f"must be > 0, got {self.weight}; drop the source instead")
        self._check_synthetic(paths)

    def _check_synthetic(self, paths: list[str]) -> None:
        synthetic = [p for p in paths if is_synthetic(p)]
        if not synthetic:
            _check(self.format != "synthetic", "data.source.path",
                   f"format synthetic needs a procedural source name such as 'synthetic:scenes', got {self.path!r}")
            _check(self.synthetic is None, "data.source.synthetic",
                   "only for a procedural source (path: synthetic:scenes); drop it")
            return
        _check(len(paths) == 1, "data.source.path",
               f"a procedural source is one name ('synthetic:scenes'), got {self.path!r}; give each its own source")
        check_synthetic_name(paths[0], "data.source.path")
        _check(self.format in ("auto", "synthetic"), "data.source.format",
               f"{self.path!r} is a procedural source: format must be synthetic or auto, got {self.format!r}")
        if self.synthetic is None:
            self.synthetic = SyntheticConfig()

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


def _as_source(value: Any, key: str) -> SourceConfig:
    """A SourceConfig, or a mapping / path / list of paths checked and built by config.typed."""
    return value if isinstance(value, SourceConfig) else build(SourceConfig, value, key)


@dataclass(kw_only=True)
class DataConfig:
    """Training and validation data, and how to read it."""

    train: list[SourceConfig] = field(default_factory=list, metadata={
        "expects": "a source (a path or a mapping with 'path') or a list of sources"})
    """Training sources (SourceConfig, mapping or plain path; one or a list), mixed by weight."""
    val: SourceConfig | None = None
    """Held-out image-caption pairs for the validation loss / retrieval (no shuffling): a
    SourceConfig, mapping, path or list of paths (one source)."""
    shuffle_buffer: int = 1000
    """Samples per shuffle block, per worker and source (the buffer holds raw bytes, not tensors)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 = read in the training process."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored when num_workers = 0)."""
    seed: int = 0
    """Seeds shard order, shuffle blocks, source mixing and crops; with the position, it fixes the stream."""
    max_image_pixels: int = 50_000_000
    """Images with more pixels (width * height, read from the header) are skipped as too_many_pixels."""
    max_caption_chars: int = 1000
    """Longer captions are cut to this many characters before tokenising (counted as caption_truncated)."""
    caption_key: str = "caption"
    """Default JSON field / column holding the caption."""
    image_key: str = "image"
    """Default parquet/arrow column holding the image (bytes, or a {bytes, path} struct)."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Train-time random resized crop: area fraction range (open_clip's default scale=(0.9, 1.0))."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Train-time random resized crop: aspect ratio range (torchvision's default)."""

    def __post_init__(self) -> None:
        train = [self.train] if isinstance(self.train, (str, Mapping, SourceConfig)) else list(self.train)
        self.train = [_as_source(s, f"data.train[{i}]") for i, s in enumerate(train)]
        if self.val is not None:
            self.val = _as_source(self.val, "data.val")
        for i, src in enumerate(self.train):
            split = src.synthetic.split if src.synthetic is not None else None
            _check(split in (None, "train"), f"data.train[{i}].synthetic.split",
                   f"a training source draws the held-in compositions (train), got {split!r}: val and heldout "
                   "scenes must never be trained on; drop the key")
        split = self.val.synthetic.split if self.val is not None and self.val.synthetic is not None else None
        _check(split in (None, "val", "heldout"), "data.val.synthetic.split",
               f"must be val or heldout (scenes never trained on), got {split!r}")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer",
               f"must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        _check(self.max_image_pixels >= 1, "data.max_image_pixels", f"must be >= 1, got {self.max_image_pixels}")
        _check(self.max_caption_chars >= 1, "data.max_caption_chars", f"must be >= 1, got {self.max_caption_chars}")
        self.crop_scale = tuple(float(x) for x in self.crop_scale)
        self.crop_ratio = tuple(float(x) for x in self.crop_ratio)
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "data.crop_scale", f"must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        _check(0 < lo <= hi, "data.crop_ratio", f"must be (lo, hi) with 0 < lo <= hi, got {self.crop_ratio}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """Build from a plain mapping (a config file): every value type-checked (``config.typed``),
        unknown keys rejected with the valid ones."""
        return build(cls, d, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["DataConfig", "SourceConfig", "SyntheticConfig", "FORMATS", "SYNTHETIC_FAMILIES", "SYNTHETIC_SPLITS",
           "is_synthetic", "check_synthetic_name"]
