"""The real bundled dataset (tools/build_mini_dataset.py). It must exist: CI builds it first with

    python tools/build_mini_dataset.py --out data/mini

and these tests FAIL (not skip) when it is missing.
"""

import json
import os
import re
import tarfile
from pathlib import Path

import pytest
import torch

from limoe_ds.data import DataConfig, Tokenizer, build_eval_loader, build_train_loader
from limoe_ds.data.sources import ResolvedSource, read_shard
from limoe_ds.data.zeroshot import load_zeroshot_set

ROOT = Path(os.environ.get("LIMOE_MINI_DATA", Path(__file__).resolve().parents[2] / "data" / "mini"))
BUILD = "python tools/build_mini_dataset.py --out data/mini"


def load_manifest() -> dict:
    """Called inside each test (not a fixture), so missing data is a test FAILURE, not an error/skip."""
    path = ROOT / "manifest.json"
    assert path.is_file(), f"bundled dataset missing: no {path}; build it with `{BUILD}`"
    return json.loads(path.read_text())


def load_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(ROOT / load_manifest()["tokenizer"]["path"]))


def records(shards):
    src = ResolvedSource(0, "mini", tuple(shards), "webdataset", 1.0, "caption", None, None)
    for shard in shards:
        yield from read_shard(src, shard, 0, lambda i: True, count_failure=True)


def json_members(shards):
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    yield json.loads(tar.extractfile(m).read())


def test_manifest_counts_match_shards():
    manifest = load_manifest()
    for split in ("train", "val"):
        shards = [str(ROOT / s) for s in manifest[split]["shards"]]
        recs = list(records(shards))
        assert len(recs) == manifest[split]["num_samples"] == sum(manifest[split]["by_source"].values())
        assert all(r.problem is None and r.image and r.caption for r in recs)
    assert len(manifest["train"]["shards"]) == 8  # 1, 2, 4, 8 ranks split by whole shards
    assert 10_000 <= manifest["train"]["num_samples"] <= 20_000
    assert set(manifest["train"]["by_source"]) == {"openclipart", "tuxpaint", "fashion_mnist"}


def test_unseen_classes_absent_from_training():
    manifest = load_manifest()
    fm = manifest["fashion_mnist"]
    unseen = fm["unseen_classes"]
    assert len(unseen) >= 3 and not set(unseen) & set(fm["seen_classes"])
    words = {w for c in unseen for w in fm["class_names"][c].split()}  # sandal, bag, ankle, boot
    shards = [str(ROOT / s) for s in manifest["train"]["shards"] + manifest["val"]["shards"]]
    n_fm = 0
    for meta in json_members(shards):
        if meta["source"] == "fashion_mnist":
            n_fm += 1
            assert meta["label"] not in unseen
            assert not words & set(re.findall(r"[a-z]+", meta["caption"].lower())), meta["caption"]
    assert n_fm == manifest["train"]["by_source"]["fashion_mnist"] + manifest["val"]["by_source"]["fashion_mnist"]


def test_tokenizer_fits_tiny_preset():
    tok = load_tokenizer()
    assert tok.pad_id == 0 and tok.vocab_size <= 4096
    row = tok.encode_batch(["A marmot."], text_len=16)[0]
    assert tok.decode(row) == "a marmot." and row[row != 0][-1] == tok.eos_id


@pytest.mark.integration  # data-loader worker processes
def test_loaders_read_the_real_data():
    tok = load_tokenizer()
    cfg = DataConfig(train=[str(ROOT / "train" / "*.tar")], val=str(ROOT / "val"), num_workers=2,
                     shuffle_buffer=256)
    kw = dict(image_size=32, tokenizer=tok, text_len=16, batch_size=64)
    tr = build_train_loader(cfg, dp_rank=1, dp_size=4, **kw)
    for _, b in zip(range(4), tr):
        assert b["images"].shape == (64, 3, 32, 32) and b["tokens"].shape == (64, 16)
        assert b["images"].min() >= -1 and b["images"].max() <= 1 and b["images"].std() > 0.1
        assert (b["tokens"][:, 0] != 0).all()
    assert sum(tr.skip_counts().values()) == 0
    ev = build_eval_loader(cfg, dp_rank=0, dp_size=1, **kw)
    n = sum(b["images"].shape[0] for b in ev)
    assert n == json.loads((ROOT / "manifest.json").read_text())["val"]["num_samples"]


def test_zeroshot_fashion_mnist():
    manifest = load_manifest()
    zs = load_zeroshot_set(str(ROOT / manifest["zeroshot"]["fashion_mnist"]))
    assert len(zs.class_names) == 10 and zs.class_names[7] == "sneaker"
    assert zs.unseen_classes == manifest["fashion_mnist"]["unseen_classes"]
    assert all("{}" in t for t in zs.templates) and zs.prompts()[0][0] == zs.templates[0].format("t-shirt")
    labels, n = torch.zeros(10, dtype=torch.int64), 0
    for rank in range(2):
        for images, y in zs.iter_batches(image_size=32, batch_size=1000, dp_rank=rank, dp_size=2):
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
            labels += torch.bincount(y, minlength=10)
            n += len(y)
    assert n == zs.num_samples == 10_000 and labels.tolist() == [1000] * 10
    assert sum(zs.skip_counts.values()) == 0
