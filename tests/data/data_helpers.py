"""Small synthetic data for the data tests (shards written in a tmp dir in milliseconds)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from limoe_ds.data.tokenizer import Tokenizer, train_bpe


def image_bytes(seed: int, size: tuple[int, int] = (20, 14), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A small random image (content depends on seed) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def caption(i: int) -> str:
    return f"item {i} here"


def item_ids(tokenizer: Tokenizer, tokens_BL) -> list[int]:
    """Sample ids back from token rows (captions are 'item N here')."""
    return [int(re.search(r"item (\d+)", tokenizer.decode(row)).group(1)) for row in tokens_BL]


def pair_shards(root: Path, num_shards: int, per_shard: int, *, json_every: int = 0, start: int = 0) -> list[Path]:
    """Shards of good pairs; sample ids start..start+num_shards*per_shard-1, shard s holds a contiguous run."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        members = []
        for j in range(per_shard):
            i = start + s * per_shard + j
            members.append((f"k{i:05d}.png", image_bytes(i)))
            if json_every and i % json_every == 0:
                members.append((f"k{i:05d}.json", json.dumps({"caption": caption(i)}).encode()))
            else:
                members.append((f"k{i:05d}.txt", caption(i).encode()))
        paths.append(write_tar(root / f"shard-{s:03d}.tar", members))
    return paths


def make_tokenizer(tmp_path: Path, n: int = 400) -> Tokenizer:
    """A tokenizer trained on the synthetic captions (so 'item N here' round-trips)."""
    texts = [caption(i) for i in range(n)] + [f"{d}" for d in range(1000)]
    tok = train_bpe(texts, vocab_size=600)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(str(path))
