"""Each input format reads every sample exactly once (eval) and gives correctly shaped batches (train)."""

import csv
import io
import json
import tarfile

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_helpers import caption, image_bytes, item_ids, make_tokenizer, pair_shards
from limoe_ds.data import DataConfig, build_eval_loader, build_train_loader

N = 30
WORKERS = pytest.mark.integration  # num_workers > 0 starts data-loader worker processes


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def read_all(tok, source, num_workers=0):
    cfg = DataConfig(train=[source], val=source, num_workers=num_workers, shuffle_buffer=8)
    ev = build_eval_loader(cfg, image_size=16, tokenizer=tok, text_len=8, batch_size=7, dp_rank=0, dp_size=1)
    batches = list(ev)
    tr = build_train_loader(cfg, image_size=24, tokenizer=tok, text_len=8, batch_size=7, dp_rank=0, dp_size=1)
    for _, b in zip(range(2), tr):
        assert b["images"].shape == (7, 3, 24, 24) and b["tokens"].shape == (7, 8)
    # eval: full batches of 7, then the partial last one (30 = 4 * 7 + 2); with two workers reading
    # 15 samples each: 7, 7, then a partial 1 from each worker
    sizes = [7, 7, 7, 7, 2] if num_workers == 0 else [7, 7, 7, 7, 1, 1]
    assert [b["images"].shape[0] for b in batches] == sizes
    assert all(b["images"].shape[1:] == (3, 16, 16) for b in batches)
    assert sum(ev.skip_counts().values()) == 0
    return [i for b in batches for i in item_ids(tok, b["tokens"])]


def test_webdataset_txt_json_and_mixed_extensions(tmp_path, tok):
    pair_shards(tmp_path, 2, N // 2, json_every=4)
    assert read_all(tok, str(tmp_path / "shard-{000..001}.tar")) == list(range(N))


def test_webdataset_gzipped_and_image_types(tmp_path, tok):
    fmts = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(N):
            ext, fmt = fmts[i % 3]
            for name, data in ((f"s{i}.{ext}", image_bytes(i, fmt=fmt)), (f"s{i}.txt", caption(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert read_all(tok, str(path)) == list(range(N))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=WORKERS)])
def test_parquet_bytes_column(tmp_path, tok, workers):
    for s in range(2):
        rows = [{"image": image_bytes(i), "caption": caption(i), "key": f"k{i}"} for i in range(s * 15, s * 15 + 15)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"p{s}.parquet", row_group_size=4)
    ids = read_all(tok, str(tmp_path / "*.parquet"), num_workers=workers)
    # two workers each read one shard and take turns: batches alternate between the shards
    assert sorted(ids) == list(range(N))


def test_parquet_and_arrow_written_by_datasets_with_image_feature(tmp_path, tok):
    feats = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": image_bytes(i), "path": None} for i in range(N)],
                                     "text": [caption(i) for i in range(N)]}, features=feats)
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    src = {"path": str(tmp_path / "hf.parquet"), "image_key": "img", "caption_key": "text"}
    assert read_all(tok, src) == list(range(N))
    ds.save_to_disk(str(tmp_path / "saved"))
    src = {"path": str(tmp_path / "saved" / "*.arrow"), "image_key": "img", "caption_key": "text"}
    assert read_all(tok, src) == list(range(N))


def test_image_folder_jsonl_and_csv(tmp_path, tok):
    for sub, ext in (("j", "jsonl"), ("c", "csv")):
        folder = tmp_path / sub
        folder.mkdir()
        for i in range(N):
            (folder / f"img{i}.png").write_bytes(image_bytes(i))
        if ext == "jsonl":
            lines = [json.dumps({"file_name": f"img{i}.png", "caption": caption(i)}) for i in range(N)]
            (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        else:
            with open(folder / "captions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file_name", "caption"])
                w.writerows([[f"img{i}.png", caption(i)] for i in range(N)])
        assert read_all(tok, str(folder)) == list(range(N))
