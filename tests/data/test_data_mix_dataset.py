"""The main job's bundled dataset, data/mix (tools/build_dataset.py). It must exist: ``make test`` builds
it first with

    python tools/build_dataset.py --out data/mix

and these tests FAIL (not skip) when it is missing. The held-out test reads every caption of every
built shard, so a future change to the builder cannot leak a zero-shot class name into training silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

from limoe_ds.data import Tokenizer, synthetic
from limoe_ds.data.zeroshot import load_zeroshot_set

ROOT = Path(os.environ.get("LIMOE_MIX_DATA", Path(__file__).resolve().parents[2] / "data" / "mix"))
BUILD = "python tools/build_dataset.py --out data/mix"
SOURCES = {"icons", "emoji", "clipart", "digits"}


def manifest() -> dict:
    """Called inside each test (not a fixture), so missing data is a test FAILURE, not an error/skip."""
    path = ROOT / "manifest.json"
    assert path.is_file(), f"bundled dataset missing: no {path}; build it with `{BUILD}`"
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=None)
def _read(shards: tuple[str, ...]) -> tuple[tuple[str, dict, str], ...]:
    """-> (key, json metadata, sha1 of the image bytes) of every sample, in shard order."""
    out = []
    for shard in shards:
        pngs, metas = {}, {}
        with tarfile.open(ROOT / shard) as tar:
            for m in tar:
                key, ext = m.name.rsplit(".", 1)
                data = tar.extractfile(m).read()
                if ext == "png":
                    pngs[key] = hashlib.sha1(data).hexdigest()
                elif ext == "json":
                    metas[key] = json.loads(data)
        assert set(pngs) == set(metas), f"{shard}: images and captions do not pair up"
        out += [(k, metas[k], pngs[k]) for k in sorted(metas)]
    return tuple(out)


def train_samples() -> tuple:
    m = manifest()
    return _read(tuple(s for src in sorted(SOURCES) for s in m[f"train/{src}"]["shards"]))


def val_samples() -> tuple:
    return _read(tuple(manifest()["val"]["shards"]))


def _forms(word: str) -> set[str]:
    forms = {word, word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    return forms


def heldout_regex() -> re.Pattern:
    """Built here from the zero-shot sets' own class names, not from the builder's lists."""
    heldout = load_zeroshot_set(str(ROOT / "zeroshot" / "heldout_objects"))
    fm = load_zeroshot_set(str(ROOT / "zeroshot" / "fashion_mnist"))
    words = list(heldout.class_names) + [w for c in fm.unseen_classes for w in fm.class_names[c].split()]
    alts = sorted({f for w in words for f in _forms(w.lower())}, key=lambda f: (-len(f), f))
    return re.compile(r"(?<![a-z])(" + "|".join(map(re.escape, alts)) + r")(?![a-z])", re.IGNORECASE)


def test_scale_distinct_images_and_captions():
    m = manifest()
    train = train_samples()
    assert len(train) == m["train"]["num_samples"] == sum(m["sources"][s]["train_pairs"] for s in SOURCES)
    images = {sha for _, _, sha in train}
    captions = {meta["caption"] for _, meta, _ in train}
    assert len(images) >= 100_000 and len(images) == len(train), "deduplicated by image: one pair per image"
    assert len(captions) >= 100_000
    assert m["train"]["distinct_images"] == len(images) and m["train"]["distinct_captions"] == len(captions)
    assert set(m["sources"]) == SOURCES and {meta["source"] for _, meta, _ in train} == SOURCES
    assert all(meta["licence"] for _, meta, _ in train)


def test_shard_index_matches_the_shards():
    m = manifest()
    for src in sorted(SOURCES):
        index = json.loads((ROOT / "train" / src / "manifest.json").read_text())[src]
        counts = [len(_read((s,))) for s in m[f"train/{src}"]["shards"]]
        assert counts == index["shard_samples"] == m[f"train/{src}"]["shard_samples"]
        assert len(counts) % 8 == 0, "1, 2, 4 and 8 readers take whole shards"
    assert len(val_samples()) == m["val"]["num_samples"] >= 1000


def test_heldout_names_absent_from_every_training_and_validation_caption():
    pattern = heldout_regex()
    leaks = [(k, meta["caption"]) for k, meta, _ in train_samples() + val_samples()
             if pattern.search(meta["caption"])]
    assert not leaks, f"{len(leaks)} captions name a held-out class, e.g. {leaks[:3]}"
    assert pattern.search("Two Umbrellas") and pattern.search("butterflies") and pattern.search("an ankle boot")
    assert not pattern.search("a keyboard") and not pattern.search("rocketry")


def test_zero_shot_images_are_not_training_or_validation_images():
    zs = load_zeroshot_set(str(ROOT / "zeroshot" / "heldout_objects"))
    assert len(zs.class_names) == 20 and zs.seen_classes == [] and zs.unseen_classes == list(range(20))
    seen = {sha for _, _, sha in train_samples() + val_samples()}
    labels = []
    with tarfile.open(zs.shards[0]) as tar:
        for m in tar:
            data = tar.extractfile(m).read()
            if m.name.endswith(".png"):
                assert hashlib.sha1(data).hexdigest() not in seen, m.name
            elif m.name.endswith(".cls"):
                labels.append(int(data))
    assert len(labels) == zs.num_samples >= 600
    assert min(labels.count(k) for k in range(20)) >= 30, "every held-out class has images"


def test_val_is_drawn_from_the_training_distribution():
    m = manifest()
    by_source = m["val"]["by_source"]
    assert set(by_source) == SOURCES | {"synthetic"}, "the main job trains on the procedural source too"
    assert by_source["synthetic"] == sum(meta["source"] == "synthetic" for _, meta, _ in val_samples()) >= 500
    for src in SOURCES:  # the same share of every source (--val-fraction), within rounding
        share = by_source[src] / (by_source[src] + m["sources"][src]["train_pairs"])
        assert abs(share - 0.015) < 0.002, (src, share)
    assert not {sha for _, _, sha in val_samples()} & {sha for _, _, sha in train_samples()}


def test_captions_are_phrases_not_identifiers_and_fit_the_text_length():
    tok = Tokenizer.from_file(str(ROOT / "tokenizer.json"))
    captions = [meta["caption"] for _, meta, _ in train_samples()]
    # 'arrow_left', 'mdi:home', 'arrow-left-bold' are identifiers; 't-shirt' is a word
    identifiers = [c for c in captions if re.fullmatch(r"[a-z0-9]+([_:][a-z0-9]+)+|[a-z0-9]+(-[a-z0-9]+){2,}", c)]
    assert not identifiers, identifiers[:5]
    assert all(c.strip() == c and "  " not in c and "{" not in c for c in captions)
    sample = captions[:: max(1, len(captions) // 5000)]
    lengths = [len(tok.encode(c)) for c in sample]
    assert sum(n <= 16 for n in lengths) / len(lengths) >= 0.9, "the tiny preset reads 16 tokens"
    multiword = sum(" " in c for c in captions) / len(captions)
    assert multiword >= 0.9


def test_no_real_caption_binds_a_heldout_composition_of_the_procedural_source():
    """'green heart' (an emoji), 'a blue icon of circle': a colour naming a shape within three words."""
    pairs = synthetic.HELDOUT_COLOUR_SHAPE
    alts = [rf"{c}(?:\s+[^\s,;:]+){{0,3}}?\s+{sh}(?:s|es)?" for c, sh in pairs]
    pattern = re.compile(r"(?<![a-z])(?:" + "|".join(alts) + r")(?![a-z])", re.IGNORECASE)
    leaks = [meta["caption"] for _, meta, _ in train_samples() + val_samples()
             if meta["source"] != "synthetic" and pattern.search(meta["caption"])]
    assert not leaks, f"{len(leaks)} real captions bind a held-out colour x shape pair, e.g. {leaks[:3]}"
    assert pattern.search("an emoji of green hearts") and not pattern.search("green, heart")
