"""Bad input: nothing crashes, nothing is silently lost. Every bad record is skipped and counted under
exactly one reason (the counts below are exact), or, when nothing usable remains, one clear DataError.
"""

import json
import tarfile

import numpy as np
import pytest

from data_helpers import caption, image_bytes, item_ids, make_tokenizer, write_tar
from limoe_ds.data import DataConfig, DataError, build_eval_loader, build_train_loader

PER_KIND = 12   # of each bad kind; 12 / 204 records = 5.9% each
GOOD = 60
MAX_PIXELS = 2000  # good images are 20 x 14 = 280 px, "huge" ones 60 x 50 = 3000 px
WORKERS = pytest.mark.integration  # num_workers > 0 starts data-loader worker processes
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def bad_members(kind: str, i: int, key: str) -> list[tuple[str, bytes]]:
    """Tar members for one bad sample of ``kind`` (two variants per kind, alternating on i)."""
    cap = caption(i).encode()
    png = image_bytes(i)
    alt = i % 2
    return {
        "corrupt_image": [(f"{key}.png", png[: len(png) // 2] if alt else b"\x89PNG garbage"), (f"{key}.txt", cap)],
        "zero_byte_image": [(f"{key}.jpg", b""), (f"{key}.txt", cap)],
        "too_many_pixels": [(f"{key}.png", image_bytes(i, size=(60, 50))), (f"{key}.txt", cap)],
        "unsupported_format": [(f"{key}.svg" if alt else f"{key}.xyz", SVG), (f"{key}.txt", cap)],
        "missing_image": [(f"{key}.txt", cap)],
        "missing_caption": [(f"{key}.png", png)] + ([(f"{key}.json", b'{"title": "no caption field"}')] if alt else []),
        "malformed_json": [(f"{key}.png", png), (f"{key}.json", b'{"caption": "unterminated' if alt else b"[1, 2]")],
        "empty_caption": [(f"{key}.png", png), (f"{key}.txt", b"" if alt else b"  \n\t ")],
        "non_utf8_caption": [(f"{key}.png", png), (f"{key}.txt", b"caf\xe9 \xff")] if alt else
                            [(f"{key}.png", png), (f"{key}.json", b'{"caption": "caf\xe9"}')],
        "caption_truncated": [(f"{key}.png", png), (f"{key}.txt", cap + b" " + b"x" * 10_000)],
    }[kind]


KINDS = ["corrupt_image", "zero_byte_image", "too_many_pixels", "unsupported_format", "missing_image",
         "missing_caption", "malformed_json", "empty_caption", "non_utf8_caption", "caption_truncated"]


def build_bad_shards(root):
    """4 tar shards mixing GOOD good samples with PER_KIND of every bad kind and PER_KIND duplicate keys,
    plus a missing shard, a garbage shard and a truncated shard (5 good samples before the cut)."""
    rng = np.random.default_rng(0)
    samples = [("good", i) for i in range(GOOD)] + [(k, 1000 + 100 * j + i) for j, k in enumerate(KINDS)
                                                    for i in range(PER_KIND)]
    samples = [samples[i] for i in rng.permutation(len(samples))]
    shards = [[] for _ in range(4)]
    for n, (kind, i) in enumerate(samples):
        key = f"s{i:05d}"
        members = [(f"{key}.png", image_bytes(i)), (f"{key}.txt", caption(i).encode())] if kind == "good" \
            else bad_members(kind, i, key)
        shards[n % 4].append(members)
    for d in range(PER_KIND):  # duplicates: repeat an earlier good sample's key later in the same shard
        shard = shards[d % 4]
        first = next(m for m in shard if m[0][0].endswith(".png") and m[-1][1].startswith(b"item"))
        shard.append([(first[0][0], image_bytes(5000 + d)), (first[0][0].replace(".png", ".txt"), b"item 5000 dup")])
    paths = [write_tar(root / f"bad-{s}.tar", [m for sample in shard for m in sample])
             for s, shard in enumerate(shards)]
    (root / "garbage.tar").write_bytes(b"this is not a tar file" * 100)
    trunc = write_tar(root / "trunc.tar", [m for i in range(2000, 2010)
                                           for m in ((f"t{i}.png", image_bytes(i, size=(40, 40))),
                                                     (f"t{i}.txt", caption(i).encode()))])
    data = trunc.read_bytes()
    cut = data.index(b"t2005.png") + 512 + 1000  # inside sample 5's image data
    trunc.write_bytes(data[:cut])
    return [str(p) for p in paths] + [str(root / "missing.tar"), str(root / "garbage.tar"), str(trunc)]


EXPECTED = {
    "corrupt_image": 2 * PER_KIND,  # corrupt + truncated, and zero-byte files
    "too_many_pixels": PER_KIND, "unsupported_format": PER_KIND, "missing_image": PER_KIND,
    "missing_caption": PER_KIND, "malformed_json": PER_KIND, "empty_caption": PER_KIND,
    "non_utf8_caption": PER_KIND, "duplicate_key": PER_KIND,
    "unreadable_shard": 3,          # missing.tar, garbage.tar, trunc.tar
    "caption_truncated": PER_KIND,  # counted, and the sample kept
}
GOOD_IDS = sorted(list(range(GOOD)) + [1000 + 100 * KINDS.index("caption_truncated") + i for i in range(PER_KIND)]
                  + list(range(2000, 2005)))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return build_bad_shards(root), make_tokenizer(root, n=2100)


def test_every_kind_is_at_least_five_percent(bad):
    records = GOOD + PER_KIND * (len(KINDS) + 1)
    assert PER_KIND / records >= 0.05


@pytest.mark.parametrize("dp, workers", [(1, 0), pytest.param(1, 2, marks=WORKERS), pytest.param(2, 2, marks=WORKERS)])
def test_eval_counts_are_exact(bad, dp, workers, caplog):
    paths, tok = bad
    cfg = DataConfig(val=paths, num_workers=workers, max_image_pixels=MAX_PIXELS)
    ids, counts = [], {}
    for r in range(dp):
        ev = build_eval_loader(cfg, image_size=8, tokenizer=tok, text_len=8, batch_size=16, dp_rank=r, dp_size=dp)
        ids += [i for b in ev for i in item_ids(tok, b["tokens"])]
        for k, v in ev.skip_counts().items():
            counts[k] = counts.get(k, 0) + v
    assert sorted(ids) == GOOD_IDS  # every usable sample, once
    assert {k: v for k, v in counts.items() if v} == EXPECTED  # no damaged_shard / samples_lost: no index


@pytest.mark.integration  # data-loader worker processes
def test_training_keeps_going_and_counts(bad):
    paths, tok = bad
    cfg = DataConfig(train=[{"path": paths}], num_workers=2, max_image_pixels=MAX_PIXELS, shuffle_buffer=32)
    tr = build_train_loader(cfg, image_size=8, tokenizer=tok, text_len=8, batch_size=16, dp_rank=0, dp_size=1)
    seen = [i for _, b in zip(range(3 * len(GOOD_IDS) // 16), tr) for i in item_ids(tok, b["tokens"])]
    assert set(seen) <= set(GOOD_IDS) and len(set(seen)) > len(GOOD_IDS) // 2
    counts = tr.skip_counts()
    assert set(k for k, v in counts.items() if v) == set(EXPECTED)  # every reason seen, nothing else


def test_empty_data_paths_are_one_line_errors(tmp_path, bad):
    _, tok = bad
    (tmp_path / "empty").mkdir()
    kw = dict(image_size=8, tokenizer=tok, text_len=8, batch_size=4, dp_rank=0, dp_size=1)
    for path, msg in [(str(tmp_path / "nothing-*.tar"), "no files match"), (str(tmp_path / "empty"), "no files match"),
                      ([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], "none of the 2 file"),
                      (str(tmp_path / "x-{000..003}.tar"), "none of the 4 file")]:
        with pytest.raises(DataError, match=msg) as e:
            build_train_loader(DataConfig(train=[path]), **kw)
        assert "\n" not in str(e.value) and str(e.value).startswith("data.train[0].path:")
    with pytest.raises(DataError, match="data.val: no validation source"):
        build_eval_loader(DataConfig(), **kw)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=WORKERS)])
def test_nothing_usable_is_one_line_error(tmp_path, bad, workers):
    _, tok = bad
    path = write_tar(tmp_path / "allbad.tar", [m for i in range(6) for m in bad_members("corrupt_image", i, f"k{i}")])
    kw = dict(image_size=8, tokenizer=tok, text_len=8, batch_size=4, dp_rank=0, dp_size=1)
    cfg = DataConfig(train=[str(path)], val=str(path), num_workers=workers)
    with pytest.raises(DataError) as e:
        next(iter(build_train_loader(cfg, **kw)))
    msg = str(e.value)
    assert "\n" not in msg and "no usable sample" in msg and "allbad.tar" in msg
    ev = build_eval_loader(cfg, **kw)
    with pytest.raises(DataError, match="got no usable sample") as e:
        list(ev)
    assert "allbad.tar" in str(e.value) and ev.skip_counts()["corrupt_image"] == 6


def test_folder_and_parquet_bad_rows(tmp_path, bad):
    """The same policy for the other formats: missing files, non-UTF-8 lines, null cells, duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    _, tok = bad
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.png").write_bytes(image_bytes(i))
    (folder / "z.png").write_bytes(b"")
    (folder / "v.svg").write_bytes(SVG)
    lines = [json.dumps({"file_name": f"{i}.png", "caption": caption(i)}).encode() for i in range(4)] + [
        b'{"file_name": "gone.png", "caption": "x"}', b'{"file_name": "z.png", "caption": "x"}',
        b'{"file_name": "v.svg", "caption": "x"}', b'{"file_name": "0.png", "caption": "dup"}',
        b'{"file_name": "5.png", "caption": "caf\xe9"}', b"not json", b'{"file_name": "6.png"}']
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = [{"image": image_bytes(i), "caption": caption(i)} for i in range(4)] + [
        {"image": None, "caption": "x"}, {"image": image_bytes(9), "caption": None},
        {"image": b"junk", "caption": "x"}, {"image": image_bytes(9), "caption": "   "}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    kw = dict(image_size=8, tokenizer=tok, text_len=8, batch_size=3, dp_rank=0, dp_size=1)
    for path, want in [(str(folder), {"missing_image": 1, "corrupt_image": 1, "unsupported_format": 1,
                                      "duplicate_key": 1, "non_utf8_caption": 1, "malformed_json": 1,
                                      "missing_caption": 1}),
                       (str(tmp_path / "p.parquet"), {"missing_image": 1, "missing_caption": 1, "corrupt_image": 1,
                                                      "empty_caption": 1})]:
        ev = build_eval_loader(DataConfig(val=path, num_workers=0), **kw)
        assert sorted(i for b in ev for i in item_ids(tok, b["tokens"])) == [0, 1, 2, 3]
        assert {k: v for k, v in ev.skip_counts().items() if v} == want


def test_tar_cut_at_a_member_boundary_is_reported(tmp_path, bad):
    """tarfile ends silently at a missing header; the missing end-of-archive blocks give it away."""
    _, tok = bad
    path = write_tar(tmp_path / "cut.tar", [m for i in range(3) for m in ((f"c{i}.png", image_bytes(i)),
                                                                         (f"c{i}.txt", caption(i).encode()))])
    with tarfile.open(path) as tar:
        third = tar.getmember("c2.png").offset  # header of sample 2: cut right before it
    path.write_bytes(path.read_bytes()[:third])
    ev = build_eval_loader(DataConfig(val=str(path), num_workers=0), image_size=8, tokenizer=tok, text_len=8,
                           batch_size=4, dp_rank=0, dp_size=1)
    assert sorted(i for b in ev for i in item_ids(tok, b["tokens"])) == [0, 1]
    assert {k: v for k, v in ev.skip_counts().items() if v} == {"unreadable_shard": 1}
