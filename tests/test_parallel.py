"""The parallel layout without processes: group membership, validation, tensor-parallel splits,
and layout-independent initialisation (the multi-process equivalence suite is test_distributed)."""

from __future__ import annotations

import pytest
import torch

from limoe_ds.parallel.layout import Layout, check_layout
from limoe_ds.parallel.tp_plan import tp_partition, tp_shard, tp_unshard


def _families(layout_cls=Layout, **kw):
    world = kw["world_size"]
    layouts = [layout_cls(rank=r, **kw) for r in range(world)]
    return layouts, layouts[0]


def test_groups_for_tp2_ep2_dp4_by_hand():
    lay = Layout(rank=0, world_size=8, ep=2, tp=2)
    assert lay.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.dp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay.ep_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert lay.expert_data_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("world,tp,ep", [(8, 2, 2), (8, 2, 4), (16, 4, 2), (8, 1, 4), (4, 2, 1), (12, 2, 3)])
def test_group_families_partition_the_world_and_agree_with_rank_coordinates(world, tp, ep):
    layouts, lay = _families(world_size=world, tp=tp, ep=ep)
    for family in (lay.tp_groups(), lay.dp_groups(), lay.ep_groups(), lay.expert_data_groups()):
        assert sorted(r for g in family for r in g) == list(range(world))
    for g in lay.tp_groups():  # tp peers: consecutive, same data
        assert g == list(range(g[0], g[0] + tp)) and len({layouts[r].dp_rank for r in g}) == 1
    for g in lay.ep_groups():  # exchange tokens: one tp lane, distinct ep positions, never a tp group
        assert len({layouts[r].tp_rank for r in g}) == 1
        assert sorted(layouts[r].ep_rank for r in g) == list(range(ep))
        assert tp == 1 or g not in lay.tp_groups()
    for g in lay.expert_data_groups():  # same experts, across every lane and run
        assert len({layouts[r].ep_rank for r in g}) == 1 and len(g) == tp * (world // tp) // ep
        assert {layouts[r].tp_rank for r in g} == set(range(tp))


def test_layout_validation_messages():
    assert check_layout(8, tp=2, ep=2, num_experts=8, num_heads=12, mlp_dim=3072) == []
    # one message per rule, with the config key it is about (the run config and the estimate use them)
    assert check_layout(8, tp=3, ep=1) == [("parallel.tensor_parallel_size", "world size 8 is not divisible by tp=3")]
    key, msg = check_layout(8, tp=2, ep=3)[0]
    assert key == "parallel.expert_parallel_size" and msg.startswith("ep=3 does not divide the data-parallel size 4")
    assert ("parallel.expert_parallel_size", "ep=4 does not divide model.moe.num_experts=6; use a divisor of 6") \
        in check_layout(8, tp=1, ep=4, num_experts=6)
    assert ("parallel.tensor_parallel_size", "tp=8 does not divide model.num_heads=12; use a divisor of 12") \
        in check_layout(8, tp=8, ep=1, num_heads=12)
    assert ("parallel.tensor_parallel_size", "tp=8 does not divide model.mlp_dim=100; use a divisor of 100") \
        in check_layout(8, tp=8, ep=1, mlp_dim=100)
    assert check_layout(4, tp=1, ep=2, dense=True) == [
        ("parallel.expert_parallel_size", "the model has no MoE layer (dense twin); set it to 1")]
    with pytest.raises(ValueError, match="data-parallel size"):
        Layout(rank=0, world_size=6, ep=4, tp=1)


def test_tp_partition_rules():
    assert tp_partition("blocks.0.attn.qkv.weight") == (0, 3)
    assert tp_partition("blocks.11.attn.qkv.bias") == (0, 3)
    assert tp_partition("blocks.0.attn.proj.weight") == (1, 1)
    assert tp_partition("blocks.0.attn.proj.bias") is None  # added once, after the all-reduce
    assert tp_partition("blocks.2.ffn.fc1.bias") == (0, 1)
    assert tp_partition("blocks.2.ffn.fc2.weight") == (1, 1)
    assert tp_partition("blocks.3.ffn.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight") is None
    assert tp_partition("image_pool.mlp.fc1.weight") is None
    assert tp_partition("token_embed.weight") is None


def test_strided_shard_gives_each_rank_its_own_heads_q_k_v():
    H, Dh, D, tp = 4, 2, 3, 2
    full = torch.arange(3 * H * Dh * D, dtype=torch.float32).view(3 * H * Dh, D)
    parts = [tp_shard(full, 0, 3, tp, r) for r in range(tp)]
    q, k, v = full.view(3, H, Dh, D)
    for r, part in enumerate(parts):
        lq, lk, lv = part.view(3, H // tp, Dh, D)
        heads = slice(r * H // tp, (r + 1) * H // tp)
        assert torch.equal(lq, q[heads]) and torch.equal(lk, k[heads]) and torch.equal(lv, v[heads])
    assert torch.equal(tp_unshard(parts, 0, 3), full)
    cols = [tp_shard(full, 1, 1, 3, r) for r in range(3)]
    assert torch.equal(tp_unshard(cols, 1, 1), full) and cols[1].shape == (3 * H * Dh, 1)


def test_every_entry_of_the_tp_plan_names_linears_of_the_model():
    from torch import nn
    from limoe_ds.model import build_model
    from limoe_ds.parallel.tp_plan import TP_PLAN, style_of
    model = build_model("tiny", device="meta")
    planned = {name: m for name, m in model.named_modules() if style_of(name) is not None}
    # 4 blocks: qkv + proj each; fc1 + fc2 only in the dense blocks 0 and 2 (1 and 3 are MoE)
    assert sorted(planned) == sorted([f"blocks.{i}.attn.{k}" for i in range(4) for k in ("qkv", "proj")]
                                     + [f"blocks.{i}.ffn.{k}" for i in (0, 2) for k in ("fc1", "fc2")])
    assert all(isinstance(m, nn.Linear) for m in planned.values())
    for key in TP_PLAN:
        assert any(style_of(name) is TP_PLAN[key] for name in planned), key
