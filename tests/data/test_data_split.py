"""Rank / worker split: disjoint and complete, whole shards when the counts divide."""

import itertools

import pytest
import torch

from data_helpers import item_ids, make_tokenizer, pair_shards
from limoe_ds.data import DataConfig, build_eval_loader, build_train_loader
from limoe_ds.data.stream import ReaderId, assign

WORKERS = pytest.mark.integration  # num_workers > 0 starts data-loader worker processes


def owners(num_shards: int, records: int, dp: int, workers: int) -> dict:
    """(shard, record) -> list of readers that read it."""
    out = {(s, i): [] for s in range(num_shards) for i in range(records)}
    order = list(range(num_shards))[::-1]  # any epoch order
    for r, w in itertools.product(range(dp), range(workers)):
        a = assign(order, ReaderId(r, dp, w, workers))
        for s in a.shards:
            for i in range(records):
                if i % a.stride == a.phase:
                    out[(s, i)].append((r, w))
    return out


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("dp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_assign_is_disjoint_and_complete(num_shards, dp, workers):
    got = owners(num_shards, 24, dp, workers)
    assert all(len(v) == 1 for v in got.values())  # every record read by exactly one reader


def test_assign_golden():
    order = [3, 1, 7, 5, 0, 2, 6, 4]
    # 8 shards over 4 ranks x 2 workers = 8 readers: one whole shard each, no striding
    a = assign(order, ReaderId(1, 4, 0, 2))
    assert (a.shards, a.stride, a.phase) == ((1,), 1, 0)
    # rank 1 of 4 takes order[1::4] = [order[1], order[5]] = [1, 2]; its worker 1 takes the second
    a = assign(order, ReaderId(1, 4, 1, 2))
    assert (a.shards, a.stride, a.phase) == ((2,), 1, 0)
    # 8 shards over 3 ranks: gcd 1, so every rank reads all shards, keeping record i with i % 3 == rank
    a = assign(order, ReaderId(2, 3, 0, 1))
    assert (a.shards, a.stride, a.phase) == (tuple(order), 3, 2)
    # 3 shards, 2 ranks x 2 workers: rank stride 2; the rank's 3 shards over 2 workers: stride 2 again
    # rank 1 worker 1: phase = p1 + s1 * p2 = 1 + 2 * 1 = 3 of stride 4
    a = assign([0, 1, 2], ReaderId(1, 2, 1, 2))
    assert (a.shards, a.stride, a.phase) == ((0, 1, 2), 4, 3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    pair_shards(root / "even", 4, 10)     # 40 samples, 4 shards
    pair_shards(root / "odd", 3, 11)      # 33 samples, 3 shards
    return root, make_tokenizer(root)


@pytest.mark.parametrize("sub, total", [("even", 40), ("odd", 33)])
@pytest.mark.parametrize("dp, workers", [(2, 0), (4, 0), pytest.param(2, 2, marks=WORKERS)])
def test_eval_ranks_disjoint_and_complete(shards, sub, total, dp, workers):
    root, tok = shards
    cfg = DataConfig(val=str(root / sub / "*.tar"), num_workers=workers)
    per_rank = []
    for r in range(dp):
        ev = build_eval_loader(cfg, image_size=8, tokenizer=tok, text_len=8, batch_size=4, dp_rank=r, dp_size=dp)
        per_rank.append([i for b in ev for i in item_ids(tok, b["tokens"])])
    flat = [i for ids in per_rank for i in ids]
    assert sorted(flat) == list(range(total))


@pytest.mark.parametrize("dp", [2, 4])
def test_train_first_epoch_split_by_whole_shards(shards, dp):
    root, tok = shards
    cfg = DataConfig(train=[str(root / "even" / "*.tar")], num_workers=0, shuffle_buffer=7, seed=3)
    per_rank = []
    for r in range(dp):
        tr = build_train_loader(cfg, image_size=8, tokenizer=tok, text_len=8, batch_size=5, dp_rank=r, dp_size=dp)
        ids = [i for _, b in zip(range(40 // dp // 5), tr) for i in item_ids(tok, b["tokens"])]
        per_rank.append(ids)
        assert {i // 10 for i in ids} and len({i // 10 for i in ids}) == 4 // dp  # whole shards of 10
    assert sorted(i for ids in per_rank for i in ids) == list(range(40))


def test_tensor_parallel_peers_read_the_same(shards):
    root, tok = shards
    cfg = DataConfig(train=[str(root / "odd" / "*.tar")], num_workers=0, shuffle_buffer=5)
    runs = []
    for _ in range(2):  # two TP peers of dp rank 1 of 2: same arguments, same batches
        tr = build_train_loader(cfg, image_size=8, tokenizer=tok, text_len=8, batch_size=4, dp_rank=1, dp_size=2)
        runs.append([b["tokens"] for _, b in zip(range(6), tr)])
    assert all((a == b).all() for a, b in zip(*runs))


def test_mixing_follows_weights_and_shuffles(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    pair_shards(root / "a", 2, 100)              # ids 0..199
    pair_shards(root / "b", 1, 100, start=200)   # ids 200..299
    tok = make_tokenizer(root, n=300)
    cfg = DataConfig(train=[{"path": str(root / "a" / "*.tar"), "weight": 3}, str(root / "b" / "*.tar")],
                     num_workers=0, shuffle_buffer=50)
    tr = build_train_loader(cfg, image_size=8, tokenizer=tok, text_len=8, batch_size=20, dp_rank=0, dp_size=1)
    ids = [i for _, b in zip(range(20), tr) for i in item_ids(tok, b["tokens"])]
    share_a = sum(i < 200 for i in ids) / len(ids)
    assert 0.70 <= share_a <= 0.80  # weight 3 : 1 -> 0.75 (400 draws: std 0.022)
    a_ids = [i for i in ids if i < 200]
    assert a_ids[:50] != sorted(a_ids[:50])  # shuffled
    assert sorted(a_ids[:200]) == list(range(200))  # the first epoch of source a: each sample once
    assert a_ids[200:] != a_ids[: len(a_ids) - 200]  # the next epoch comes in another order


@pytest.mark.integration  # data-loader worker processes
def test_zero_and_one_worker_are_the_same_stream(shards):
    root, tok = shards
    runs = []
    for workers in (0, 1):
        cfg = DataConfig(train=[str(root / "odd" / "*.tar")], num_workers=workers, shuffle_buffer=5)
        tr = build_train_loader(cfg, image_size=8, tokenizer=tok, text_len=8, batch_size=4, dp_rank=0, dp_size=1)
        runs.append([b for _, b in zip(range(5), tr)])
    assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"]) for a, b in zip(*runs))
