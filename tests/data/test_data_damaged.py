"""img2dataset folders (tar + metadata parquet + _stats.json per shard, written by the ``webdataset``
library) are read as they are, and a shard damaged in the middle, cut short, or holding fewer samples
than its index is counted (damaged_shard / unreadable_shard, with samples_lost) and named in one
warning line, never silently shortened. A clean shard is not counted."""

import gzip
import json
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_helpers import caption, image_bytes, item_ids, make_tokenizer, pair_shards
from limoe_ds.data import DataConfig, build_eval_loader, build_train_loader
from limoe_ds.data.sources import expected_samples

PER_SHARD = 12
SHARDS = 3
KW = dict(image_size=8, text_len=8, batch_size=8, dp_rank=0, dp_size=1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def img2dataset_folder(root, shards=SHARDS, per_shard=PER_SHARD):
    """What img2dataset's webdataset output writes: NNNNN.tar (KEY.jpg, KEY.txt, KEY.json), a metadata
    NNNNN.parquet (no images) and NNNNN_stats.json ("successes": the samples in the tar)."""
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            # the .json caption differs from the .txt one: the .txt must win (as img2dataset users expect)
            sink.write({"__key__": f"{i:09d}", "jpg": image_bytes(i, fmt="JPEG"), "txt": caption(i),
                        "json": {"caption": f"json {i}", "key": f"{i:09d}", "status": "success",
                                 "url": f"http://x/{i}.jpg"}})
    for s in range(shards):
        ids = range(s * per_shard, (s + 1) * per_shard)
        pq.write_table(pa.Table.from_pylist([{"key": f"{i:09d}", "url": f"http://x/{i}.jpg", "caption": caption(i),
                                              "status": "success"} for i in ids]), root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard + 2, "successes": per_shard,
                                                              "failed_to_download": 2, "failed_to_resize": 0}))
    return root


def eval_all(tok, source):
    ev = build_eval_loader(DataConfig(val=source, num_workers=0), tokenizer=tok, **KW)
    ids = sorted(i for b in ev for i in item_ids(tok, b["tokens"]))
    return ids, {k: v for k, v in ev.skip_counts().items() if v}


def first_header(path, key):
    """Byte offset of the first member header of sample ``key``."""
    with tarfile.open(path) as tar:
        return min(m.offset for m in tar.getmembers() if m.name.startswith(key + "."))


def test_img2dataset_folder_read_fully_from_its_tars(tmp_path, tok):
    root = img2dataset_folder(tmp_path / "i2d")
    assert expected_samples(str(root / "00001.tar")) == PER_SHARD
    n = SHARDS * PER_SHARD
    for fmt in ("auto", "webdataset"):  # the parquet beside each tar is metadata, never data
        ids, counts = eval_all(tok, {"path": str(root), "format": fmt})
        assert ids == list(range(n)) and counts == {}  # every sample, captions from .txt, a clean shard not counted
    tr = build_train_loader(DataConfig(train=[str(root)], num_workers=0, shuffle_buffer=8), tokenizer=tok, **KW)
    seen = [i for _, b in zip(range(2 * n // 8), tr) for i in item_ids(tok, b["tokens"])]
    assert set(seen) == set(range(n)) and not any(tr.skip_counts().values())


def test_parquet_only_folder_still_parquet_and_a_mixed_folder_refused(tmp_path, tok):
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    for s in range(2):
        rows = [{"image": image_bytes(i), "caption": caption(i)} for i in range(s * 5, s * 5 + 5)]
        pq.write_table(pa.Table.from_pylist(rows), pq_dir / f"{s:05d}.parquet")
    assert eval_all(tok, str(pq_dir)) == (list(range(10)), {})
    mixed = tmp_path / "mixed"
    pair_shards(mixed, 1, 3)
    pq.write_table(pa.Table.from_pylist([{"image": image_bytes(0), "caption": caption(0)}]), mixed / "other.parquet")
    for path in (str(mixed), [str(mixed / "shard-000.tar"), str(mixed / "other.parquet")]):
        with pytest.raises(ValueError, match=r"^data.val.path: mixes parquet .* and webdataset .* files; a source "
                                             r"reads one format: give each kind its own source") as e:
            build_eval_loader(DataConfig(val=path), tokenizer=tok, **KW)
        assert "\n" not in str(e.value)
    assert eval_all(tok, str(mixed / "*.tar")) == ([0, 1, 2], {})  # the fix the message names


def test_shard_damaged_in_the_middle_counts_the_samples_lost(tmp_path, tok, caplog):
    root = img2dataset_folder(tmp_path / "i2d")
    shard = root / "00001.tar"
    cut = first_header(shard, f"{PER_SHARD + 5:09d}")  # samples 5.. of shard 1 are overwritten
    data = shard.read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, len(data) - cut, dtype=np.uint8).tobytes()
    shard.write_bytes(data[:cut] + noise)  # same size: only the index and the bytes after the stop tell
    with caplog.at_level(logging.WARNING, logger="limoe_ds.data"):
        ids, counts = eval_all(tok, str(root))
    assert ids == [i for i in range(SHARDS * PER_SHARD) if not PER_SHARD + 5 <= i < 2 * PER_SHARD]
    assert counts == {"damaged_shard": 1, "samples_lost": PER_SHARD - 5}
    lines = [r.getMessage() for r in caplog.records if "damaged_shard" in r.getMessage()]
    assert lines == [f"data: damaged_shard {shard}: bad tar header at byte {cut}; "
                     f"{PER_SHARD - 5} of the {PER_SHARD} samples its index records are lost"]


def test_truncated_and_short_shards_counted(tmp_path, tok, caplog):
    root = img2dataset_folder(tmp_path / "i2d")
    cut_shard, short_shard = root / "00000.tar", root / "00002.tar"
    data = cut_shard.read_bytes()
    cut_shard.write_bytes(data[: first_header(cut_shard, f"{7:09d}") + 512 + 100])  # inside sample 7
    # a shard ended cleanly after 9 samples (a writer that died and closed), its stats say 12
    with wds.TarWriter(str(short_shard)) as sink:
        for i in range(2 * PER_SHARD, 2 * PER_SHARD + 9):
            sink.write({"__key__": f"{i:09d}", "jpg": image_bytes(i, fmt="JPEG"), "txt": caption(i)})
    with caplog.at_level(logging.WARNING, logger="limoe_ds.data"):
        ids, counts = eval_all(tok, str(root))
    assert ids == list(range(7)) + list(range(PER_SHARD, 2 * PER_SHARD + 9))
    assert counts == {"unreadable_shard": 1, "damaged_shard": 1, "samples_lost": (PER_SHARD - 7) + (PER_SHARD - 9)}
    text = caplog.text
    assert f"unreadable shard {cut_shard}" in text and f"({PER_SHARD - 7} samples by its index)" in text
    assert f"damaged_shard {short_shard}: ends after 9 samples; 3 of the 12 samples its index records" in text


def test_without_an_index_damage_is_still_counted(tmp_path, tok):
    """No _stats.json / manifest: a bad header mid-file and a tar with data after its end marker are
    counted (the number lost is unknown); a clean tar with zero padding is not."""
    a, b, clean = pair_shards(tmp_path, 3, 6)
    data = a.read_bytes()
    cut = first_header(a, "k00004")
    a.write_bytes(data[:cut] + b"\xff" * (len(data) - cut))
    gz = tmp_path / "a.tar.gz"  # the same damage inside a gzip stream
    gz.write_bytes(gzip.compress(a.read_bytes()))
    b.write_bytes(b.read_bytes() + clean.read_bytes())  # two tars concatenated: the second is never read
    clean.write_bytes(clean.read_bytes() + bytes(20 * 512))
    assert expected_samples(str(a)) is None
    ids, counts = eval_all(tok, [str(a), str(gz), str(b), str(clean)])
    assert ids == sorted(2 * list(range(4)) + list(range(6, 18)))
    assert counts == {"damaged_shard": 3}


def test_bundled_manifest_counts_per_shard(tmp_path, tok):
    """tools/build_mini_dataset.py's manifest: shard_samples, or num_samples dealt round-robin."""
    pair_shards(tmp_path / "train", 2, 5)
    man = {"train": {"shards": ["train/shard-000.tar", "train/shard-001.tar"], "num_samples": 11}}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    assert [expected_samples(str(tmp_path / "train" / f"shard-00{s}.tar")) for s in (0, 1)] == [6, 5]
    assert eval_all(tok, str(tmp_path / "train")) == (list(range(10)), {"damaged_shard": 1, "samples_lost": 1})
    man["train"]["shard_samples"] = [5, 5]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    assert eval_all(tok, str(tmp_path / "train")) == (list(range(10)), {})


@pytest.mark.integration  # the session's 2-rank reference run (deepspeed launcher), shared, read only
def test_new_counts_reach_metrics_and_the_checkpoint_marker(reference_run):
    """damaged_shard / samples_lost go where every skip count goes (0 here: the bundled shards are clean
    and match their manifest)."""
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "data/skipped/unreadable_shard" in r]
    assert logged and all(r["data/skipped/damaged_shard"] == 0 and r["data/skipped/samples_lost"] == 0
                          for r in logged)
    marker = json.loads((reference_run / "checkpoints" / "step00000004" / "limoe_complete.json").read_text())
    assert marker["data_skips"]["damaged_shard"] == 0 and marker["data_skips"]["samples_lost"] == 0


def test_gzipped_tar_is_read_in_one_pass(tmp_path, monkeypatch):
    """A .tar.gz is decompressed once: seeking back (to a member behind the next header) would restart
    the gzip stream, which made a 1,491-sample shard take 20 s instead of 0.3 s."""
    from limoe_ds.data.sources import ResolvedSource, read_shard
    (plain,) = pair_shards(tmp_path, 1, 40)
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    rewinds = []
    monkeypatch.setattr(gzip._GzipReader, "_rewind", lambda self, orig=gzip._GzipReader._rewind: (
        rewinds.append(1), orig(self)))
    src = ResolvedSource(0, "s", (str(gz),), "webdataset", 1.0, "caption", None, None)
    read = lambda p: [(r.key, r.image, r.caption, r.problem) for r in  # noqa: E731
                      read_shard(src, str(p), 3, lambda i: i % 2 == 1, count_failure=True)]
    assert read(gz) == read(plain) and len(read(plain)) == 19
    assert rewinds == []
