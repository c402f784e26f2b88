"""The procedural source synthetic:scenes (limoe_ds/data/synthetic.py): deterministic scenes, held-out
compositions that training never draws, captions that say what is drawn, and the source inside the
ordinary pipeline (split, resume mid-block, mixing, config errors, tar writer)."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import make_tokenizer, pair_shards
from limoe_ds.config.data import DataConfig, SyntheticConfig
from limoe_ds.config.errors import ConfigError
from limoe_ds.data import build_eval_loader, build_train_loader
from limoe_ds.data import synthetic as sy
from limoe_ds.data.sources import read_shard, resolve_source
from limoe_ds.data.stream import ReaderId, SampleSpec, WorkerStream, assign, shard_order

ROOT = Path(__file__).resolve().parents[2]
N_DRAWS = 4000


def _draws(split: str, n: int = N_DRAWS, seed: int = 0) -> list[sy.Scene]:
    return [sy.scene(seed, split, i) for i in range(n)]


@pytest.fixture(scope="module")
def train_scenes():
    return _draws("train")


# ---- scenes -------------------------------------------------------------------------------------
def test_same_seed_and_index_same_pixels_and_caption_other_seeds_differ():
    for split in ("train", "val", "heldout"):
        for i in (0, 7, 123_456_789):
            a, b = sy.scene(3, split, i), sy.scene(3, split, i)
            assert a == b and sy.render_array(a).tobytes() == sy.render_array(b).tobytes()
    img = sy.render_array(sy.scene(0, "train", 5), 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    same = sum(sy.scene(0, "train", i).caption == sy.scene(1, "train", i).caption for i in range(200))
    assert same < 20  # another seed, other scenes
    assert sy.render_array(sy.scene(0, "train", 5)).tobytes() != sy.render_array(sy.scene(1, "train", 5)).tobytes()
    assert sy.scene(0, "train", 5) != sy.scene(0, "val", 5)  # val is another stream than train


def test_training_never_draws_a_heldout_composition_and_draws_every_other(train_scenes):
    for split, scenes in (("train", train_scenes), ("val", _draws("val", 2000))):
        pairs, arrangements, counts = Counter(), Counter(), Counter()
        for sc in scenes:
            for o in sc.objects:
                assert not sy.is_heldout_pair(o.colour, o.shape), (split, sc.index, o)
                pairs[(o.colour, o.shape)] += 1
            counts[len(sc.objects)] += 1
            if sc.axis is not None:
                a, b = sc.objects
                assert not sy.is_heldout_arrangement(sc.axis, a.shape, b.shape), (split, sc.index)
                arrangements[(sc.axis, a.shape, b.shape)] += 1
        assert set(pairs) == set(sy.HELDIN_COLOUR_SHAPE)  # all 54 held-in pairs, no other
        assert {c for c, _ in pairs} == set(sy.COLOURS) and {s for _, s in pairs} == set(sy.SHAPES)
        assert all(arrangements[(axis, b, a)] > 0 for axis, a, b in sy.HELDOUT_ARRANGEMENTS)  # the reverses
        assert 0.4 < counts[2] / len(scenes) < 0.6
    assert len(sy.HELDOUT_COLOUR_SHAPE) / 64 == pytest.approx(0.156, abs=0.01)


def test_heldout_scenes_are_made_of_heldout_compositions():
    scenes = _draws("heldout", 200)
    singles = [sc for sc in scenes if sc.axis is None]
    assert len(singles) == 100
    assert {(sc.objects[0].colour, sc.objects[0].shape) for sc in singles} == set(sy.HELDOUT_COLOUR_SHAPE)
    pairs = [sc for sc in scenes if sc.axis is not None]
    assert {(sc.axis, sc.objects[0].shape, sc.objects[1].shape) for sc in pairs} == set(sy.HELDOUT_ARRANGEMENTS)
    for sc in pairs:  # the novelty is the arrangement: each object's colour x shape is a training one
        assert not any(sy.is_heldout_pair(o.colour, o.shape) for o in sc.objects)


def test_two_objects_are_apart_and_their_relation_unambiguous(train_scenes):
    for sc in train_scenes:
        for o in sc.objects:
            assert 0 <= o.x - o.r and o.x + o.r <= 1 and 0 <= o.y - o.r and o.y + o.r <= 1
        if sc.axis is None:
            continue
        a, b = sc.objects
        du, dv = (b.x - a.x, b.y - a.y) if sc.axis == "h" else (b.y - a.y, b.x - a.x)
        assert du > a.r + b.r and abs(dv) <= du / 3 + 1e-9, sc


_REL = {"to the left of": ("h", True), "to the right of": ("h", False), "above": ("v", True),
        "over": ("v", True), "below": ("v", False), "under": ("v", False)}
_NP = (rf"an? (?:({'|'.join(sy.SIZES)}) )?(?:({'|'.join(sy.TEXTURES)}) )?({'|'.join(sy.COLOURS)}) "
       rf"({'|'.join(sy.SHAPES)})")


def _parse(caption: str) -> tuple[list[tuple], str | None, bool | None]:
    """caption -> ([(size, texture, colour, shape) per noun phrase, in order], axis, subject_first)."""
    rel = "|".join(sorted(map(re.escape, _REL), key=len, reverse=True))
    m = re.fullmatch(rf"(?:there is |a picture of )?{_NP}(?: is)? ({rel}) {_NP}", caption)
    if m:
        g = m.groups()
        axis, first = _REL[g[4]]
        return [g[0:4], g[5:9]], axis, first
    m = re.fullmatch(rf"(?:there is |a picture of )?{_NP}(?: on a light background)?", caption)
    assert m, f"caption outside the grammar: {caption!r}"
    return [m.groups()], None, None


def test_captions_parse_back_to_the_attributes(train_scenes):
    for sc in train_scenes[:2000] + _draws("heldout", 200):
        assert len(sc.caption.split()) <= sy.MAX_CAPTION_WORDS, sc.caption
        phrases, axis, subject_first = _parse(sc.caption)
        assert axis == sc.axis, sc.caption
        objects = sc.objects if subject_first in (None, True) else sc.objects[::-1]
        for (size, texture, colour, shape), o in zip(phrases, objects, strict=True):
            assert (colour, shape) == (o.colour, o.shape), sc.caption
            assert size in (None, o.size) and texture in (None, o.texture), sc.caption


def test_captions_fit_the_tiny_models_sixteen_tokens(train_scenes):
    from limoe_ds.data import Tokenizer
    tok = Tokenizer.from_file(str(ROOT / "data" / "mini" / "tokenizer.json"))
    tokens = tok.encode_batch([sc.caption for sc in train_scenes], 32)
    assert int((tokens > 0).sum(1).max()) <= 16  # with the end token: nothing is cut at text_len 16


# ---- the source in the pipeline -------------------------------------------------------------
def _source(train: bool = True, **options):
    cfg = DataConfig(train=[{"path": "synthetic:scenes", "synthetic": options}])
    return resolve_source(cfg.train[0], 0, "data.train[0]", "caption", "image", train=train)


def _keys(src, reader: ReaderId, epoch: int) -> list[str]:
    asg = assign(shard_order(len(src.shards), 5, 0, epoch, True), reader)
    keep = lambda i: i % asg.stride == asg.phase  # noqa: E731
    return [rec.key for s in asg.shards
            for rec in read_shard(src, src.shards[s], 0, keep, count_failure=True, epoch=epoch)]


@pytest.mark.parametrize("dp, workers", [(1, 1), (2, 3), (4, 1), (3, 2)])
def test_ranks_and_workers_read_disjoint_parts_that_together_are_every_scene_and_epochs_are_new(dp, workers):
    src = _source(shards=6, shard_size=10)
    assert src.synthetic.split == "train" and len(src.shards) == 6
    for epoch in (0, 1):
        keys = [k for r in range(dp) for w in range(workers) for k in _keys(src, ReaderId(r, dp, w, workers), epoch)]
        assert len(keys) == len(set(keys)) == 60  # disjoint and complete
        assert sorted(int(k.split("-")[1]) for k in keys) == list(range(60 * epoch, 60 * epoch + 60))  # never repeats


def test_a_val_source_is_one_finite_pass_of_its_own_split():
    tok_dir = ROOT / "data" / "mini" / "tokenizer.json"
    from limoe_ds.data import Tokenizer
    tok = Tokenizer.from_file(str(tok_dir))
    cfg = DataConfig(train=["synthetic:scenes"], val={"path": "synthetic:scenes", "synthetic": {"shards": 2,
                     "shard_size": 15, "image_size": 32}}, num_workers=0)
    val = build_eval_loader(cfg, image_size=16, tokenizer=tok, text_len=16, batch_size=8, dp_rank=0, dp_size=1)
    batches = list(val)
    assert sum(b["images"].shape[0] for b in batches) == 30 and val.skip_counts()["corrupt_image"] == 0
    again = list(val)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, again))
    held = resolve_source(DataConfig(val={"path": "synthetic:scenes", "synthetic": {"split": "heldout"}}).val, 0,
                          "data.val", "caption", "image", train=False)
    assert held.synthetic.split == "heldout"
    assert resolve_source(cfg.val, 0, "data.val", "caption", "image", train=False).synthetic.split == "val"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_mix")
    pair_shards(root / "r", 2, 40)
    return root, make_tokenizer(root, n=80)


def _mixed_cfg(root, weight=1.0):
    return DataConfig(train=[{"path": "synthetic:scenes", "weight": 3 * weight,
                              "synthetic": {"shards": 4, "shard_size": 9, "image_size": 16}},
                             {"path": str(root / "r" / "*.tar"), "weight": weight}],
                      num_workers=0, shuffle_buffer=7, seed=4)


def test_train_state_round_trip_resumes_exactly_in_the_middle_of_a_shuffle_block(real):
    root, tok = real

    def loader():
        return build_train_loader(_mixed_cfg(root), image_size=16, tokenizer=tok, text_len=8, batch_size=5,
                                  dp_rank=0, dp_size=1)
    it = iter(loader())
    ref = [next(it) for _ in range(17)]
    for k in (3, 13):  # 15 and 65 samples (3/4 synthetic): in its first block of 7, and in its second epoch (36)
        first = loader()
        fit = iter(first)
        for _ in range(k):
            next(fit)
        state = json.loads(json.dumps(first.state_dict()))
        pos = state["workers"][0]["sources"][0]
        assert pos["emitted"] % 7 and pos["epoch"] == (k > 3)  # mid-block; the second epoch's scenes
        resumed = loader()
        resumed.load_state_dict(state)
        rit = iter(resumed)
        for want in ref[k:k + 4]:
            got = next(rit)
            assert torch.equal(got["images"], want["images"]) and torch.equal(got["tokens"], want["tokens"])


def test_mixing_with_a_real_source_follows_the_weights(real):
    root, _ = real
    cfg = _mixed_cfg(root)
    sources = [resolve_source(s, i, f"data.train[{i}]", "caption", "image") for i, s in enumerate(cfg.train)]
    spec = SampleSpec(image_size=8, train=True, seed=4, max_pixels=10 ** 7, max_caption_chars=1000,
                      crop_scale=(0.9, 1.0), crop_ratio=(0.75, 4 / 3))
    stream = WorkerStream(sources, ReaderId(0, 1, 0, 1), spec, block_size=7)
    captions = [stream.next_sample()[1] for _ in range(600)]
    real_share = sum(c.startswith("item ") for c in captions) / len(captions)
    assert 0.20 <= real_share <= 0.30  # weights 3 : 1 -> 0.25 (600 draws: std 0.018)


@pytest.mark.parametrize("source, key", [
    ({"path": "synthetic:scenes", "synthetic": {"max_objects": 3}}, "data.train[0].synthetic.max_objects"),
    ({"path": "synthetic:scenes", "synthetic": {"image_size": "64"}}, "data.train[0].synthetic.image_size"),
    ({"path": "synthetic:scenes", "synthetic": {"shape": 1}}, "data.train[0].synthetic.shape"),
    ({"path": "synthetic:scenes", "synthetic": {"split": "heldout"}}, "data.train[0].synthetic.split"),
    ({"path": "synthetic:scenes", "synthetic": {"shards": 0}}, "data.train[0].synthetic.shards"),
    ({"path": "synthetic:shapes"}, "data.train[0].path"),
    ({"path": "synthetic:scenes", "format": "parquet"}, "data.train[0].format"),
    ({"path": "x.tar", "synthetic": {}}, "data.train[0].synthetic"),
    ({"path": "x.tar", "format": "synthetic"}, "data.train[0].path"),
])
def test_a_bad_synthetic_option_is_one_line_naming_the_key(source, key):
    with pytest.raises(ConfigError) as e:
        DataConfig.from_dict({"train": [source]})
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg, msg


def test_the_run_config_accepts_it_without_files_and_resume_treats_it_as_a_path():
    from limoe_ds.checkpoint.resume_check import compare
    from limoe_ds.config import run as run_config
    raw = json.loads((ROOT / "ds_configs" / "tiny.json").read_text())
    sets = [f"tokenizer={ROOT / 'data' / 'mini' / 'tokenizer.json'}", "data.train=synthetic:scenes",
            "data.val={path: 'synthetic:scenes', synthetic: {shards: 2, shard_size: 100}}",
            "eval.zero_shot=[]", "eval.compositional=[synthetic:scenes]"]
    cfg = run_config.resolve(run_config.apply_overrides(raw, sets), world_size=2)  # check_paths on
    assert cfg.data.train[0].synthetic == SyntheticConfig() and cfg.eval.compositional == ["synthetic:scenes"]
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert compare(saved, saved, Path("ckpt")) == []
    again = run_config.resolve(run_config.apply_overrides(raw, sets + ["data.val.synthetic.shard_size=50"]),
                               world_size=2)
    assert any("data.val" in line for line in compare(saved, json.loads(json.dumps(again.to_dict())), Path("c")))
    other = run_config.resolve(run_config.apply_overrides(raw, sets + ["data.train={path: 'synthetic:scenes', "
                                                                       "synthetic: {seed: 1}}"]), world_size=2)
    with pytest.raises(ConfigError, match=r"^--resume: data.train\[0\].synthetic is"):
        compare(saved, json.loads(json.dumps(other.to_dict())), Path("c"))
    with pytest.raises(ConfigError, match=r"^eval.compositional\[0\]: "):
        run_config.resolve(run_config.apply_overrides(raw, sets + ["eval.compositional=[data/mini]"]), world_size=2)


# ---- the tar writer -----------------------------------------------------------------------------
def test_write_shard_is_byte_identical_on_rebuild_and_reads_back(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert sy.write_shard(str(a), split="val", start=10, count=12, seed=0, image_size=32) == 12
    sy.write_shard(str(b), split="val", start=10, count=12, seed=0, image_size=32)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.uname == "" for m in members)
        metas = [json.loads(tar.extractfile(m).read()) for m in members if m.name.endswith(".json")]
    assert [m["index"] for m in metas] == list(range(10, 22))
    for m in metas:
        sc = sy.scene(0, "val", m["index"])
        assert m["caption"] == sc.caption and m["source"] == "synthetic" and m["objects"] == sc.attributes()["objects"]
    from limoe_ds.data import Tokenizer
    tok = Tokenizer.from_file(str(ROOT / "data" / "mini" / "tokenizer.json"))
    val = build_eval_loader(DataConfig(val=str(a), num_workers=0), image_size=32, tokenizer=tok, text_len=16,
                            batch_size=64, dp_rank=0, dp_size=1)
    batch, = list(val)
    direct = [sy.render_array(sy.scene(0, "val", i), 32) for i in range(10, 22)]
    assert torch.equal(batch["images"], torch.from_numpy(np.stack(direct)).permute(0, 3, 1, 2).float() / 127.5 - 1)
    sy.write_shard(str(b), split="heldout", start=0, count=4)
    with tarfile.open(b) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert tuple(metas[0]["objects"][0][k] for k in ("colour", "shape")) in sy.HELDOUT_COLOUR_SHAPE
    with pytest.raises(ValueError, match="^split: "):
        sy.write_shard(str(b), split="train", start=0, count=1)
