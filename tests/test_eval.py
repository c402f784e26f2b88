"""Evaluation metrics on constructed embeddings (answers worked by hand) and the distributed pass."""

from __future__ import annotations

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


# ---- 2 ranks (expert-parallel 2, DeepSpeed engine) vs 1 rank, dropless -----------------------------
def _eval_worker(rank, world):
    from limoe_ds.data import DataConfig, Tokenizer, build_eval_loader
    from limoe_ds.data.zeroshot import load_zeroshot_set
    from limoe_ds.engine import build_engine
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


def test_analyze_experts_writes_a_consistent_report_and_figures(tmp_path):
    """On the checkpoint of a fresh 3-step tiny run: counts add up, shares match, figures are drawn."""
    import json
    import sys
    from PIL import Image
    from limoe_ds import run_config
    from limoe_ds.engine import init_distributed
    from limoe_ds.train import train
    sys.path.insert(0, str(ROOT / "tools"))
    import analyze_experts
    raw = json.loads((ROOT / "ds_configs" / "tiny.json").read_text())
    raw = run_config.apply_overrides(raw, [
        "parallel.expert_parallel_size=1", "train.steps=3", f"train.run_dir={tmp_path / 'run'}", "logging.progress_bar=false",
        "ds.scheduler.params.warmup_num_steps=1", "eval.max_batches=1", "eval.zero_shot=[]", "data.num_workers=0",
        f"tokenizer={MINI / 'tokenizer.json'}", f"data.train={MINI / 'train'}", f"data.val={MINI / 'val'}"])
    init_distributed()
    train(run_config.resolve(raw, world_size=1), rank=0, world=1, resume="none")
    ckpt = tmp_path / "run" / "checkpoints" / "step00000003"
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
    assert chart.size == (440, 180)
    overlay = Image.open(out / "patches_layer3.png")
    assert overlay.size == (2 * 32 * 4, 4 * 32 * 4)
    assert analyze_experts.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
