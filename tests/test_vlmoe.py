"""VL-MoE (model.moe.modality_experts): each MoE layer holds an image pool and a text pool with
routers of their own; a token is routed in its modality's pool only. NAME-vlmoe puts them in the
preset's early MoE layers with the shared dense FFN at the top."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from limoe_ds.config.errors import ConfigError
from limoe_ds.config.model import get_preset
from limoe_ds.model import build_model
from limoe_ds.model.limoe import param_counts
from limoe_ds.moe import collapse, stats
from limoe_ds.moe.names import local_experts
from limoe_ds.parallel.layout import check_model_layout
from test_collapse import _resolve
from test_train import _launch, _losses


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 4000, (4, 16), generator=gen)
    tokens[:, 11:] = 0  # 5 padding positions per caption
    return torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1, tokens


def test_the_vlmoe_twin_has_two_pools_in_the_early_layers():
    cfg = get_preset("tiny-vlmoe")
    assert cfg.moe.modality_experts and cfg.moe.layers == (1,)  # block 3, the top third, is dense
    assert get_preset("b16-vlmoe").moe.layers == tuple(range(8)) and get_preset("tiny-vlmoe-clippo").pixels
    model, tiny = build_model(cfg), build_model("tiny")
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.1.ffn.")]
    assert {n.split(".")[3] for n in names} == {"image", "text"}
    assert [(layer.index, layer.pool) for layer in model.moe_layers()] == [(1, "image"), (1, "text")]
    a, b = param_counts(model), param_counts(tiny)
    # tiny: 4 experts in blocks 1 and 3; tiny-vlmoe: 4 + 4 in block 1 and a dense FFN in block 3
    assert a["total_params"] == 2_302_465 and a["expert_params"] == b["expert_params"] == 1_053_696
    assert a["active_params_per_token"] == b["active_params_per_token"]  # one expert MLP per token per layer
    p = dict(model.named_parameters())  # each pool initialised from its own names
    assert not torch.equal(p["blocks.1.ffn.image.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"],
                           p["blocks.1.ffn.text.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"])


def test_a_pool_never_receives_the_other_modality():
    model = build_model("tiny-vlmoe")
    images, tokens = _batch()
    out = model(images, tokens)
    img, txt = out.routing
    assert (img.label, txt.label) == ("layer1.image", "layer1.text")
    assert img.routed_ME.sum(dim=1).tolist() == [4 * 16, 0]  # every patch, no text
    assert txt.routed_ME.sum(dim=1).tolist() == [0, 4 * 11]  # every non-padding position, no image
    assert {"moe/layer1.image/importance", "moe/layer1.text/importance", "moe/layer1.text/text/global_entropy",
            "moe/layer1.image/image/local_entropy"} <= set(out.aux_losses)
    summary = stats.summarize(stats.accumulate({}, out.routing))
    assert list(summary) == ["layer1.image", "layer1.text"] and summary["layer1.text"]["image"]["routed_tokens"] == 0
    assert set(collapse.thresholds(model.moe_layers(), None)) == {"layer1.image", "layer1.text"}


def test_text_embeddings_do_not_depend_on_the_images_even_at_a_capacity_factor():
    """LIMoE's one pool couples the modalities through capacity (image patches can take the text
    tokens' slots); VL-MoE's pools do not: a caption's embedding with or without images in the
    batch is the same at capacity factor 0.5, and so is an image's."""
    model = build_model("tiny-vlmoe").eval()
    images, tokens = _batch(1)
    with torch.no_grad():
        both = model(images, tokens, 0.5)
        torch.testing.assert_close(both.text_emb, model.encode_text(tokens, 0.5), rtol=0, atol=0)
        torch.testing.assert_close(both.image_emb, model.encode_image(images, 0.5), rtol=0, atol=0)
        assert [s.label for s in model(None, tokens, 0.5).routing] == ["layer1.text"]  # the image pool skipped


def _uneven(**kw):
    """tiny-vlmoe with E_image = 4 and E_text = 2 (model.moe.text_experts)."""
    cfg = get_preset("tiny-vlmoe")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, text_experts=2, global_entropy_min_experts=None,
                                                            **kw))


def test_pools_of_different_sizes_route_count_and_initialise_by_global_expert():
    """E_image != E_text: each pool's router, experts, S_m, statistics and collapse thresholds are
    of its own count; an expert-parallel rank's local experts of each pool are the full model's
    global ones (the same seed gives the same model at any ep); one expert per token is active."""
    cfg = _uneven()
    assert cfg.moe.global_entropy_min_experts == {"image": 2.0, "text": 2.0}  # S_text = max(2, E_text / 4)
    assert cfg.expert_pools() == [("model.moe.num_experts", 4), ("model.moe.text_experts", 2)]
    model = build_model(cfg, seed=3)
    img, txt = model.blocks[1].ffn.pools()
    assert (img.gate.wg.out_features, txt.gate.wg.out_features) == (4, 2)
    assert [len(p.deepspeed_moe.experts.deepspeed_experts) for p in (img, txt)] == [4, 2]
    assert txt.cfg.global_entropy_min_experts == {"image": 2.0, "text": 2.0} and img.cfg is cfg.moe
    images, tokens = _batch()
    out = model(images, tokens)
    a, b = out.routing
    assert a.routed_ME.shape == (2, 4) and b.routed_ME.shape == (2, 2) and b.routed_ME.sum().item() == 4 * 11
    summary = stats.summarize(stats.accumulate({}, out.routing))
    assert len(summary["layer1.text"]["image_share_per_expert"]) == 2
    assert collapse.thresholds(model.moe_layers(), None)["layer1.text"]["text"] == 2.0
    even = param_counts(build_model("tiny-vlmoe", device="meta"))
    counts = param_counts(build_model(cfg, device="meta"))
    one_expert = even["expert_params"] // 8  # 4 + 4 experts of the same MLP in block 1
    assert counts["expert_params"] == 6 * one_expert  # and 2 experts and 2 router rows fewer in all:
    assert counts["total_params"] == even["total_params"] - 2 * one_expert - 2 * cfg.width
    for key in ("active_params_per_token", "active_params_per_text_token"):  # one expert MLP; a smaller router
        assert counts[key] == even[key] - 2 * cfg.width, key
    assert counts["active_params_per_image_token"] == even["active_params_per_image_token"]
    shard = build_model(cfg, seed=3, ep_size=2, ep_rank=1)  # image experts 2, 3 and text expert 1
    for pool, pairs in (("image", ((0, 2), (1, 3))), ("text", ((0, 1),))):
        full_ex = getattr(model.blocks[1].ffn, pool).deepspeed_moe.experts.deepspeed_experts
        shard_ex = getattr(shard.blocks[1].ffn, pool).deepspeed_moe.experts.deepspeed_experts
        assert len(shard_ex) == len(pairs)
        for local, global_ in pairs:
            torch.testing.assert_close(shard_ex[local].fc1.weight, full_ex[global_].fc1.weight, rtol=0, atol=0)
    assert local_experts(cfg, "blocks.1.ffn.text.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight", 2) == 1
    assert local_experts(cfg, "blocks.1.ffn.image.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight", 2) == 2
    odd = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, text_experts=3))
    assert check_model_layout(2, tp=1, ep=2, model=odd) == [("parallel.expert_parallel_size", (
        "ep=2 does not divide model.moe.text_experts=3 (every expert pool is sharded over the expert-parallel group); "
        "use a common divisor of the pools' counts"))]
    assert check_model_layout(2, tp=1, ep=2, model=cfg) == []


@pytest.mark.parametrize("sets, message", [
    (["model.moe.text_experts=2"], "model.moe.text_experts: sizes VL-MoE's text pool: set model.moe.modality_experts"),
    (["model.preset=tiny-vlmoe", "model.moe.text_experts=1"], "model.moe.text_experts: must be an integer >= 2"),
    (["model.preset=tiny-vlmoe", "model.moe.text_experts=2", "model.moe.global_entropy_min_experts={text: 3}"],
     "model.moe.global_entropy_min_experts.text: S must be in [1, text_experts=2]"),
    (["model.preset=tiny-vlmoe", "model.moe.text_experts=2", "logging.router_collapse.min_experts={text: 3}"],
     "logging.router_collapse.min_experts.text: must be <= model.moe.text_experts=2"),
    (["model.moe.modality_experts=true", "model.moe.modality_capacity=true"],
     "model.moe.modality_capacity: splits one shared pool's buffers by modality"),
    (["model.preset=tiny-2t", "model.moe.modality_experts=true"], "model.moe.modality_experts: needs one tower"),
    (["model.preset=tiny-vmoe", "model.moe.modality_experts=true", "tokenizer=null"], "needs one tower"),
    (["model.preset=tiny-2t-vlmoe"], "unknown preset 'tiny-2t-vlmoe'"),
    (["model.preset=tiny-vlmoe", "parallel.expert_parallel_size=3"], "expert_parallel_size"),
])
def test_vlmoe_config_errors_name_the_key(sets, message):
    with pytest.raises((ConfigError, ValueError)) as e:
        _resolve(*sets)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_vlmoe_clippo_runs_with_both_pools_sharded_resumes_exports_and_evaluates(tmp_path):
    """tiny-vlmoe-clippo (VL-MoE's pools, CLIPPO's rendered captions: one run for both family
    members) with pools of different sizes (model.moe.text_experts) on 2 ranks with expert
    parallelism 2 (the image pool's 4 experts split 2 + 2, the text pool's 2 split 1 + 1): routing
    statistics per pool and modality, a bitwise resume from step 2, an export whose weights are the
    consolidated checkpoint's (two expert modules per block) and that loads without tokenizer.json,
    and tools/evaluate.py on one rank giving the run's zero-shot numbers (no tokenizer anywhere:
    the run, the export and the evaluation render their captions); the checkpoint resharded to
    expert-parallel 1 and back keeps both pools bit for bit."""
    from limoe_ds.data.render import PixelText
    from test_family import _export_and_evaluate
    sets = ["model.preset=tiny-vlmoe-clippo", "model.moe.text_experts=2", "tokenizer=null", "train.save_every=2"]
    full = _launch(tmp_path / "full", 4, sets)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    routed = [r for r in rows if "routing/layer1.image/image/success_rate" in r]
    assert routed and all(r["routing/layer1.text/text/success_rate"] > 0 for r in routed)
    assert not any("routing/layer1.image/text/" in k or "routing/layer1.text/image/" in k for r in rows for k in r)
    assert any("aux/moe/layer1.text/importance" in r for r in rows)
    resumed = _launch(tmp_path / "resumed", 4, [*sets, "eval.zero_shot=[]", "--resume",
                                                str(tmp_path / "full" / "checkpoints" / "step00000002")])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4] and [a[s] for s in b] == [b[s] for s in b]
    ckpt = tmp_path / "full" / "checkpoints" / "step00000004"
    loaded, _ = _export_and_evaluate(ckpt, tmp_path, rows)
    assert [(layer.index, layer.pool) for layer in loaded.model.moe_layers()] == [(1, "image"), (1, "text")]
    # resharded to expert-parallel 1 and back to 2: both pools' experts and Adam moments bit for bit
    from limoe_ds.checkpoint.convert import read_full_state
    from test_convert import _same_state, convert_tool
    ep1, ep2 = tmp_path / "ep1", tmp_path / "ep2"
    assert convert_tool.main(["reshard", str(ckpt), str(ep1), "--ep", "1", "--world", "2"]) == 0
    assert convert_tool.main(["reshard", str(ep1 / "step00000004"), str(ep2), "--ep", "2", "--world", "2"]) == 0
    source = read_full_state(ckpt)
    assert {k.split(".deepspeed_moe")[0] for k in source.weights if ".experts." in k} == {
        "blocks.1.ffn.image", "blocks.1.ffn.text"}
    assert {pool: {int(k.split("deepspeed_experts.")[1].split(".")[0]) for k in source.weights
                   if f".ffn.{pool}.deepspeed_moe.experts." in k} for pool in ("image", "text")} == {
        "image": {0, 1, 2, 3}, "text": {0, 1}}  # single-device (global) expert names
    for out, ep in ((ep1, 1), (ep2, 2)):
        state = read_full_state(out / "step00000004")
        assert state.layout.ep == ep and _same_state(source, state), out
    assert not (tmp_path / "export" / "tokenizer.json").exists() and isinstance(loaded.tokenizer, PixelText)
    assert loaded.zero_shot_classifier(["shirt", "bag"], ["a photo of a {}."]).shape == (2, loaded.cfg.embed_dim)
    assert loaded.tokenize(["a bag"]).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name,world", [("s32", 8), ("b16", 32), ("l16", 64), ("h14", 256)])
def test_vlmoe_gpu_configs_are_their_preset_with_per_modality_pools(name, world):
    """ds_configs/NAME_vlmoe.json: NAME.json in every key but the preset and the run directory;
    validated for its cluster (each pool's experts divide over the expert-parallel group), and its
    memory estimate fits an 80 GB GPU."""
    from limoe_ds.config import run as run_config
    from limoe_ds.parallel.memory import estimate
    from test_train import ROOT
    base = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    vl = json.loads((ROOT / "ds_configs" / f"{name}_vlmoe.json").read_text())
    assert vl["limoe"]["model"].pop("preset") == f"{name}-vlmoe" and base["limoe"]["model"].pop("preset") == name
    assert vl["limoe"]["train"].pop("run_dir") == f"runs/{name}_vlmoe"
    base["limoe"]["train"].pop("run_dir")
    assert vl == base
    cfg = run_config.load(ROOT / "ds_configs" / f"{name}_vlmoe.json", world_size=world, check_paths=False)
    assert cfg.model.moe.modality_experts
    tp, ep = cfg.parallel.tensor_parallel_size, cfg.parallel.expert_parallel_size
    mem = estimate(cfg.model, tp=tp, ep=ep, dp=world // tp, zero_stage=cfg.deepspeed["zero_optimization"]["stage"],
                   micro_batch=cfg.micro_batch_size, activation_checkpointing=cfg.train.activation_checkpointing)
    assert mem.total_gib < 80, mem
