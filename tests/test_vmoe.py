"""V-MoE (model.num_classes): the same blocks as an image-only classifier, trained with cross-entropy
on labelled images (data/fmnist) with top-1 routing and BPR; its export is a LiT image tower."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from limoe_ds.config.errors import ConfigError
from limoe_ds.config.model import get_preset
from limoe_ds.losses import classification_loss
from limoe_ds.model import build_model
from limoe_ds.model.limoe import param_counts
from test_collapse import _resolve
from test_train import ROOT, _launch, _losses

FMNIST = ROOT / "data" / "fmnist"
VMOE = ["model.preset=tiny-vmoe", "tokenizer=null", "eval.zero_shot=[]", f"data.train={FMNIST / 'train'}",
        f"data.val={FMNIST / 'test' / 'test-000.tar'}"]


def test_the_vmoe_twin_is_the_image_tower_with_a_zero_head():
    tiny, vmoe = build_model("tiny"), build_model("tiny-vmoe")
    assert vmoe.cfg.name == "tiny-vmoe" and vmoe.cfg.num_classes == 10 and get_preset("b16-vmoe").num_classes == 1000
    assert get_preset("h14-vmoe-dense").moe is None and get_preset("s32-vmoe").classifier
    # V-MoE's auxiliary losses (importance + load), not LIMoE's entropy losses
    assert vmoe.cfg.moe.local_entropy_weight == vmoe.cfg.moe.global_entropy_weight == {"image": 0.0, "text": 0.0}
    assert vmoe.cfg.moe.importance_weight == vmoe.cfg.moe.load_weight == 0.005
    names, mine = dict(tiny.named_parameters()), dict(vmoe.named_parameters())
    text_only = {"token_embed.weight", "text_pos", "text_head.weight", "text_head.bias", "logit_scale"}
    assert set(names) - set(mine) == text_only and set(mine) - set(names) == {"class_head.weight", "class_head.bias"}
    for name, p in vmoe.named_parameters():  # the image tower initialises as the contrastive model's
        if not name.startswith("class_head."):
            assert torch.equal(p, names[name]), name
    counts = param_counts(vmoe)
    assert counts["total_params"] == 1_629_194 and counts["expert_params"] == param_counts(tiny)["expert_params"]
    assert "active_params_per_text_token" not in counts
    # + the 128 x 10 head and its 10 biases, - the temperature
    assert counts["active_params_per_image_token"] == param_counts(tiny)["active_params_per_image_token"] + 1290 - 1
    # zero-initialised head: every class has logit 0 at step 0
    out = vmoe(torch.rand(6, 3, 32, 32) * 2 - 1, None)
    labels = torch.tensor([0, 1, 2, 3, 9, 9])
    assert out.logits.shape == (6, 10) and out.logit_scale is None and out.text_emb.shape == (0, 128)
    assert classification_loss(out.logits, labels).item() == pytest.approx(math.log(10), abs=1e-6)
    assert classification_loss(out.logits, labels, "sigmoid").item() == pytest.approx(10 * math.log(2), abs=1e-5)
    assert all(torch.isfinite(v) for v in out.aux_losses.values())
    for s in out.routing:  # image patches only: the text pool is empty
        assert s.routed_ME.sum(dim=1).tolist() == [6 * 16, 0]


def test_the_classifier_refuses_text_and_the_contrastive_model_refuses_classify():
    vmoe, tiny = build_model("tiny-vmoe"), build_model("tiny")
    with pytest.raises(ValueError, match="reads images only"):
        vmoe(torch.zeros(1, 3, 32, 32), torch.ones(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="has no text input"):
        vmoe.encode_text(torch.ones(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="classify needs a classifier"):
        tiny.classify(torch.zeros(1, 3, 32, 32))


def test_batch_priority_switches_the_routing_of_every_layer_and_restores_it():
    """At a capacity factor of 0.25 most patches are dropped: which ones depends on BPR; dropless
    drops none, so BPR changes nothing there."""
    from limoe_ds.eval.run import batch_priority
    model = build_model("tiny-vmoe", seed=1).eval()
    with torch.no_grad():
        for layer in model.moe_layers():  # a head that reads the pooled features
            layer.deepspeed_moe.experts.deepspeed_experts[0].fc1.weight.mul_(3)
        model.class_head.weight.normal_(generator=torch.Generator().manual_seed(0))
        x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        on = model.classify(x, 0.25)
        with batch_priority(model, False):
            assert not any(layer.cfg.batch_priority for layer in model.moe_layers())
            off, off_dropless = model.classify(x, 0.25), model.classify(x, None)
        assert all(layer.cfg.batch_priority for layer in model.moe_layers())
        assert not torch.allclose(on, off)
        torch.testing.assert_close(off_dropless, model.classify(x, None), rtol=0, atol=0)


@pytest.mark.parametrize("sets, message", [
    (["model.preset=tiny-vmoe"], "tokenizer: a classifier (model.num_classes, V-MoE) reads image labels"),
    (["model.preset=tiny-vmoe", "tokenizer=null"], "eval.zero_shot: a classifier has no text tower"),
    ([*VMOE, "train.loss_impl=ring", "train.loss=sigmoid"], "train.loss_impl: a classifier's cross-entropy"),
    ([*VMOE, "model.num_classes=1"], "model.num_classes: must be >= 2"),
    (["model.preset=tiny-2t", "model.num_classes=10", "tokenizer=null"], "a classifier (V-MoE) is image-only"),
    (["model.preset=tiny-clippo-vmoe"], "unknown preset 'tiny-clippo-vmoe'"),
])
def test_vmoe_config_errors_name_the_key(sets, message):
    with pytest.raises((ConfigError, ValueError)) as e:
        _resolve(*sets)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_sigmoid_classifier_has_no_pair_bias():
    cfg = _resolve(*VMOE, "train.loss=sigmoid")
    assert cfg.model.logit_bias_init is None and build_model(cfg.model).logit_bias is None


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_vmoe_runs_resumes_exports_evaluates_and_becomes_a_lit_image_tower(tmp_path):
    """tiny-vmoe through the real entry point on 2 ranks with expert parallelism 2: cross-entropy
    from log 10, image-only routing statistics, a bitwise resume from step 2, top-1 on 5,000
    test images that tools/evaluate.py on one rank reproduces exactly (dropless: per image, batch-
    independent), an export without tokenizer whose classify agrees; then the V-MoE -> LiT chain
    (``_lit_chain``)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_checkpoint as convert_tool
    import evaluate as evaluate_tool
    from limoe_ds import load_pretrained
    from limoe_ds.checkpoint import io as checkpoint
    sets = [*VMOE, "train.save_every=2", "eval.max_batches=0", "eval.batch_size=1000"]
    full = _launch(tmp_path / "full", 4, sets)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss/xent" in r)
    assert first["step"] == 1 and first["loss/xent"] == pytest.approx(math.log(10), abs=1e-5)
    assert not any(k.startswith("routing/") and "/text/" in k for r in rows for k in r)
    assert all(r["routing/layer1/image/success_rate"] > 0 for r in rows if "routing/layer1/image/success_rate" in r)
    final = [r for r in rows if "dropless/val/top1" in r][-1]
    assert final["dropless/val/images"] == 5000 and 0.1 < final["dropless/val/top1"] <= 1
    resumed = _launch(tmp_path / "resumed", 4, [*sets, "eval.max_batches=1", "--resume",
                                                str(tmp_path / "full" / "checkpoints" / "step00000002")])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4] and [a[s] for s in b] == [b[s] for s in b]
    ckpt = tmp_path / "full" / "checkpoints" / "step00000004"
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "report.json")]) == 0
    got = json.loads((tmp_path / "report.json").read_text())["metrics"]
    for k in ("dropless/val/top1", "dropless/val/top5", "dropless/val/images"):
        assert got[k] == final[k], k
    assert convert_tool.main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    assert not (tmp_path / "export" / "tokenizer.json").exists()
    loaded = load_pretrained(tmp_path / "export")
    for name, value in checkpoint.consolidated_model_state(ckpt).items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert loaded.tokenizer is None and loaded.logit_scale is None
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model = build_model(loaded.cfg)
    model.load_state_dict(checkpoint.consolidated_model_state(ckpt))
    torch.testing.assert_close(loaded.classify(x), model.eval().classify(x, None), rtol=0, atol=0)
    # V-MoE -> LiT, in this process: the classifier's export as the locked image tower of a tiny-2t
    # model (the run config checks the export's tower), text-tower steps, then zero-shot
    _lit_chain(tmp_path / "export", loaded)


@pytest.mark.parametrize("name,world", [("s32", 8), ("b16", 32), ("l16", 64), ("h14", 256)])
def test_vmoe_gpu_configs_are_their_preset_as_an_imagenet_classifier(name, world):
    """ds_configs/NAME_vmoe.json: NAME.json with the V-MoE twin on ImageNet-1k WebDataset shards
    (KEY.jpg + KEY.cls), no tokenizer or zero-shot sets; validated for its cluster, and its memory
    estimate (image patches only) fits an 80 GB GPU."""
    from limoe_ds.config import run as run_config
    from limoe_ds.parallel.memory import estimate
    base = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    vmoe = json.loads((ROOT / "ds_configs" / f"{name}_vmoe.json").read_text())
    assert vmoe["limoe"]["model"].pop("preset") == f"{name}-vmoe" and base["limoe"]["model"].pop("preset") == name
    assert vmoe["limoe"]["train"].pop("run_dir") == f"runs/{name}_vmoe"
    assert "imagenet" in vmoe["limoe"].pop("data")["val"] and "tokenizer" not in vmoe["limoe"]
    base["limoe"]["train"].pop("run_dir"), base["limoe"].pop("data"), base["limoe"].pop("tokenizer")
    base["limoe"]["eval"].pop("zero_shot", None)
    assert vmoe == base
    cfg = run_config.load(ROOT / "ds_configs" / f"{name}_vmoe.json", world_size=world, check_paths=False)
    assert cfg.model.classifier and cfg.model.num_classes == 1000 and cfg.model.text_positions == 0
    tp, ep = cfg.parallel.tensor_parallel_size, cfg.parallel.expert_parallel_size
    mem = estimate(cfg.model, tp=tp, ep=ep, dp=world // tp, zero_stage=cfg.deepspeed["zero_optimization"]["stage"],
                   micro_batch=cfg.micro_batch_size, activation_checkpointing=cfg.train.activation_checkpointing)
    assert mem.total_gib < 80, mem


def test_the_capacity_curve_routes_the_share_the_capacity_allows(tmp_path):
    """tools/capacity_curve.py's rows: dropless routes every patch; at cf the share routed is at most
    E x C / pool (C = cf x pool / E rounded up to capacity_multiple_of), with BPR and without."""
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests" / "data")]
    from capacity_curve import curve, markdown
    from data_helpers import image_bytes, write_tar
    from limoe_ds.data import DataConfig, build_eval_loader
    from limoe_ds.data.labels import Labels
    members = [m for i in range(20) for m in ((f"s{i:02d}.png", image_bytes(i, (32, 32))),
                                             (f"s{i:02d}.cls", str(i % 10).encode()))]
    path = write_tar(tmp_path / "lab-000.tar", members)
    loader = build_eval_loader(DataConfig(val=str(path), num_workers=0), image_size=32, tokenizer=Labels(10),
                               text_len=16, batch_size=10, dp_rank=0, dp_size=1)
    rows = curve(build_model("tiny-vmoe").eval(), loader, [0.25, 1.0])
    assert [(r["cf"], r["bpr"]) for r in rows] == [(None, True), (0.25, True), (0.25, False), (1.0, True), (1.0, False)]
    assert all(r["images"] == 20 for r in rows) and rows[0]["success"] == {"layer1": 1.0, "layer3": 1.0}
    pool, E = 10 * 16, 4
    for r in rows[1:]:  # C = ceil(cf * 160 / 4) rounded up to a multiple of 4: 12 (cf 0.25), 40 (cf 1)
        cap = {0.25: 12, 1.0: 40}[r["cf"]]
        assert all(0 < s <= E * cap / pool for s in r["success"].values()), r
    table = markdown(rows)
    assert table.splitlines()[2].startswith("| dropless | ") and "| 0.25 | " in table


def _lit_chain(export, loaded) -> None:
    """V-MoE -> export -> LiT text tuning -> zero-shot: a tiny-2t run config with
    ``train.image_tower`` = the classifier's export (resolving it checks the export's image tower
    against the model), the tower loaded and locked as the trainer does (limoe_ds.pretrained,
    limoe_ds.model.lit), three AdamW steps of the contrastive loss on the bundled pairs (the text
    tower learns, the image tower stays the export's bit for bit), and zero-shot Fashion-MNIST."""
    from limoe_ds.data import build_train_loader
    from limoe_ds.data.render import text_encoder
    from limoe_ds.data.zeroshot import load_zeroshot_set
    from limoe_ds.eval.run import zero_shot
    from limoe_ds.losses import pair_loss
    from limoe_ds.model import lit
    from limoe_ds.pretrained import load_image_tower
    cfg = _resolve("model.preset=tiny-2t", f"train.image_tower={export}")
    model = build_model(cfg.model, seed=3)
    assert load_image_tower(model, cfg.train.image_tower.init) > 0
    locked = lit.lock_image_tower(model, cfg.train.image_tower)
    assert locked and all(lit.is_image_tower(n) for n in locked)
    tok = text_encoder(cfg.model, cfg.tokenizer)
    loader = build_train_loader(cfg.data, image_size=32, tokenizer=tok, text_len=cfg.model.text_len, batch_size=32,
                                dp_rank=0, dp_size=1)
    text_before = model.text_tower.blocks[0].attn.qkv.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _, batch in zip(range(3), loader):
        out = model(batch["images"], batch["tokens"])
        loss = pair_loss(out, group=False) + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model.text_tower.blocks[0].attn.qkv.weight, text_before)
    exported = loaded.model.state_dict()
    for name, p in model.named_parameters():
        if lit.is_image_tower(name):
            assert torch.equal(p, exported[name]), name
    res = zero_shot(model.eval(), load_zeroshot_set(cfg.eval.zero_shot[0]), tok, dp_rank=0, dp_size=1)
    assert res["images"] == 10000 and 0 <= res["top1"] <= 1



# ---- gradient accumulation ----------------------------------------------------------------------------------
def _vmoe_cfg():
    import dataclasses
    cfg = get_preset("tiny-vmoe")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=0.5))  # tokens dropped


def _vmoe_batch(dp_rank: int, n: int):
    gen = torch.Generator().manual_seed(50 + dp_rank)
    return torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1, torch.randint(0, 10, (n,), generator=gen)


def _vmoe_accum_worker(rank, world, k):
    from limoe_ds import parallel
    from limoe_ds.train.engine import build_engine, classification_step
    from test_distributed import B, _ds_config, _noise_seed
    from test_family import record_boundary_grads
    cfg = _vmoe_cfg()
    layout = parallel.Layout(rank=rank, world_size=world, ep=2, tp=1)
    parallel.setup(layout)
    model = build_model(cfg, ep_size=2, ep_rank=layout.ep_rank, seed=0)
    engine, _ = build_engine(model, {**_ds_config(1, 0.0, layout.dp), "gradient_accumulation_steps": k,
                                     "train_batch_size": B * k * layout.dp})
    grads = record_boundary_grads(engine, layout.ep_rank, cfg.moe.num_experts // 2)
    images, labels = _vmoe_batch(layout.dp_rank, B * k)
    torch.manual_seed(_noise_seed(0, layout.dp_rank))
    passes = []
    r = classification_step(engine, {"images": images, "labels": labels}, "softmax", passes=passes)
    assert not r.skipped and len(passes) == 2 * k and engine.global_steps == 1
    same = all(torch.equal(a.logits, b.logits) and all(torch.equal(a.aux_losses[n], b.aux_losses[n])
                                                        for n in a.aux_losses) for a, b in zip(passes[:k], passes[k:]))
    dropped = sum(float((s.routed_ME - s.kept_ME).sum()) for p in passes[:k] for s in p.routing)
    parallel.teardown()
    return {"loss": r.loss, "grads": grads, "same": same, "dropped": dropped}


@pytest.mark.integration  # gloo ranks and the DeepSpeed engine
def test_classifier_gradient_accumulation_equals_one_step_on_the_k_times_larger_batch():
    """tiny-vmoe on 2 ranks (expert-parallel 2), gradient_accumulation_steps=2: the loss and the
    gradients of the mean over all 4 micro-batches (each its own routing pool) of cross-entropy +
    aux, computed on one process with every expert; the replay with gradients routes as the first
    pass (router noise on, capacity factor 0.5, tokens dropped)."""
    from dist_utils import run_ranks
    from limoe_ds.losses import classification_loss
    from test_distributed import B, _noise_seed
    k = 2
    results = run_ranks(_vmoe_accum_worker, 2, k)
    model = build_model(_vmoe_cfg(), seed=0)
    total = 0.0
    for r in range(2):
        images, labels = _vmoe_batch(r, B * k)
        torch.manual_seed(_noise_seed(0, r))
        for m in range(k):
            rows = slice(m * B, (m + 1) * B)
            out = model(images[rows], None)
            total = total + classification_loss(out.logits, labels[rows], "softmax") + sum(out.aux_losses.values())
    total = total / (2 * k)
    total.backward()
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(total.item(), rel=1e-5)
    want = {n: p.grad for n, p in model.named_parameters()}
    assert set().union(*(r["grads"] for r in results)) == set(want)
    for res in results:
        assert res["same"] and res["dropped"] > 0
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, want[name], rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")
