"""The contrastive family through the real entry point (issue 15): each member a configuration of
the same code path, trained on 2 CPU ranks, resumed exactly, exported, loaded and evaluated.

The sigmoid loss (SigLIP, ``train.loss=sigmoid``), two towers (``model.text_tower``), LiT
(``train.image_tower``) and gradient caching (``gradient_accumulation_steps`` > 1)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.config import run as run_config
from limoe_ds.config.errors import ConfigError
from test_train import ROOT, _launch, _losses, _tiny_raw


# ---- configuration -----------------------------------------------------------------------------------
def _resolve(*sets: str, world: int = 2):
    return run_config.resolve(run_config.apply_overrides(_tiny_raw(), list(sets)), world_size=world)


def test_sigmoid_loss_config_gives_the_model_its_bias():
    assert _resolve().model.logit_bias_init is None  # the softmax loss: no bias parameter
    cfg = _resolve("train.loss=sigmoid")
    assert cfg.model.logit_bias_init == -10.0 and cfg.model.temperature_init == 10.0  # SigLIP's init
    assert _resolve("train.loss=sigmoid", "model.logit_bias_init=-5").model.logit_bias_init == -5.0
    assert _resolve("train.loss=sigmoid", "train.loss_impl=ring").train.loss_impl == "ring"


@pytest.mark.parametrize("sets,message", [
    (["train.loss=focal"], "train.loss: must be one of ['softmax', 'sigmoid'], got 'focal'"),
    (["train.loss=sigmoid", "train.loss_impl=chunks"], "train.loss_impl: must be one of ['all_gather', 'ring']"),
    (["train.loss_impl=ring"], "train.loss_impl: 'ring' is a form of the sigmoid loss"),
    (["model.logit_bias_init=-10"], "model.logit_bias_init: is the sigmoid loss's bias"),
])
def test_sigmoid_loss_config_errors_name_the_key(sets, message):
    with pytest.raises(ConfigError) as e:
        _resolve(*sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sigmoid_model_has_an_undecayed_bias_initialised_from_the_config():
    from limoe_ds.model import build_model
    from limoe_ds.train.engine import weight_decay_split
    cfg = _resolve("train.loss=sigmoid").model
    model = build_model(cfg)
    assert model.logit_bias.item() == -10.0 and model.logit_scale.exp().item() == pytest.approx(10.0)
    _, no_decay = weight_decay_split(model)
    assert any(p is model.logit_bias for p in no_decay)
    softmax = build_model(_resolve().model)
    assert softmax.logit_bias is None and "logit_bias" not in softmax.state_dict()
    # the bias adds one parameter and changes no other initial weight
    state = softmax.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k != "logit_bias")


def test_resume_refuses_to_switch_the_loss(tmp_path):
    from limoe_ds.checkpoint.resume_check import compare
    saved = json.loads(json.dumps(_resolve().to_dict()))
    new = json.loads(json.dumps(_resolve("train.loss=sigmoid").to_dict()))
    with pytest.raises(ConfigError, match="model.logit_bias_init is null in .* but -10.0 now"):
        compare(saved, new, tmp_path)
    ring = json.loads(json.dumps(_resolve("train.loss=sigmoid", "train.loss_impl=ring").to_dict()))
    assert compare(new, ring, tmp_path) == ["resume: train.loss_impl changed 'all_gather' -> 'ring'"]


# ---- the real entry point --------------------------------------------------------------------------------
def _export_and_evaluate(ckpt, tmp_path, rows):
    """Export ``ckpt`` (it must load with load_pretrained and hold the consolidated weights bit for
    bit) and evaluate it on one rank with every expert (tools/evaluate.py), which must give the
    expert-parallel run's zero-shot numbers (``rows``: its metrics.jsonl). The held-out loss is
    in-batch, and one rank's batches are not two ranks'. -> (the loaded model, the report's metrics)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_checkpoint as convert_tool
    import evaluate as evaluate_tool
    from limoe_ds import load_pretrained
    assert convert_tool.main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    loaded = load_pretrained(tmp_path / "export")
    exported = loaded.model.state_dict()
    for name, value in checkpoint.consolidated_model_state(ckpt).items():
        assert torch.equal(exported[name], value), name
    final = [r for r in rows if "dropless/zeroshot/fashion_mnist/top1" in r][-1]
    report_path = tmp_path / "report.json"
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--out", str(report_path)]) == 0
    got = json.loads(report_path.read_text())["metrics"]
    for k in [k for k in got if k.startswith("dropless/zeroshot/")]:
        assert got[k] == pytest.approx(final[k], abs=1e-9), k
    return loaded, got


def test_held_out_loss_of_a_sigmoid_model_is_the_sigmoid_loss():
    from limoe_ds.eval.run import embed_pairs
    from limoe_ds.losses import contrastive_loss, sigmoid_loss
    from limoe_ds.model import build_model
    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(6, 3, 32, 32, generator=gen) * 2 - 1,
             "tokens": torch.randint(1, 100, (6, 16), generator=gen)}
    for sets, loss_fn in ((["train.loss=sigmoid"], lambda o: sigmoid_loss(o.image_emb, o.text_emb, o.logit_scale,
                                                                           o.logit_bias)),
                          ([], lambda o: contrastive_loss(o.image_emb, o.text_emb, o.logit_scale))):
        model = build_model(_resolve(*sets).model).eval()
        _, _, loss, pairs = embed_pairs(model, [batch])
        with torch.no_grad():
            want = loss_fn(model(batch["images"], batch["tokens"])).item()
        assert pairs == 6 and loss == pytest.approx(want, rel=1e-6)


# ---- the GPU configs of each family member -----------------------------------------------------------
GPU = [("s32", 8), ("b16", 32), ("l16", 64), ("h14", 256)]


@pytest.mark.parametrize("name,world", GPU)
def test_two_tower_gpu_configs_are_their_preset_with_two_towers(name, world):
    """ds_configs/NAME_2t.json: the preset's config with its two-tower twin (same layout, batch,
    schedule), validated for its cluster; its memory estimate fits an 80 GB GPU."""
    from limoe_ds.parallel.memory import estimate
    base = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    two = json.loads((ROOT / "ds_configs" / f"{name}_2t.json").read_text())
    assert two["limoe"]["model"].pop("preset") == f"{name}-2t" and base["limoe"]["model"].pop("preset") == name
    assert two["limoe"]["train"].pop("run_dir") == f"runs/{name}_2t"
    base["limoe"]["train"].pop("run_dir")
    assert two == base
    cfg = run_config.load(ROOT / "ds_configs" / f"{name}_2t.json", world_size=world, check_paths=False)
    assert cfg.model.two_tower
    tp, ep = cfg.parallel.tensor_parallel_size, cfg.parallel.expert_parallel_size
    mem = estimate(cfg.model, tp=tp, ep=ep, dp=world // tp, zero_stage=cfg.deepspeed["zero_optimization"]["stage"],
                   micro_batch=cfg.micro_batch_size, activation_checkpointing=cfg.train.activation_checkpointing)
    assert mem.total_gib < 80, mem


@pytest.mark.parametrize("name,world", GPU)
def test_sigmoid_gpu_configs_are_their_preset_with_the_sigmoid_loss(name, world):
    """ds_configs/NAME_sigmoid.json: validated for its cluster, and NAME.json in every key but the
    loss and the run directory (so the comparison with the softmax run is of the loss alone)."""
    base = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    sig = json.loads((ROOT / "ds_configs" / f"{name}_sigmoid.json").read_text())
    train = sig["limoe"]["train"]
    assert train.pop("loss") == "sigmoid" and train.pop("loss_impl") in ("all_gather", "ring")
    assert train.pop("run_dir") == f"runs/{name}_sigmoid"
    base["limoe"]["train"].pop("run_dir")
    assert sig == base
    cfg = run_config.load(ROOT / "ds_configs" / f"{name}_sigmoid.json", world_size=world, check_paths=False)
    assert cfg.train.loss == "sigmoid" and cfg.model.logit_bias_init == -10.0
    with pytest.raises(ConfigError, match="parallel.world_size"):
        run_config.load(ROOT / "ds_configs" / f"{name}_sigmoid.json", world_size=world // 2, check_paths=False)


@pytest.mark.parametrize("name,world", GPU)
def test_lit_gpu_configs_are_the_two_tower_config_with_a_locked_image_tower(name, world, tmp_path):
    """ds_configs/NAME_lit.json: NAME_2t.json with its image tower from the export of a NAME_2t run
    (exports/NAME_2t), locked; validated for its cluster, and against an export of the right
    shape (and refused against one of another preset)."""
    two = json.loads((ROOT / "ds_configs" / f"{name}_2t.json").read_text())
    lit_raw = json.loads((ROOT / "ds_configs" / f"{name}_lit.json").read_text())
    train = lit_raw["limoe"]["train"]
    assert train.pop("image_tower") == {"init": f"exports/{name}_2t", "lock": True, "unlocked_groups": 0,
                                        "dropless": False}
    assert train.pop("run_dir") == f"runs/{name}_lit"
    two["limoe"]["train"].pop("run_dir")
    assert lit_raw == two
    cfg = run_config.load(ROOT / "ds_configs" / f"{name}_lit.json", world_size=world, check_paths=False)
    assert cfg.train.image_tower.lock and cfg.model.two_tower
    raw = json.loads((ROOT / "ds_configs" / f"{name}_lit.json").read_text())
    config_only = tmp_path / "export"  # the shape check reads config.json only (no weights loaded here)
    config_only.mkdir()
    (config_only / "model.safetensors").write_bytes(b"")
    other = {"s32": "b16", "b16": "s32", "l16": "b16", "h14": "l16"}[name]
    for preset, ok in ((f"{name}-2t", True), (f"{other}-2t", False)):
        (config_only / "config.json").write_text(json.dumps(run_config.model_config({"preset": preset}).to_dict()))
        raw["limoe"]["train"]["image_tower"]["init"] = str(config_only)
        if ok:
            run_config.check_image_tower(run_config.resolve(raw, world_size=world, check_paths=False), True)
        else:
            with pytest.raises(ConfigError, match="train.image_tower.init: .*: its "):
                run_config.check_image_tower(run_config.resolve(raw, world_size=world, check_paths=False), True)


# ---- gradient caching ------------------------------------------------------------------------------------
def _cache_model_cfg(loss: str):
    import dataclasses
    from test_distributed import _model_cfg
    cfg = _model_cfg()
    cfg.moe.capacity_factor = 0.5  # tokens are dropped: the recompute must drop the same ones
    return dataclasses.replace(cfg, logit_bias_init=-10.0 if loss == "sigmoid" else None)


def _cache_batch(dp_rank: int, k: int, cfg):
    from test_distributed import _batch
    parts = [_batch(m, dp_rank, cfg) for m in range(k)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def record_boundary_grads(engine, ep_rank: int, num_local: int) -> dict:
    """Wraps ``engine.step`` so that the returned dict receives, at the accumulation boundary, the
    full gradient DeepSpeed steps with, keyed by single-device (global expert) names."""
    from deepspeed.utils import safe_get_full_grad
    from test_distributed import _global_name
    grads, step = {}, engine.step

    def record_then_step():
        if engine.is_gradient_accumulation_boundary():
            grads.update({_global_name(n, ep_rank, num_local): safe_get_full_grad(p).clone()
                          for n, p in engine.module.named_parameters()})
        step()
    engine.step = record_then_step
    return grads


def _grad_cache_worker(rank, world, loss, impl, k, stage):
    from limoe_ds import parallel
    from limoe_ds.model import build_model
    from limoe_ds.train.engine import build_engine, grad_cached_step
    from test_distributed import B, _ds_config, _noise_seed, _routing_tensors
    cfg = _cache_model_cfg(loss)
    layout = parallel.Layout(rank=rank, world_size=world, ep=2, tp=1)
    parallel.setup(layout)
    model = build_model(cfg, ep_size=2, ep_rank=layout.ep_rank, seed=0)
    ds = {**_ds_config(stage, 0.0, layout.dp), "gradient_accumulation_steps": k, "train_batch_size": B * k * layout.dp}
    engine, _ = build_engine(model, ds)
    grads = record_boundary_grads(engine, layout.ep_rank, cfg.moe.num_experts // 2)
    images, tokens = _cache_batch(layout.dp_rank, k, cfg)
    torch.manual_seed(_noise_seed(0, layout.dp_rank))
    passes = []
    r = grad_cached_step(engine, {"images": images, "tokens": tokens}, impl, passes=passes)
    assert not r.skipped and len(passes) == 2 * k and engine.global_steps == 1
    # the recompute routed as the first pass: same embeddings, routing counts, capacities, aux losses
    same = all(torch.equal(a.image_emb, b.image_emb) and torch.equal(a.text_emb, b.text_emb)
               and all(torch.equal(x, y) for x, y in zip(_routing_tensors(a.routing).values(),
                                                           _routing_tensors(b.routing).values()))
               and all(torch.equal(a.aux_losses[n], b.aux_losses[n]) for n in a.aux_losses)
               for a, b in zip(passes[:k], passes[k:]))
    dropped = sum(float((s.routed_ME - s.kept_ME).sum()) for p in passes[:k] for s in p.routing)
    parallel.teardown()
    return {"loss": r.loss, "grads": grads, "same_routing": same, "dropped": dropped}


def _grad_cache_reference(loss: str, k: int, dp: int):
    """One process, every expert: each rank's k micro-batches routed as their own pools, with
    that rank's noise; ONE loss over all dp*k micro-batches' embeddings, the aux losses averaged."""
    from types import SimpleNamespace
    from limoe_ds.losses import pair_loss
    from limoe_ds.model import build_model
    from test_distributed import B, _noise_seed
    cfg = _cache_model_cfg(loss)
    model = build_model(cfg, seed=0)
    img, txt, aux = [], [], 0.0
    for r in range(dp):
        images, tokens = _cache_batch(r, k, cfg)
        torch.manual_seed(_noise_seed(0, r))
        for m in range(k):
            out = model(images[m * B:(m + 1) * B], tokens[m * B:(m + 1) * B])
            img.append(out.image_emb)
            txt.append(out.text_emb)
            aux = aux + sum(out.aux_losses.values())
    whole = SimpleNamespace(image_emb=torch.cat(img), text_emb=torch.cat(txt), logit_scale=out.logit_scale,
                            logit_bias=out.logit_bias)
    total = pair_loss(whole, group=False) + aux / (dp * k)
    total.backward()
    return total.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.integration  # gloo ranks and the DeepSpeed engine
@pytest.mark.parametrize("loss,impl,k,stage", [("softmax", "all_gather", 2, 1), ("sigmoid", "ring", 4, 2)])
def test_grad_caching_equals_one_step_on_the_k_times_larger_batch(loss, impl, k, stage):
    """2 ranks, expert parallelism 2: k micro-batches by gradient caching give the loss and the
    gradients of one loss over the whole batch (fp32, summation-order tolerance), and the
    recompute of every micro-batch routes exactly as its first pass (router noise on, capacity
    factor 0.5, tokens dropped)."""
    from dist_utils import run_ranks
    results = run_ranks(_grad_cache_worker, 2, loss, impl, k, stage)
    want_loss, want_grads = _grad_cache_reference(loss, k, dp=2)
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(want_loss, rel=1e-5)
    assert set().union(*(r["grads"] for r in results)) == set(want_grads)  # each rank: its experts
    for res in results:
        assert res["same_routing"] and res["dropped"] > 0
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


# ---- two towers ---------------------------------------------------------------------------------------------
def test_two_tower_twin_matches_the_one_tower_per_token_compute():
    """tiny-2t: each tower the shape of tiny's one tower, so a token of either modality goes
    through the same parameters' worth of compute; the text tower's blocks follow the image's."""
    from limoe_ds.model import build_model, param_counts
    one, two = param_counts(build_model("tiny", device="meta")), param_counts(build_model("tiny-2t", device="meta"))
    for m in ("image", "text"):
        assert two[f"active_params_per_{m}_token"] == one[f"active_params_per_{m}_token"]
    assert two["total_params"] > 1.5 * one["total_params"] and two["expert_params"] == 2 * one["expert_params"]
    model = build_model("tiny-2t")
    assert [b.index for b in model.all_blocks() if b.is_moe] == [1, 3, 5, 7]
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(1, 99, (2, 16)))
    assert [s.layer for s in out.routing] == [1, 3, 5, 7]
    # each tower's pool holds one modality: the image tower routes no text token, and vice versa
    by_layer = {s.layer: s.routed_ME.sum(dim=1) for s in out.routing}  # [image, text] token counts
    assert all(by_layer[i][1] == 0 and by_layer[i][0] > 0 for i in (1, 3))
    assert all(by_layer[i][0] == 0 and by_layer[i][1] > 0 for i in (5, 7))
    # the absent modality's entropy losses are zero, not a constant
    assert out.aux_losses["moe/layer1/text/global_entropy"].item() == 0.0
    assert out.aux_losses["moe/layer5/image/global_entropy"].item() == 0.0


def test_two_tower_towers_differ_in_shape_and_sparsity():
    """A dense text tower of its own width and depth beside a sparse image tower (vmoe's
    contrastive setting); the tensor-parallel plan splits the text tower's blocks too."""
    from limoe_ds.model import build_model
    from limoe_ds.parallel.tp_plan import tp_partition
    cfg = _resolve("model.text_tower={width: 64, depth: 2, mlp_dim: 256, num_heads: 2}").model
    assert cfg.two_tower and cfg.text_tower.moe is None and cfg.num_experts == 4
    model = build_model(cfg)
    assert model.token_embed.weight.shape[1] == 64 and model.text_head.weight.shape == (128, 64)
    assert len(model.moe_layers()) == 2 and [b.index for b in model.text_tower.blocks] == [4, 5]
    assert tp_partition("text_tower.blocks.1.attn.qkv.weight") == tp_partition("blocks.1.attn.qkv.weight")
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(1, 99, (2, 16)))
    assert out.image_emb.shape == out.text_emb.shape == (2, 128)


def test_two_tower_sparse_text_beside_a_dense_image_tower():
    """The other way round: a dense image tower and a sparse text tower. Only the text tower's
    layers route (numbered after the image tower's blocks), their pools hold text only, and the
    per-modality losses of the absent modality are zero."""
    from limoe_ds.model import build_model
    cfg = _resolve("model.preset=tiny-2t", "model.moe=null").model
    assert cfg.moe is None and cfg.text_tower.moe is not None and cfg.num_experts == 4
    model = build_model(cfg)
    assert [b.is_moe for b in model.blocks] == [False] * 4 and [layer.index for layer in model.moe_layers()] == [5, 7]
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(1, 99, (2, 16)))
    assert [s.layer for s in out.routing] == [5, 7] and out.routing and all(k.startswith(("moe/layer5/", "moe/layer7/"))
                                                                           for k in out.aux_losses)
    image_terms = [v for k, v in out.aux_losses.items() if "/image/" in k]
    assert image_terms and all(v.item() == 0.0 for v in image_terms)
    (out.image_emb.sum() + out.text_emb.sum() + sum(out.aux_losses.values())).backward()
    assert all(p.grad is not None for p in model.text_tower.parameters())


def test_two_tower_text_experts_of_their_own_count():
    """The text tower's MoE layers may hold another expert count than the image tower's: its S_m
    derive from it, ep must divide both, and an expert-parallel rank initialises each tower's
    experts by their global index (the full model's)."""
    from limoe_ds.model import build_model
    from limoe_ds.parallel.layout import check_model_layout
    cfg = _resolve("model.preset=tiny-2t", "model.text_tower.moe.num_experts=8").model
    assert cfg.text_tower.moe.global_entropy_min_experts == {"image": 4.0, "text": 2.0}  # E/2 and E/4 of 8
    assert cfg.expert_pools() == [("model.moe.num_experts", 4), ("model.text_tower.moe.num_experts", 8)]
    assert check_model_layout(4, tp=1, ep=4, model=cfg) == []
    assert "ep=8 does not divide model.moe.num_experts=4" in check_model_layout(8, tp=1, ep=8, model=cfg)[0][1]
    full, shard = build_model(cfg, seed=5), build_model(cfg, seed=5, ep_size=4, ep_rank=3)
    for tower, pairs in ((full, ((0, 3),)), (full.text_tower, ((0, 6), (1, 7)))):
        ex = tower.blocks[1].ffn.deepspeed_moe.experts.deepspeed_experts
        mine = (shard if tower is full else shard.text_tower).blocks[1].ffn.deepspeed_moe.experts.deepspeed_experts
        assert len(ex) == (4 if tower is full else 8) and len(mine) == len(pairs)
        for local, global_ in pairs:
            torch.testing.assert_close(mine[local].fc1.weight, ex[global_].fc1.weight, rtol=0, atol=0)
    out = full(torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(1, 99, (2, 16)))
    assert [s.routed_ME.shape[1] for s in out.routing] == [4, 4, 8, 8]


@pytest.mark.parametrize("sets,message", [
    (["model.text_tower={width: 64, depth: 2, mlp_dim: 256, num_heads: 3}"],
     "model.text_tower.num_heads: width 64 is not divisible by num_heads 3"),
    (["model.preset=tiny-2t", "model.text_tower.moe.layers=[5]"], "model.text_tower.moe.layers: block indices [5]"),
    (["model.text_tower={width: 64, depth: 2, mlp_dim: 255, num_heads: 2}", "parallel.tensor_parallel_size=2",
      "parallel.expert_parallel_size=1", "ds.train_batch_size=64"],
     "parallel.tensor_parallel_size: tp=2 does not divide model.text_tower.mlp_dim=255"),
])
def test_two_tower_config_errors_name_the_key(sets, message):
    with pytest.raises(ConfigError) as e:
        _resolve(*sets)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_family_run_trains_resumes_exports_and_evaluates(tmp_path):
    """The members composed, through the real entry point on 2 ranks with expert parallelism 2:
    the two-tower twin tiny-2t (both towers sparse), the sigmoid loss in its ring form, gradient
    caching (gradient_accumulation_steps=2: one loss over 2 micro-batches of 32; the loader's
    batch is 64 per rank). The bias learns; a resume from step 4 continues bitwise (the RNG states
    the recompute replays live within a step); the export holds the text tower and the bias and
    loads; tools/evaluate.py on one rank gives the run's zero-shot numbers;
    tools/analyze_experts.py names each layer's tower. (One launch pair for all three: each
    launch costs ~25 s of the suite's budget.)"""
    steps = 8
    fam = ["model.preset=tiny-2t", "train.loss=sigmoid", "train.loss_impl=ring", "ds.gradient_accumulation_steps=2",
           "ds.train_micro_batch_size_per_gpu=32", "ds.train_batch_size=128"]
    full = _launch(tmp_path / "full", steps, fam)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    resolved = json.loads((tmp_path / "full" / "resolved_config.json").read_text())
    assert resolved["gradient_accumulation_steps"] == 2 and resolved["limoe"]["model"]["text_tower"]["depth"] == 4
    assert resolved["limoe"]["train"]["loss"] == "sigmoid"
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    bias = [r["train/logit_bias"] for r in rows if "train/logit_bias" in r]
    assert len(bias) == steps and bias[-1] != -10.0
    assert any("routing/layer7/text/success_rate" in r for r in rows)
    resumed = _launch(tmp_path / "resumed", steps, [*fam, "eval.zero_shot=[]", "--resume",  # its losses only
                                                    str(tmp_path / "full" / "checkpoints" / "step00000004")])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, steps + 1)) and sorted(b) == list(range(5, steps + 1))
    assert [a[s] for s in b] == [b[s] for s in b]

    sys.path.insert(0, str(ROOT / "tools"))
    import analyze_experts
    ckpt8 = tmp_path / "full" / "checkpoints" / f"step{steps:08d}"
    loaded, got = _export_and_evaluate(ckpt8, tmp_path, rows)
    assert loaded.cfg.two_tower and len(loaded.model.text_tower.blocks) == 4
    assert loaded.model.cfg.logit_bias_init == -10.0 and loaded.logit_bias == pytest.approx(bias[-1], abs=1e-6)
    assert got["dropless/val/contrastive"] > 0  # in-batch (test_held_out_loss_of_a_sigmoid_model_...)
    assert analyze_experts.main(["--checkpoint", str(ckpt8), "--out", str(tmp_path / "experts"),
                                 "--set", "eval.max_batches=1"]) == 0
    report = json.loads((tmp_path / "experts" / "report.json").read_text())
    assert report["towers"] == {"layer1": "image", "layer3": "image", "layer5": "text", "layer7": "text"}
    assert {p.name for p in (tmp_path / "experts").glob("patches_layer*.png")} == {"patches_layer1.png",
                                                                                   "patches_layer3.png"}


# ---- LiT: a locked image tower from an export ---------------------------------------------------------
def _fake_export(out, preset: str = "tiny-2t", seed: int = 7, **model_sets):
    """An exported directory as tools/convert_checkpoint.py writes one (weights, config, tokenizer,
    checksums) of a freshly initialised ``preset``: a LiT source without a training run."""
    import shutil
    from safetensors.torch import save_file
    from limoe_ds.checkpoint import integrity
    from limoe_ds.model import build_model
    from test_train import MINI
    cfg = run_config.model_config({"preset": preset, **model_sets})
    model = build_model(cfg, seed=seed)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    shutil.copyfile(MINI / "tokenizer.json", out / "tokenizer.json")
    (out / "limoe_export.json").write_text(json.dumps(
        {"files": {"model.safetensors": integrity.file_entry(out / "model.safetensors")}}))
    return model.state_dict()


@pytest.mark.parametrize("sets,message", [
    (["train.image_tower=EXPORT"], "train.image_tower: needs a two-tower model"),
    (["model.preset=tiny-2t", "train.image_tower=EXPORT", "model.width=64", "model.mlp_dim=128",
      "model.num_heads=2"], "train.image_tower.init: EXPORT: its width is 128, model.width is 64; the image"),
    (["model.preset=tiny-2t", "train.image_tower=EXPORT", "model.moe.num_experts=8",
      "model.text_tower.moe.num_experts=8"],
     "its image tower has 4 experts per MoE layer, the configured one 8"),
    (["model.preset=tiny-2t", "train.image_tower=EXPORT", "model.moe.layers=[3]"],
     "its MoE layers are blocks [1, 3], the configured image tower's are [3]"),
    (["model.preset=tiny-2t", "train.image_tower={init: EXPORT, unlocked_groups: 7}"],
     "train.image_tower.unlocked_groups: the image tower has 6 groups"),
    (["model.preset=tiny-2t", "train.image_tower={init: EXPORT, lock: false, dropless: true}"],
     "train.image_tower: unlocked_groups and dropless apply to a locked tower"),
    (["model.preset=tiny-2t-dense", "train.image_tower={init: EXPORT, dropless: true}"],
     "train.image_tower.dropless: the image tower has no MoE layers"),
    (["model.preset=tiny-2t", "train.image_tower=/nonexistent"], "train.image_tower.init: '/nonexistent' is not an "
                                                                 "exported model"),
])
def test_lit_config_errors_name_the_mismatch(tmp_path, sets, message):
    _fake_export(tmp_path / "export")
    sets = [s.replace("EXPORT", str(tmp_path / "export")) for s in sets]
    with pytest.raises(ConfigError) as e:
        _resolve(*sets)
    assert message.replace("EXPORT", str(tmp_path / "export")) in str(e.value) and "\n" not in str(e.value)


def test_lit_groups_lock_the_image_tower_and_leave_the_text_tower():
    from limoe_ds.model import build_model, lit
    from limoe_ds.train.engine import param_groups
    init = run_config.ImageTowerInit(init="x", unlocked_groups=2)
    model = build_model(_resolve("model.preset=tiny-2t").model)
    locked = set(lit.lock_image_tower(model, init))
    names = {n for n, _ in model.named_parameters()}
    # the last 2 groups (block 3 + final norm, pooling + head) stay trainable; so does the text side
    assert locked == {n for n in names if n.startswith(("patch_embed.", "image_pos", "blocks.0.", "blocks.1.",
                                                        "blocks.2."))}
    assert any(n.startswith("blocks.1.ffn.deepspeed_moe.experts.") for n in locked)
    in_groups = {id(p) for g in param_groups(model) for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in in_groups} == names - locked
    whole = run_config.ImageTowerInit(init="x")
    assert lit.locked_prefixes(model.cfg, whole) == ("patch_embed.", "image_pos", "blocks.0.", "blocks.1.", "blocks.2.",
                                                     "blocks.3.", "final_ln.", "image_pool.", "image_head.")


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_lit_runs_resumes_reshards_and_exports(tmp_path):
    """LiT through the real entry point on 2 ranks, EP=2: tiny-2t's image tower from an export,
    locked (all but its head group: unlocked_groups=1) and routing dropless, with a DENSE text
    tower, so that no trainable parameter is an expert (DeepSpeed's ZeRO needs
    compat.zero_without_expert_groups). After 4 steps the locked weights are the export's bit for
    bit and the rest changed; the ZeRO shards hold moments for the trainable parameters only; a
    resume from step 2 continues bitwise; reshard to EP=1 keeps the lock (no moments for it, the
    same weights); the export holds the locked tower as it came in."""
    from limoe_ds.checkpoint.convert import read_full_state
    from limoe_ds.checkpoint.reshard import reshard
    from limoe_ds.moe.names import is_expert
    source = _fake_export(tmp_path / "source", **{"text_tower": {"moe": None}})
    sets = ["model.preset=tiny-2t", "model.text_tower.moe=null", "train.save_every=2", "eval.zero_shot=[]",
            f"train.image_tower={{init: {tmp_path / 'source'}, unlocked_groups: 1, dropless: true}}"]
    full = _launch(tmp_path / "full", 4, sets)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    assert "image tower locked:" in out and "MoE layers dropless" in out
    ckpt = tmp_path / "full" / "checkpoints" / "step00000004"
    state = read_full_state(ckpt)
    locked = {n for n in source if n.startswith(("patch_embed.", "image_pos", "blocks.", "final_ln."))}
    assert state.locked == locked and any(is_expert(n) for n in locked)
    for n in locked:
        assert torch.equal(state.weights[n], source[n]), n
    for n in set(source) - locked:
        assert not torch.equal(state.weights[n], source[n]), n  # the text tower, heads, temperature learned
    # Adam's moments for exactly the trainable parameters: none for the locked tower
    assert set(state.exp_avg) == set(source) - locked
    step2 = tmp_path / "full" / "checkpoints" / "step00000002"
    resumed = _launch(tmp_path / "resumed", 4, [*sets, "--resume", str(step2)])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4] and [a[s] for s in b] == [b[s] for s in b]

    reshard(ckpt, tmp_path / "ep1", tp=1, ep=1, world=2)
    moved = read_full_state(tmp_path / "ep1" / "step00000004")
    assert moved.locked == locked and set(moved.exp_avg) == set(state.exp_avg)
    for n, v in state.weights.items():
        assert torch.equal(moved.weights[n], v), n
    for n, v in state.exp_avg.items():
        assert torch.equal(moved.exp_avg[n], v), n
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_checkpoint as convert_tool
    from limoe_ds import load_pretrained
    assert convert_tool.main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    exported = load_pretrained(tmp_path / "export").model.state_dict()
    assert all(torch.equal(exported[n], source[n]) for n in locked)
