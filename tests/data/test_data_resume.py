"""Exact resume: stop at batch k, save, restore into a fresh loader, and the next batches are the ones
an uninterrupted run produces (images, after their random crops, and tokens), with 0 and 2 workers."""

import json

import pytest
import torch

from data_helpers import item_ids, make_tokenizer, pair_shards, write_tar
from limoe_ds.data import DataConfig, build_train_loader
from limoe_ds.data.loader import epoch_start_state

BATCH, TOTAL = 5, 24
WORKERS = pytest.mark.integration  # num_workers > 0 starts data-loader worker processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    pair_shards(root / "a", 3, 11)                   # 33 samples: epochs end mid-batch
    pair_shards(root / "b", 2, 6, start=100)         # a second, smaller source
    write_tar(root / "b" / "shard-bad.tar", [("x.png", b"broken"), ("x.txt", b"item 999 here")])
    return root, make_tokenizer(root, n=120)


def cfg_for(root, workers, mixed):
    train = [str(root / "a" / "*.tar")]
    if mixed:
        train.append({"path": str(root / "b" / "*.tar"), "weight": 0.5})
    return DataConfig(train=train, num_workers=workers, shuffle_buffer=7, seed=11)


def loader(cfg, tok):
    return build_train_loader(cfg, image_size=12, tokenizer=tok, text_len=8, batch_size=BATCH, dp_rank=0, dp_size=1)


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers, mixed", [(0, False), pytest.param(2, False, marks=WORKERS), (0, True),
                                            pytest.param(2, True, marks=WORKERS)])
def test_resume_matches_uninterrupted_run(data, workers, mixed):
    root, tok = data
    cfg = cfg_for(root, workers, mixed)
    ref_loader = loader(cfg, tok)
    it = iter(ref_loader)
    ref, ref_counts = [], []
    for _ in range(TOTAL):
        ref.append(next(it))
        ref_counts.append(ref_loader.skip_counts())
    for k in (3, 14):  # 14 * 5 = 70 samples: past the end of the second epoch of source a
        first = loader(cfg, tok)
        take(iter(first), k)
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint holds plain JSON
        resumed = loader(cfg, tok)
        resumed.load_state_dict(state)
        got = take(iter(resumed), 5)
        for a, b in zip(got, ref[k:k + 5]):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
        assert resumed.skip_counts() == ref_counts[k + 4]
        assert resumed.batches == k + 5
    if mixed:
        assert ref_counts[-1]["corrupt_image"] >= 1  # the bad shard was reached and counted


def test_resume_twice_and_across_iter_calls(data):
    root, tok = data
    cfg = cfg_for(root, 0, True)
    ref = take(iter(loader(cfg, tok)), 12)
    a = loader(cfg, tok)
    got = take(iter(a), 4) + take(iter(a), 2)  # a second iter() continues where the first stopped
    b = loader(cfg, tok)
    b.load_state_dict(a.state_dict())
    got += take(iter(b), 3)
    c = loader(cfg, tok)
    c.load_state_dict(b.state_dict())
    got += take(iter(c), 3)
    assert all(torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["images"], y["images"])
               for x, y in zip(got, ref))


@pytest.mark.parametrize("change, key", [({"num_workers": 2}, "num_workers"), ({"seed": 12}, "seed"),
                                         ({"shuffle_buffer": 8}, "shuffle_buffer")])
def test_incompatible_state_is_refused(data, change, key):
    root, tok = data
    cfg = cfg_for(root, 0, False)
    state = loader(cfg, tok).state_dict()
    other = cfg_for(root, 0, False)
    for k, v in change.items():
        setattr(other, k, v)
    with pytest.raises(ValueError, match=f"data state: {key} was"):
        loader(other, tok).load_state_dict(state)


def _dp_loader(cfg, tok, rank, size):
    return build_train_loader(cfg, image_size=12, tokenizer=tok, text_len=8, batch_size=BATCH, dp_rank=rank,
                              dp_size=size)


@pytest.mark.parametrize("batches, next_epoch", [(3, 1), (4, 2)])
def test_a_data_parallel_size_change_resumes_at_the_next_epoch_and_reads_it_whole(data, batches, next_epoch):
    """Two ranks read source a (33 samples, 16-17 each): after 3 batches of 5 both are inside epoch
    0, after 4 one has begun epoch 1. The position moved to three ranks (a reshard 2 -> 3) starts
    every rank at the next epoch no reader had begun; together they read that epoch whole, each
    sample once, with the skip counts kept once (on new rank 0)."""
    root, tok = data
    cfg = cfg_for(root, 0, False)
    states = []
    for r in range(2):
        old = _dp_loader(cfg, tok, r, 2)
        take(iter(old), batches)
        states.append(json.loads(json.dumps(old.state_dict())))
    moved = [epoch_start_state(states, d) for d in range(3)]
    assert [m["next_epochs"] for m in moved] == [[next_epoch]] * 3
    seen = []
    for d in range(3):
        new = _dp_loader(cfg, tok, d, 3)
        new.load_state_dict(json.loads(json.dumps(moved[d])))
        ids = [i for b in take(iter(new), 3) for i in item_ids(tok, b["tokens"])]
        seen += ids[:11]  # 33 samples over 3 ranks: the first 11 of each rank are the new epoch
        assert new.batches == 3
    assert sorted(seen) == list(range(33))
    # and the new epoch is not a replay of epoch 0 (another shuffle): rank 0's order differs
    fresh = _dp_loader(cfg, tok, 0, 3)
    assert item_ids(tok, take(iter(fresh), 1)[0]["tokens"]) != seen[:BATCH]
    assert moved[1]["counts"] == moved[2]["counts"] == {k: 0 for k in moved[1]["counts"]}


def test_epoch_start_state_refuses_other_data(data):
    root, tok = data
    old = _dp_loader(cfg_for(root, 0, False), tok, 0, 1)
    take(iter(old), 1)
    moved = epoch_start_state([old.state_dict()], 0)
    with pytest.raises(ValueError, match="data state: shards was"):
        _dp_loader(cfg_for(root, 0, True), tok, 0, 2).load_state_dict(moved)
    with pytest.raises(ValueError, match="every data-parallel rank"):
        epoch_start_state([{"version": 1}], 0)
