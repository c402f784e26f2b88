"""Evaluation metrics on constructed embeddings (answers worked by hand) and the distributed pass."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from limoe_ds.eval import metrics

from dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"


def test_recall_at_k_with_ties_counted_against():
    # query 0: target 0.9 is the best            -> rank 0
    # query 1: 0.8 beats the target 0.3          -> rank 1
    # query 2: all three tie at 0.7              -> rank 2 (ties count against the model)
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.7, 0.7]])
    target = torch.arange(3)
    assert metrics.target_ranks(scores, target).tolist() == [0, 1, 2]
    assert metrics.recall_at_k(scores, target, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_retrieval_both_directions():
    # Images e0, e1, e2; captions: caption 0 = e0, caption 1 = e2, caption 2 = e1 (1 and 2 swapped).
    img = torch.eye(3)
    txt = torch.eye(3)[[0, 2, 1]]
    r = metrics.retrieval_metrics(img, txt, ks=(1, 5))
    # i2t: image 0 finds caption 0 (rank 0). Image 1 scores captions [0, 0, 1]: its caption 1 scores 0,
    # beaten by caption 2 and tied with caption 0 (ties count against) -> rank 2; image 2 likewise.
    assert r["i2t/R@1"] == pytest.approx(1 / 3) and r["i2t/R@5"] == 1.0
    assert r["t2i/R@1"] == pytest.approx(1 / 3) and r["t2i/R@5"] == 1.0
    perfect = metrics.retrieval_metrics(img, img, ks=(1,))
    assert perfect == {"i2t/R@1": 1.0, "t2i/R@1": 1.0}


def test_zero_shot_classifier_is_the_renormalised_mean_of_normalised_prompts():
    # class 0 prompts [2, 0] and [0, 1] -> normalised [1,0], [0,1] -> mean [.5,.5] -> [.7071, .7071]
    # class 1 prompts [-1, 0] twice -> [-1, 0]
    prompts = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [-3.0, 0.0]]])
    w = metrics.zero_shot_classifier(prompts)
    torch.testing.assert_close(w, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [-1.0, 0.0]]))
    images = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    # image 0: scores [.707, -1] -> class 0, correct. image 1: [.141, .6] -> class 1, correct.
    # image 2 (all-zero): scores tie at 0 -> counted wrong at top-1, right at top-2.
    correct = metrics.topk_correct(images, w, labels, ks=(1, 2))
    assert correct[1].tolist() == [True, True, False]
    assert correct[2].tolist() == [True, True, True]


def test_several_captions_per_image_ranks_worked_by_hand():
    # 3 images; captions 0-1 describe image 0, 2-4 image 1, 5 image 2.
    image_of_caption = torch.tensor([0, 0, 1, 1, 1, 2])
    scores = torch.tensor([[0.1, 0.9, 0.9, 0.2, 0.3, 0.0],
                           [0.8, 0.1, 0.3, 0.5, 0.7, 0.5],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    # image->text: the best own caption against the OTHER images' captions, ties against.
    # image 0: best own 0.9 (caption 1); caption 2 (image 1's) ties it -> rank 1
    # image 1: best own 0.7 (caption 4); caption 0 scores 0.8 -> rank 1
    # image 2: own 0.5; no other caption reaches 0.5 -> rank 0
    assert metrics.image_to_text_ranks(scores, image_of_caption).tolist() == [1, 1, 0]
    # text->image: one correct image per caption (the columns above), ties against.
    # c0 [.1 .8 0] -> 1; c1 [.9 .1 .1] -> 0; c2 [.9 .3 .2] -> 1; c3 [.2 .5 .3] -> 0; c4 [.3 .7 .4] -> 0;
    # c5 [0 .5 .5]: image 1 ties its image 2 -> 1
    assert metrics.target_ranks(scores.t(), image_of_caption).tolist() == [1, 0, 1, 0, 0, 1]
    # An image's own captions never compete with each other: two tied at the top -> rank 0.
    assert metrics.image_to_text_ranks(torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.0, 0.9]]),
                                       torch.tensor([0, 0, 1])).tolist() == [0, 0]


def test_several_captions_per_image_recall_equals_a_python_loop():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 4, generator=gen), dim=-1)
    image_of_caption = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6, 6, 6])
    txt = torch.nn.functional.normalize(img[image_of_caption] + 0.8 * torch.randn(14, 4, generator=gen), dim=-1)
    txt[3] = txt[1]  # a tie across images
    scores = (img @ txt.t()).tolist()
    ks = (1, 2, 5)
    i2t = {k: 0 for k in ks}
    t2i = {k: 0 for k in ks}
    for i, row in enumerate(scores):  # slow reference: "any own caption within the top k", ties against
        own = [m for m, j in enumerate(image_of_caption.tolist()) if j == i]
        best = max(row[m] for m in own)
        rank = sum(1 for m, s in enumerate(row) if m not in own and s >= best)
        for k in ks:
            i2t[k] += rank < k
    for m, i in enumerate(image_of_caption.tolist()):
        col = [scores[j][m] for j in range(len(scores))]
        rank = sum(1 for j, s in enumerate(col) if j != i and s >= col[i])
        for k in ks:
            t2i[k] += rank < k
    want = {**{f"i2t/R@{k}": v / 7 for k, v in i2t.items()}, **{f"t2i/R@{k}": v / 14 for k, v in t2i.items()}}
    for chunk in (1, 3, 1024):  # chunked scoring equals one block
        got = metrics.retrieval_metrics(img, txt, image_of_caption_M=image_of_caption, ks=ks, chunk=chunk)
        assert got == pytest.approx(want), chunk


# ---- benchmarks from the user's own copies (class folders, Karpathy JSON) ---------------------------
def _png(path: Path, seed: int, size=(40, 36)) -> None:
    import numpy as np
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_class_tree(root: Path) -> dict[str, str]:
    """3 class folders x 2 PNGs (one in a subfolder), a corrupt PNG and a non-image file."""
    for c, wnid in enumerate(["n003", "n001", "n002"]):  # label order = SORTED folder names
        _png(root / "val" / wnid / "a.png", 10 * c)
        _png(root / "val" / wnid / "sub" / "b.png", 10 * c + 1)
    (root / "val" / "n002" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "val" / "n001" / "README.txt").write_text("not an image: ignored")
    (root / "classnames.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    (root / "templates.txt").write_text("a photo of a {}.\na drawing of the {}.\n")
    return {"tree": str(root / "val"), "classnames": str(root / "classnames.txt"),
            "templates": str(root / "templates.txt")}


def make_karpathy(root: Path) -> str:
    """Karpathy JSON: 4 readable test images (2-3 captions each), a corrupt and a missing one, one train image."""
    captions = [["a red square.", "something red"], ["two dogs on grass", "dogs", "a pair of dogs playing"],
                ["a city at night", "lights of a city"], ["a bowl of soup.", "soup in a bowl"]]
    images = []
    for i, caps in enumerate(captions):
        _png(root / "imgs" / "val2014" / f"{i}.png", 100 + i)
        images.append({"filepath": "val2014", "filename": f"{i}.png", "split": "test",
                       "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
    (root / "imgs" / "val2014" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    images.insert(2, {"filepath": "val2014", "filename": "bad.jpg", "split": "test",
                      "sentences": [{"raw": "unreadable"}, {"raw": "also unreadable"}]})
    images.append({"filepath": "val2014", "filename": "gone.png", "split": "test", "sentences": [{"raw": "absent"}]})
    _png(root / "imgs" / "train2014" / "t.png", 7)
    images.append({"filepath": "train2014", "filename": "t.png", "split": "train", "sentences": [{"raw": "train"}]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(path)


@pytest.fixture
def bench(tmp_path):
    return {**make_class_tree(tmp_path / "inet"), "karpathy": make_karpathy(tmp_path / "coco"),
            "images": str(tmp_path / "coco" / "imgs")}


def _specs(b: dict) -> list[str]:
    return [f"imagenet={b['tree']},classnames={b['classnames']},templates={b['templates']}",
            f"coco={b['karpathy']},images={b['images']},split=test"]


def test_benchmark_readers_index_what_the_formats_say(bench):
    from limoe_ds.data.benchmarks import CaptionSet, ClassFolderSet, load_benchmark
    classes, coco = (load_benchmark(s, threads=2) for s in _specs(bench))  # decoded by 2 threads, in order
    assert isinstance(classes, ClassFolderSet) and isinstance(coco, CaptionSet)
    assert classes.name == "imagenet" and coco.name == "coco"
    # sorted folders n001, n002, n003 -> labels 0, 1, 2; the .txt is not an image; the broken PNG is listed
    assert [(Path(p).relative_to(bench["tree"]).as_posix(), y) for p, y in classes.files] == [
        ("n001/a.png", 0), ("n001/sub/b.png", 0), ("n002/a.png", 1), ("n002/broken.png", 1), ("n002/sub/b.png", 1),
        ("n003/a.png", 2), ("n003/sub/b.png", 2)]
    assert classes.prompts()[2] == ["a photo of a great white shark.", "a drawing of the great white shark."]
    assert len(coco.images) == 6 and coco.images[2].endswith("val2014/bad.jpg")  # test split only, file order
    assert coco.image_of_caption == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert coco.captions[2] == "two dogs on grass"
    batches = list(coco.iter_batches(image_size=16, batch_size=4))
    assert [ids.tolist() for _, ids in batches] == [[0, 1, 3], [4]]  # 2 (corrupt) and 5 (missing) skipped
    assert batches[0][0].shape == (3, 3, 16, 16) and -1 <= batches[0][0].min() and batches[0][0].max() <= 1
    assert coco.skip_counts["corrupt_image"] == 1 and coco.skip_counts["missing_image"] == 1
    # ranks read contiguous, disjoint shares that cover the set
    shares = [[i for _, ids in coco.iter_batches(image_size=16, batch_size=1, dp_rank=r, dp_size=2)
               for i in ids.tolist()] for r in range(2)]
    assert shares == [[0, 1], [3, 4]]


def test_benchmark_paths_may_contain_commas(bench, tmp_path):
    """--data splits options only at a comma followed by KEY=: '/data/val,2024' is a path."""
    import shutil
    from limoe_ds.data.benchmarks import load_benchmark
    tree = shutil.copytree(bench["tree"], tmp_path / "val,2024")
    names = shutil.copy(bench["classnames"], tmp_path / "names,v2.txt")
    classes = load_benchmark(f"imagenet={tree},classnames={names},templates={bench['templates']},name=in,1k")
    assert classes.name == "in,1k" and len(classes.files) == 7 and classes.root == str(tree)


def _bad_specs(b: dict, tmp: Path) -> list[tuple[str, str]]:
    (tmp / "two_names.txt").write_text("tench\ngoldfish\n")
    (tmp / "bad_templates.txt").write_text("a photo of a {}.\nno slot here\n")
    tree, names, k = b["tree"], b["classnames"], b["karpathy"]
    return [
        (f"imagenet={tree},templates={b['templates']}", "give classnames=FILE"),
        (f"imagenet={tree},classnames={tmp / 'nope.txt'}", f"classnames: '{tmp / 'nope.txt'}' does not exist"),
        (f"imagenet={tree},classnames={tmp / 'two_names.txt'}", "2 names in"),
        (f"imagenet={tree},classnames={names},templates={tmp / 'bad_templates.txt'}", "'no slot here' has no '{}'"),
        (f"imagenet={tmp / 'no_tree'},classnames={names}", "is not a directory"),
        (f"coco={k},images={b['images']},split=testt", "no images in split 'testt'"),
        (f"coco={k},images={tmp / 'no_images'}", "image directory"),
        (f"coco={tmp / 'none.json'}", "does not exist"),
        (f"coco={names}", "is not JSON"),
        (f"cifar={tree}", "unknown kind 'cifar'"),
        (f"coco={k},splt=test", "unknown option 'splt'"),
        ("coco", "expected KIND=PATH"),
    ]


def test_benchmark_bad_input_is_a_clear_error(bench, tmp_path, monkeypatch):
    from limoe_ds.data import benchmarks
    from limoe_ds.data.errors import DataError
    for spec, message in _bad_specs(bench, tmp_path):
        with pytest.raises(DataError) as e:
            benchmarks.load_benchmark(spec)
        assert message in str(e.value), (spec, str(e.value))
    # No templates file and no open_clip to take the 80 CLIP templates from: say how to get either.
    monkeypatch.setattr(benchmarks, "clip_templates", lambda: None)
    with pytest.raises(DataError, match="give templates=FILE"):
        benchmarks.load_benchmark(f"imagenet={bench['tree']},classnames={bench['classnames']}")


def test_default_templates_come_from_an_installed_open_clip(tmp_path, monkeypatch):
    from limoe_ds.data import benchmarks
    pkg = tmp_path / "site" / "open_clip"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "zero_shot_metadata.py").write_text(
        "OPENAI_IMAGENET_TEMPLATES = (\n    lambda c: f'a bad photo of a {c}.',\n"
        "    lambda c: f'itap of my {c}.',\n)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert benchmarks.clip_templates() == ["a bad photo of a {}.", "itap of my {}."]


def _bench_worker(rank, world, specs):
    """Both benchmarks on 1 or 2 ranks (expert-parallel = world), one image / caption per batch so
    the ranks run different numbers of real batches (lockstep dummies), plus a recorded val pass."""
    from limoe_ds.data import DataConfig, Tokenizer, build_eval_loader
    from limoe_ds.data.benchmarks import load_benchmark
    from limoe_ds.train.engine import build_engine
    from limoe_ds.eval.run import RoutingRecord, caption_retrieval, embed_pairs, zero_shot
    from limoe_ds.model import build_model
    tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    model = build_model("tiny", ep_size=world, ep_rank=rank, seed=3)
    dropless = {"dropless": None}
    if world > 1:
        ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        model = build_engine(model, ds)[0].module
    model.eval()
    classes, coco = (load_benchmark(s) for s in specs)
    zs = zero_shot(model, classes, tok, dp_rank=rank, dp_size=world, batch_size=1, modes=dropless)["dropless"]
    ret = caption_retrieval(model, coco, tok, dp_rank=rank, dp_size=world, batch_size=1, modes=dropless)["dropless"]
    record = RoutingRecord(sample_images=3 if rank == 0 else 0)
    val = build_eval_loader(DataConfig(val=str(MINI / "val"), num_workers=0), image_size=32, tokenizer=tok,
                            text_len=16, batch_size=100, dp_rank=rank, dp_size=world)
    embed_pairs(model, val, max_batches=2, record=record, modes=dropless)
    return zs, ret, record.summary(), None if record.images_BCHW is None else tuple(record.images_BCHW.shape)


@pytest.mark.integration  # gloo ranks (run_ranks)
def test_benchmarks_on_two_ranks_equal_one_rank_and_a_slow_reference(bench):
    specs = _specs(bench)
    one = run_ranks(_bench_worker, 1, specs)[0]
    two = run_ranks(_bench_worker, 2, specs)
    zs, ret, summary, shape = one
    # known counts: 6 readable class images of 7, 4 readable test images of 6 with 9 captions between them
    assert zs["images"] == 6 and zs["skipped_images"] == 1 and zs["chance_top1"] == pytest.approx(1 / 3)
    assert set(zs) == {"top1", "top5", "images", "skipped_images", "chance_top1"}  # no seen/unseen split
    assert zs["top5"] == 1.0  # 3 classes: always within the top 5
    assert ret["images"] == 4 and ret["captions"] == 9 and ret["skipped_images"] == 2
    for r in range(2):
        assert two[r][0] == pytest.approx(zs) and two[r][1] == pytest.approx(ret)
        assert json.dumps(two[r][2]) == json.dumps(two[0][2])  # counts summed over ranks: the same everywhere
    assert shape == (3, 3, 32, 32) and two[0][3] == (3, 3, 32, 32) and two[1][3] is None
    # 2 val batches of 100 pairs per rank, every patch routed (dropless)
    assert summary["layer1"]["image"]["routed_tokens"] == 200 * 16
    assert two[0][2]["layer1"]["image"]["routed_tokens"] == 2 * 200 * 16
    # slow reference on one process: embed every readable image and caption alone, rank by loops
    from limoe_ds.data import Tokenizer
    from limoe_ds.data.benchmarks import load_benchmark, load_image
    from limoe_ds.data.image import to_tensor
    from limoe_ds.model import build_model
    tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    model = build_model("tiny", seed=3).eval()
    coco = load_benchmark(specs[1])
    good = [0, 1, 3, 4]
    with torch.no_grad():
        img = torch.cat([model.encode_image(to_tensor([load_image(coco.images[i], 32, 10 ** 7)])) for i in good])
        kept = [m for m, i in enumerate(coco.image_of_caption) if i in good]
        txt = torch.cat([model.encode_text(tok.encode_batch([coco.captions[m]], 16)) for m in kept])
    scores = (img @ txt.t()).tolist()
    owner = [good.index(coco.image_of_caption[m]) for m in kept]
    i2t_ranks = [sum(1 for m, s in enumerate(row) if owner[m] != i and s >= max(row[m] for m in range(len(kept))
                                                                               if owner[m] == i))
                 for i, row in enumerate(scores)]
    t2i_ranks = [sum(1 for j in range(len(good)) if j != owner[m] and scores[j][m] >= scores[owner[m]][m])
                 for m in range(len(kept))]
    for k in (1, 5, 10):
        assert ret[f"i2t/R@{k}"] == pytest.approx(sum(r < k for r in i2t_ranks) / 4), k
        assert ret[f"t2i/R@{k}"] == pytest.approx(sum(r < k for r in t2i_ranks) / 9), k


def test_one_walk_serves_both_routings_like_two_separate_passes(bench, monkeypatch):
    """evaluate() forwards every batch under both capacity modes in one walk over the data: each
    benchmark image is decoded once, and every number equals that of a separate pass per mode (the
    capacity factor is lowered to 0.5 so that the training-capacity routing drops tokens and differs)."""
    from limoe_ds.data import DataConfig, Tokenizer, benchmarks, build_eval_loader
    from limoe_ds.eval.run import caption_retrieval, embed_pairs, evaluate, zero_shot
    from limoe_ds.model import build_model
    tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    model = build_model("tiny", seed=3).eval()
    model.cfg.moe.capacity_factor = 0.5
    classes, coco = (benchmarks.load_benchmark(s) for s in _specs(bench))

    def val():
        return build_eval_loader(DataConfig(val=str(MINI / "val"), num_workers=0), image_size=32, tokenizer=tok,
                                 text_len=16, batch_size=100, dp_rank=0, dp_size=1)

    decoded = []
    real_load = benchmarks.load_image
    monkeypatch.setattr(benchmarks, "load_image", lambda path, *a: decoded.append(path) or real_load(path, *a))
    got = evaluate(model, val_loader=val(), zero_shot_sets=[classes], retrieval_sets=[coco], tokenizer=tok,
                   max_batches=2)
    assert sorted(decoded) == sorted([p for p, _ in classes.files] + coco.images)  # each image once
    want = {}
    for mode, cf in (("dropless", None), ("train_cf", 0.5)):
        one = {mode: cf}  # a separate pass per routing mode
        img, txt, loss, pairs = embed_pairs(model, val(), max_batches=2, modes=one)[mode]
        want[f"{mode}/val/contrastive"], want[f"{mode}/val/pairs"] = loss, pairs
        want.update({f"{mode}/retrieval/{k}": v for k, v in metrics.retrieval_metrics(img, txt).items()})
        want.update({f"{mode}/zeroshot/imagenet/{k}": v for k, v in
                     zero_shot(model, classes, tok, dp_rank=0, dp_size=1, modes=one)[mode].items()})
        want.update({f"{mode}/retrieval/coco/{k}": v for k, v in
                     caption_retrieval(model, coco, tok, dp_rank=0, dp_size=1, modes=one)[mode].items()})
    assert got == want and list(got) == list(want)
    assert got["dropless/val/contrastive"] != got["train_cf/val/contrastive"]


def test_zero_shot_max_images_reads_the_same_images_on_any_number_of_ranks(bench):
    """eval.zero_shot_max_images: at most N images, the same ones on 1 rank and on 2: the first files
    of a class tree; the first records of each shard of a shard set, N split evenly over the shards."""
    from limoe_ds.data import Tokenizer, benchmarks
    from limoe_ds.data.zeroshot import load_zeroshot_set
    from limoe_ds.eval.run import zero_shot
    from limoe_ds.model import build_model
    tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    model = build_model("tiny", seed=3).eval()
    one = {"dropless": None}
    classes = benchmarks.load_benchmark(_specs(bench)[0])  # 7 files: labels 0 0 1 1(broken) 1 2 2
    run = functools.partial(zero_shot, model, classes, tok, batch_size=2, modes=one)
    full = run(dp_rank=0, dp_size=1)["dropless"]
    assert run(dp_rank=0, dp_size=1, max_images=100)["dropless"] == full  # above the set's size: all of it
    capped = run(dp_rank=0, dp_size=1, max_images=4)["dropless"]
    assert (capped["images"], capped["skipped_images"]) == (3, 1)  # files 0-3, the broken one skipped
    assert [f[1] for f in classes.files[:4]] == [0, 0, 1, 1]
    halves = [run(dp_rank=r, dp_size=2, max_images=4)["dropless"] for r in range(2)]  # no process group: apart
    assert [h["images"] for h in halves] == [2, 1]  # files 0-1 and 2-3
    assert sum(h["top1"] * h["images"] for h in halves) == pytest.approx(capped["top1"] * 3)
    # a shard set: data/mini's Fashion-MNIST test set, 2 shards of 5,000; 1 rank reads both, 2 ranks one each
    zs = load_zeroshot_set(str(MINI / "zeroshot" / "fashion_mnist"))
    run = functools.partial(zero_shot, model, zs, tok, batch_size=8, modes=one, max_images=21)
    alone = run(dp_rank=0, dp_size=1)["dropless"]
    halves = [run(dp_rank=r, dp_size=2)["dropless"] for r in range(2)]
    assert alone["images"] == 21 and [h["images"] for h in halves] == [10, 11]  # rank_share(21, shard, 2)
    for k in ("top1", "top5"):  # per image (the seen/unseen ones are per class group)
        assert sum(h[k] * h["images"] for h in halves) == pytest.approx(alone[k] * 21), k


# ---- 2 ranks (expert-parallel 2, DeepSpeed engine) vs 1 rank, dropless -----------------------------
def _eval_worker(rank, world):
    from limoe_ds.data import DataConfig, Tokenizer, build_eval_loader
    from limoe_ds.data.zeroshot import load_zeroshot_set
    from limoe_ds.train.engine import build_engine
    from limoe_ds.eval.run import evaluate
    from limoe_ds.model import build_model
    tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    model = build_model("tiny", ep_size=world, ep_rank=rank, seed=3)
    if world > 1:  # DeepSpeed builds the expert-parallel groups
        ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        model = build_engine(model, ds)[0].module
    val = build_eval_loader(DataConfig(val=str(MINI / "val"), num_workers=0), image_size=32, tokenizer=tok,
                            text_len=16, batch_size=100, dp_rank=rank, dp_size=world)
    zs = load_zeroshot_set(str(MINI / "zeroshot" / "fashion_mnist"))
    return evaluate(model, val_loader=val, zero_shot_sets=[zs], tokenizer=tok, dp_rank=rank, dp_size=world)


@pytest.mark.integration  # gloo ranks (run_ranks)
def test_two_rank_dropless_evaluation_equals_one_rank():
    one = run_ranks(_eval_worker, 1)[0]
    two = run_ranks(_eval_worker, 2)
    assert two[0] == two[1]  # every rank reports the same numbers
    keys = [k for k in one if k.startswith("dropless/") and "val/contrastive" not in k]
    # retrieval and zero-shot are per-sample: identical whatever the split. (The in-batch val loss
    # depends on how pairs are batched, so it is not compared.)
    assert any("retrieval" in k for k in keys) and any("zeroshot" in k for k in keys)
    for k in keys:
        assert two[0][k] == pytest.approx(one[k], abs=1e-6), k
    assert one["dropless/val/pairs"] == two[0]["dropless/val/pairs"] == 628


# ---- a fresh 4-step tiny run (evaluation at steps 2 and 4): its checkpoint and TensorBoard log ------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from limoe_ds.config import run as run_config
    from limoe_ds.train.engine import init_distributed
    from limoe_ds.train.trainer import train
    run_dir = tmp_path_factory.mktemp("tiny_run")
    raw = json.loads((ROOT / "ds_configs" / "tiny.json").read_text())
    raw = run_config.apply_overrides(raw, [
        "parallel.expert_parallel_size=1", "train.steps=4", f"train.run_dir={run_dir}", "logging.progress_bar=false",
        "ds.scheduler.params.warmup_num_steps=1", "eval.every=2", "eval.max_batches=1", "eval.zero_shot=[]",
        "data.num_workers=0", f"tokenizer={MINI / 'tokenizer.json'}", f"data.train={MINI / 'train'}",
        f"data.val={MINI / 'val'}"])
    init_distributed()
    train(run_config.resolve(raw, world_size=1), rank=0, world=1, resume="none")
    return run_dir


@pytest.mark.integration  # tiny_run: a 1-rank process group
def test_training_logs_expert_figures_to_tensorboard_at_each_evaluation(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tiny_run / "tensorboard"))
    acc.Reload()
    tags = {"experts/modality", "experts/patches_layer1", "experts/patches_layer3"}
    assert set(acc.Tags()["images"]) == tags
    for tag in tags:
        assert [e.step for e in acc.Images(tag)] == [2, 4], tag  # the in-training and the final evaluation
    chart = acc.Images("experts/modality")[-1]
    assert (chart.width, chart.height) == (60 + 2 * 320, 300)  # 2 MoE layers, a 320 x 300 px panel each
    overlay = acc.Images("experts/patches_layer3")[-1]
    assert (overlay.width, overlay.height) == (450, 4 * 160 + 40)  # 4 images beside their patch grids
    assert "dropless/retrieval/i2t/R@1" in acc.Tags()["scalars"]


@pytest.mark.integration  # tiny_run; tools/evaluate.py starts a process group
def test_evaluate_tool_reports_the_benchmarks_of_a_checkpoint(tiny_run, bench, tmp_path, capsys):
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as evaluate_tool
    ckpt = tiny_run / "checkpoints" / "step00000004"
    out = tmp_path / "report.json"
    argv = ["--checkpoint", str(ckpt), "--out", str(out)]
    for spec in _specs(bench):
        argv += ["--data", spec]
    assert evaluate_tool.main(argv) == 0
    m = json.loads(out.read_text())["metrics"]
    for mode in ("dropless", "train_cf"):
        assert m[f"{mode}/zeroshot/imagenet/images"] == 6 and m[f"{mode}/zeroshot/imagenet/skipped_images"] == 1
        assert 0 <= m[f"{mode}/zeroshot/imagenet/top1"] <= m[f"{mode}/zeroshot/imagenet/top5"] == 1.0
        assert m[f"{mode}/retrieval/coco/captions"] == 9 and m[f"{mode}/retrieval/coco/skipped_images"] == 2
        for d in ("i2t", "t2i"):
            assert 0 <= m[f"{mode}/retrieval/coco/{d}/R@1"] <= m[f"{mode}/retrieval/coco/{d}/R@5"] <= 1
            assert m[f"{mode}/retrieval/coco/{d}/R@10"] == 1.0  # 4 images, 9 captions: all within 10
        assert f"{mode}/retrieval/i2t/R@1" in m  # the stored config's val pairs are still there
    # one readable image, its two captions: found at rank 0 whatever the model
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"images": [{"filename": "0.png", "split": "val",
                                           "sentences": [{"raw": "a"}, {"raw": "b"}]}]}))
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--out", str(out), "--data",
                               f"flickr30k={one},images={bench['images']}/val2014,split=val"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["dropless/retrieval/flickr30k/i2t/R@1"] == m["dropless/retrieval/flickr30k/t2i/R@1"] == 1.0
    capsys.readouterr()
    # bad input: exit status 2 and one line naming the fix, before any evaluation
    for spec, message in _bad_specs(bench, tmp_path)[1:7]:  # missing file, count, split, image dir
        assert evaluate_tool.main(["--checkpoint", str(ckpt), "--data", spec]) == 2, spec
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--data", _specs(bench)[1],
                               "--data", _specs(bench)[1]]) == 2
    assert "two benchmarks are named 'coco'" in capsys.readouterr().err


@pytest.mark.integration  # tiny_run
def test_analyze_experts_writes_a_consistent_report_and_figures(tiny_run, tmp_path):
    """On the checkpoint of the fresh 4-step tiny run: counts add up, shares match, figures are drawn."""
    import sys
    from PIL import Image
    sys.path.insert(0, str(ROOT / "tools"))
    import analyze_experts
    ckpt = tiny_run / "checkpoints" / "step00000004"
    out = tmp_path / "experts"
    assert analyze_experts.main(["--checkpoint", str(ckpt), "--out", str(out), "--images", "4"]) == 0
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert set(layers) == {"layer1", "layer3"}
    for s in layers.values():
        assert s["image"]["routed_tokens"] == 628 * 16  # every val image's patches, dropless
        assert s["image"]["success_rate"] == s["text"]["success_rate"] == 1.0
        kept = [a + b for a, b in zip(s["image"]["tokens_per_expert"], s["text"]["tokens_per_expert"])]
        for share, k, img_n in zip(s["image_share_per_expert"], kept, s["image"]["tokens_per_expert"]):
            assert k == 0 or share == pytest.approx(img_n / k, abs=1e-4)
    chart = Image.open(out / "experts_modality.png")
    assert chart.size == (60 + 2 * 320, 300)
    overlay = Image.open(out / "patches_layer3.png")
    assert overlay.size == (450, 4 * 160 + 40)
    assert analyze_experts.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2


# ---- the compositional evaluation (held-out compositions of synthetic:scenes) --------------------
def test_compositional_metrics_of_a_perfect_and_of_a_random_embedding_worked_by_hand():
    from limoe_ds.data.synthetic import compositional_set
    cs = compositional_set("synthetic:scenes", 40)
    texts = list(dict.fromkeys(cs.captions + [t for negs in cs.negatives for _, t in negs]))
    row = {t: i for i, t in enumerate(texts)}
    gen = torch.Generator().manual_seed(0)
    txt = torch.nn.functional.normalize(torch.randn(len(texts), 256, generator=gen), dim=-1)
    caption = torch.tensor([row[c] for c in cs.captions])
    kinds = {}
    for i, negs in enumerate(cs.negatives):
        for kind, t in negs:
            kinds.setdefault(kind, ([], []))[0].append(i)
            kinds[kind][1].append(row[t])
    common = dict(negatives={k: (torch.tensor(a), torch.tensor(b)) for k, (a, b) in kinds.items()},
                  negatives_per_image_N=torch.tensor([len(n) for n in cs.negatives]), caption_N=caption,
                  labels_N=torch.tensor([cs.label(i) for i in range(40)]), heldout_classes=cs.heldout_classes,
                  class_colour_C=torch.arange(64) // 8, class_shape_C=torch.arange(64) % 8,
                  retrieval_N=torch.tensor(sorted({c: i for i, c in reversed(list(enumerate(cs.captions)))}.values())))
    classifier = torch.eye(64, 256)
    # each image IS its caption's embedding: every negative loses, retrieval is perfect
    perfect = metrics.compositional_metrics(txt[caption], txt, classifier_CK=classifier, **common)
    assert {k: v for k, v in perfect.items() if k.startswith("negatives/") and "chance" not in k} == {
        f"negatives/{k}": 1.0 for k in ("colour", "shape", "size", "texture", "order", "all")}
    assert perfect["retrieval/i2t/R@1"] == perfect["retrieval/t2i/R@1"] == 1.0
    # one-object scenes are 1 in 2 (K = 4 negatives), two-object ones K = 3 (colour, shape, order)
    assert perfect["negatives/chance_all"] == pytest.approx((1 / 5 + 1 / 4) / 2)
    assert perfect["retrieval/chance_R@1"] == 1 / perfect["retrieval/pairs"]
    # images on the classifier's rows: classified right, colour and shape too
    labels = common["labels_N"]
    img = txt[caption].clone()
    img[labels >= 0] = classifier[labels[labels >= 0]]
    cls = metrics.compositional_metrics(img, txt, classifier_CK=classifier, **common)
    assert cls["classify/top1"] == cls["classify/heldout_top1"] == cls["classify/colour_top1"] == 1.0
    assert (cls["classify/chance_top1"], cls["classify/chance_heldout_top1"], cls["classify/chance_colour_top1"]) == (
        1 / 64, 1 / 10, 1 / 8)
    # all-equal scores: ties count against the model, every pairwise test is lost
    flat = metrics.compositional_metrics(torch.zeros(40, 256), txt, classifier_CK=classifier, **common)
    assert flat["negatives/colour"] == flat["negatives/all"] == flat["classify/top1"] == 0.0


def test_compositional_evaluation_of_a_random_tiny_model_has_every_metric_in_range():
    from limoe_ds.data import Tokenizer
    from limoe_ds.data.synthetic import NEGATIVE_TYPES, compositional_set
    from limoe_ds.eval.run import evaluate
    from limoe_ds.model import build_model
    tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    model = build_model("tiny", seed=3)
    cs = compositional_set("synthetic:scenes", 120)
    out = evaluate(model, compositional_sets=[cs], tokenizer=tok)
    assert model.training  # evaluate() restores the mode
    for mode in ("dropless", "train_cf"):
        p = f"{mode}/compositional/scenes/"
        keys = [f"classify/{k}" for k in ("top1", "heldout_top1", "colour_top1", "shape_top1")] + \
               [f"negatives/{k}" for k in NEGATIVE_TYPES + ("all",)] + \
               [f"retrieval/{d}/R@{k}" for d in ("i2t", "t2i") for k in (1, 5)]
        for k in keys:
            head, _, tail = k.rpartition("/")
            chance = f"{p}{head}/chance_{tail}" if head != "retrieval/i2t" and head != "retrieval/t2i" else \
                f"{p}retrieval/chance_{tail}"
            assert 0.0 <= out[p + k] <= 1.0 and 0.0 < out[chance] <= 0.5, (k, out[p + k], out.get(chance))
        assert out[p + "scenes"] == 120 and out[p + "classify/images"] == 60
        assert out[p + "negatives/chance_order"] == 0.5 and out[p + "classify/chance_top1"] == 1 / 64
        assert 0 < out[p + "retrieval/pairs"] <= 120
    again = evaluate(model, compositional_sets=[cs], tokenizer=tok)
    assert again == out  # deterministic, and the drawn images are kept
