"""The one-tower model: API, joint routing pool, presets, parameter counts, configs, init."""

import json
import math

import pytest
import torch

from limoe_ds.config.model import MoEConfig, ModelConfig, config_from_dict, get_preset
from limoe_ds.losses import contrastive_loss
from limoe_ds.model import build_model, param_counts


def _batch(cfg, B=4, seed=0, lengths=(16, 5, 1, 9)):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    tokens = torch.randint(1, cfg.vocab_size, (B, cfg.text_len), generator=gen)
    for i, n in enumerate(lengths[:B]):
        tokens[i, n:] = cfg.pad_id
    return images, tokens


def test_forward_api_shapes_norms_and_named_aux():
    model = build_model("tiny")
    images, tokens = _batch(model.cfg)
    out = model(images, tokens)
    assert out.image_emb.shape == out.text_emb.shape == (4, 128)
    torch.testing.assert_close(out.image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_emb.norm(dim=-1), torch.ones(4))
    assert out.logit_scale.item() == pytest.approx(10.0)
    expected = {f"moe/layer{i}/{k}" for i in (1, 3) for k in (
        "importance", "load", "image/local_entropy", "text/local_entropy", "image/global_entropy",
        "text/global_entropy")}
    assert set(out.aux_losses) == expected
    # the training step: contrastive + the sum of the named aux losses, in one line
    loss = contrastive_loss(out.image_emb, out.text_emb, out.logit_scale) + sum(out.aux_losses.values())
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0
    router = model.blocks[1].ffn.gate.wg.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_image_and_text_tokens_share_one_routing_pool():
    model = build_model("tiny")
    images, tokens = _batch(model.cfg)
    out = model(images, tokens)
    n_real_text = int((tokens != 0).sum())
    assert [s.layer for s in out.routing] == [1, 3]
    for s in out.routing:
        assert s.routed_ME[0].sum().item() == 4 * 16  # image: B * patches
        assert s.routed_ME[1].sum().item() == n_real_text
        # C = ceil(1.0 * B * (I + T) / E) = ceil(4 * 32 / 4) = 32: padding slots count, padding is not routed
        assert s.capacity == 32


def test_joint_pool_makes_modalities_compete_for_capacity():
    # With a tight capacity, routing text alone keeps more text tokens than routing it beside
    # images; if the pools were separate the counts would agree.
    cfg = get_preset("tiny")
    cfg.moe.capacity_factor = 0.25
    cfg.moe.noise_std = 0.0
    model = build_model(cfg)
    with torch.no_grad():  # bias the layer-1 router so both modalities prefer expert 0
        model.blocks[1].ffn.gate.wg.weight[0] += 0.5
    images, tokens = _batch(cfg, lengths=(16, 16, 16, 16))
    joint = model(images, tokens).routing[0].kept_ME[1].sum()  # layer 1, text
    alone = model(None, tokens).routing[0].kept_ME[1].sum()
    assert alone > joint


def test_dropless_eval_embeddings_do_not_depend_on_the_batch():
    # Capacity-limited routing couples samples; dropless evaluation must not.
    model = build_model("tiny").eval()
    images, tokens = _batch(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens)[2:3], model.encode_text(tokens[2:3]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_image(images)[1:2], model.encode_image(images[1:2]),
                                   rtol=1e-5, atol=1e-6)


def test_encoders_match_joint_forward_in_dropless_eval():
    model = build_model("tiny").eval()
    images, tokens = _batch(model.cfg)
    with torch.no_grad():
        out = model(images, tokens)
        torch.testing.assert_close(model.encode_image(images), out.image_emb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_text(tokens), out.text_emb, rtol=1e-5, atol=1e-6)


def test_all_padding_caption_is_finite():
    model = build_model("tiny")
    tokens = torch.zeros(2, 16, dtype=torch.long)
    assert torch.isfinite(model.encode_text(tokens)).all()


def test_map_pooling_variant_runs():
    cfg = get_preset("tiny")
    cfg.pooling = "map"
    model = build_model(cfg)
    images, tokens = _batch(cfg)
    out = model(images, tokens)
    assert torch.isfinite(out.image_emb).all() and torch.isfinite(out.text_emb).all()


def test_logit_scale_clamped_after_step_not_in_forward():
    model = build_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert model(*_batch(model.cfg)).logit_scale.item() == pytest.approx(500.0, rel=1e-5)
    model.clamp_logit_scale_()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_init_is_layout_independent_and_experts_differ():
    full = build_model("tiny", seed=3)
    shard1 = build_model("tiny", seed=3, ep_size=2, ep_rank=1)
    ex_full = full.blocks[1].ffn.deepspeed_moe.experts.deepspeed_experts
    ex_shard = shard1.blocks[1].ffn.deepspeed_moe.experts.deepspeed_experts
    assert len(ex_shard) == 2
    for local, global_ in ((0, 2), (1, 3)):
        torch.testing.assert_close(ex_shard[local].fc1.weight, ex_full[global_].fc1.weight, rtol=0, atol=0)
    assert not torch.equal(ex_full[0].fc1.weight, ex_full[1].fc1.weight)
    torch.testing.assert_close(shard1.token_embed.weight, full.token_embed.weight, rtol=0, atol=0)
    other_seed = build_model("tiny", seed=4)
    assert not torch.equal(other_seed.token_embed.weight, full.token_embed.weight)


# ---- presets and parameter counts -----------------------------------------------------------------
def _counts(name):
    return param_counts(build_model(name, device="meta"))


@pytest.mark.parametrize("name,total,active,total_tol,active_round", [
    ("b16", 0.5e9, 0.1e9, 0.05, 1),      # paper: ~0.5B total, ~0.1B per token
    ("l16", 1.7e9, 0.3e9, 0.05, 1),      # paper: ~1.7B total, ~0.3B per token
])
def test_param_counts_match_paper_b16_l16(name, total, active, total_tol, active_round):
    c = _counts(name)
    assert abs(c["total_params"] / total - 1) <= total_tol
    assert round(c["active_params_per_token"] / 1e9, active_round) == active / 1e9


def test_param_counts_match_paper_h14():
    c = _counts("h14")  # paper: ~5.6B total, ~675M per token
    assert abs(c["total_params"] / 5.6e9 - 1) <= 0.05
    assert abs(c["active_params_per_token"] / 675e6 - 1) <= 0.05


@pytest.mark.parametrize("name", ["tiny", "s32", "b16", "l16", "h14"])
def test_dense_twin_has_the_same_per_token_compute(name):
    moe, dense = _counts(name), _counts(f"{name}-dense")
    cfg = get_preset(name)
    router_params = len(cfg.moe.layers) * cfg.width * cfg.moe.num_experts
    assert dense["total_params"] == dense["active_params_per_token"]
    assert moe["active_params_per_token"] - dense["total_params"] == router_params


def test_tiny_preset_shape():
    cfg = get_preset("tiny")
    assert (cfg.width, cfg.depth, cfg.moe.num_experts, cfg.image_size, cfg.patch_size, cfg.text_len) == \
        (128, 4, 4, 32, 8, 16)


# ---- configuration errors -------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(image_size=30), "model.image_size: 30 is not divisible by patch_size 8"),
    (dict(num_heads=3), "model.num_heads: width 128 is not divisible by num_heads 3"),
    (dict(pooling="cls"), "model.pooling"),
    (dict(pad_id=5000), "model.pad_id"),
    (dict(moe=MoEConfig(num_experts=4, layers=(7,))), r"moe.layers: block indices \[7\] are outside"),
])
def test_model_config_errors_name_the_key(kw, match):
    base = get_preset("tiny").to_dict()
    base.pop("moe") if "moe" in kw else None
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**{k: v for k, v in base.items() if k != "moe"}, "moe": base.get("moe"), **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts=1), "moe.num_experts"),
    (dict(capacity_factor=0), "moe.capacity_factor"),
    (dict(local_entropy_weight={"audio": 1.0}), r"moe.local_entropy_weight: unknown modality \['audio'\]"),
    (dict(global_entropy_min_experts={"text": 9}), "moe.global_entropy_min_experts.text"),
])
def test_moe_config_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{"num_experts": 4, "layers": (0,), **kw})


def test_unknown_keys_are_rejected_with_valid_keys_listed():
    d = get_preset("tiny").to_dict()
    with pytest.raises(ValueError, match="model.widht: unknown key; valid keys are"):
        config_from_dict({**d, "widht": 3})
    d["moe"]["capacity"] = 2
    with pytest.raises(ValueError, match="moe.capacity: unknown key"):
        config_from_dict(d)


def test_unknown_preset():
    with pytest.raises(ValueError, match="model.preset: unknown preset 'b32'"):
        get_preset("b32")


def test_spec_default_entropy_thresholds():
    cfg = get_preset("h14").moe  # E = 32: S_text = 8, S_image = 16
    assert cfg.global_entropy_threshold("text") == pytest.approx(math.log(8))
    assert cfg.global_entropy_threshold("image") == pytest.approx(math.log(16))
    assert get_preset("tiny").moe.global_entropy_min_experts == {"image": 2, "text": 2}


def test_config_round_trips_through_json():
    cfg = get_preset("b16")
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
