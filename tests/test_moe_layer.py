"""The DeepSpeed-backed LIMoE layer against a loop over tokens and experts."""

import pytest
import torch

from limoe_ds.config.model import MoEConfig
from limoe_ds.moe.layer import LIMoELayer
from limoe_ds.moe.routing import TOKEN_IMAGE, TOKEN_PAD, TOKEN_TEXT

from slow_reference import reference_moe

D, H = 16, 32


def _layer(E=4, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LIMoELayer(D, H, MoEConfig(num_experts=E, layers=(0,), **kw))
    for p in layer.parameters():  # DeepSpeed's Experts deep-copies one expert: decorrelate them
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _pool(S, seed, pad_frac=0.2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, D, generator=gen)
    types = torch.where(torch.rand(S, generator=gen) < 0.5, TOKEN_IMAGE, TOKEN_TEXT)
    types = torch.where(torch.rand(S, generator=gen) < pad_frac, TOKEN_PAD, types)
    return x, types


def _experts(layer):
    return list(layer.deepspeed_moe.experts.deepspeed_experts)


@pytest.mark.parametrize("training,batch_priority,S,E", [(True, True, 37, 4), (True, False, 50, 8),
                                                         (False, True, 23, 4), (True, True, 64, 2)])
def test_layer_equals_loop_reference_forward_and_grad(training, batch_priority, S, E):
    layer = _layer(E=E, batch_priority=batch_priority, capacity_factor=0.5, eval_capacity_factor=0.5,
                   capacity_multiple_of=1)
    layer.train(training)
    x, types = _pool(S, seed=S)
    x1 = x.clone().requires_grad_(True)
    torch.manual_seed(99)
    y, routing, stats = layer(x1, types)
    capacity = stats.capacity
    # The layer's only random draw is the router noise: regenerate it from the same seed.
    torch.manual_seed(99)
    noise = torch.randn(S, E) * (1.0 / E) if training else None
    x2 = x.clone().requires_grad_(True)
    y_ref, kept = reference_moe(x2, types, layer.gate.wg.weight, _experts(layer), capacity,
                                batch_priority=batch_priority, noise_SE=noise)
    assert routing.kept_N.tolist() == kept
    assert not all(kept[i] for i in range(S) if types[i] != TOKEN_PAD), "test should exercise dropping"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    # gradients w.r.t. input, router and expert weights (no aux loss: pure layer output)
    g = torch.randn(S, D, generator=torch.Generator().manual_seed(5))
    params = [x1, layer.gate.wg.weight] + [p for e in _experts(layer) for p in e.parameters()]
    grads = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    params_ref = [x2, layer.gate.wg.weight] + [p for e in _experts(layer) for p in e.parameters()]
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params_ref, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        if a is None or b is None:
            assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropped_and_padding_tokens_output_exactly_zero():
    layer = _layer(capacity_factor=0.25)  # C = ceil(0.25 * 40 / 4) = 3 -> 4 slots per expert
    x, types = _pool(40, seed=3)
    y, routing, stats = layer(x, types)
    assert stats.capacity == 4
    dropped = ~routing.kept_N
    assert dropped.sum() > (types == TOKEN_PAD).sum(), "some real tokens must be dropped"
    assert torch.count_nonzero(y[dropped]) == 0
    assert torch.count_nonzero(y[routing.kept_N].abs().sum(-1)) == routing.kept_N.sum()


def test_padding_changes_nothing_at_fixed_capacity():
    layer = _layer(noise_std=0.0)
    layer.static_capacity = lambda num_slots, capacity_factor, image_slots=None: 4  # fixed capacity for both pools
    x, types = _pool(30, seed=11, pad_frac=0.0)
    y, r, _ = layer(x, types)
    pad_x = torch.randn(12, D) * 10
    x2 = torch.cat([x[:10], pad_x[:6], x[10:], pad_x[6:]])
    t2 = torch.cat([types[:10], torch.zeros(6, dtype=torch.long), types[10:], torch.zeros(6, dtype=torch.long)])
    y2, r2, _ = layer(x2, t2)
    real = t2 != TOKEN_PAD
    assert torch.equal(y2[real], y)
    assert torch.equal(r2.kept_N[real], r.kept_N)
    assert torch.count_nonzero(y2[~real]) == 0


def test_capacity_counts_padding_slots_so_ranks_agree():
    # Two ranks with the same micro-batch shape but different numbers of real text tokens must
    # get the same capacity (the all-to-all needs it): C comes from slots, not from real tokens.
    layer = _layer(capacity_factor=1.0)
    x, _ = _pool(48, seed=1)
    few_pads = torch.tensor([TOKEN_IMAGE] * 32 + [TOKEN_TEXT] * 14 + [TOKEN_PAD] * 2)
    many_pads = torch.tensor([TOKEN_IMAGE] * 32 + [TOKEN_TEXT] * 3 + [TOKEN_PAD] * 13)
    assert layer(x, few_pads)[2].capacity == layer(x, many_pads)[2].capacity == 12  # ceil(48/4)


def test_router_math_is_float32_in_bf16_model():
    layer = _layer().to(torch.bfloat16)
    x, types = _pool(32, seed=2)
    y, routing, _ = layer(x.to(torch.bfloat16), types)
    assert y.dtype == torch.bfloat16
    assert routing.combine_N.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in routing.aux.values())


def test_eval_is_dropless_by_default():
    layer = _layer(capacity_factor=0.25).eval()
    x, types = _pool(64, seed=4)
    _, routing, _ = layer(x, types)
    assert torch.equal(routing.kept_N, types != TOKEN_PAD)


def test_l_aux_is_the_sum_of_named_losses():
    layer = _layer()
    x, types = _pool(40, seed=8)
    _, routing, _ = layer(x, types)
    assert len(routing.aux) == 6
    torch.testing.assert_close(layer.deepspeed_moe.l_aux, sum(routing.aux.values()))


def test_ep_size_must_divide_experts():
    with pytest.raises(ValueError, match="not divisible by the expert-parallel size 3"):
        LIMoELayer(D, H, MoEConfig(num_experts=4, layers=(0,)), ep_size=3)


@pytest.mark.parametrize("tp,multiple", [(1, 4), (2, 4), (3, 4), (8, 4), (3, 1)])
def test_capacity_is_a_multiple_of_tp_for_deepspeeds_token_split(tp, multiple):
    """DeepSpeed splits the capacity slots over tensor-parallel ranks (drop_tokens): C % tp == 0,
    also in dropless evaluation, where C is the largest expert load."""
    import math
    from limoe_ds.parallel.tp_plan import moe_capacity_multiple
    layer = LIMoELayer(D, H, MoEConfig(num_experts=4, layers=(0,), capacity_multiple_of=multiple,
                                       eval_capacity_factor=None))
    layer.capacity_multiple_of = moe_capacity_multiple(multiple, tp)  # what tp_plan.apply sets
    step = math.lcm(multiple, tp)
    for S in (1, 7, 37, 100):
        layer.train()
        assert layer.static_capacity(S, layer.capacity_factor()) % step == 0
        layer.eval()
        x, types = _pool(S, seed=S, pad_frac=0.0)
        _, routing, stats = layer(x, types)
        assert stats.capacity % step == 0 and stats.capacity >= int(routing.kept_N.sum() > 0)
