"""Golden values (worked by hand in the comments) and a slow reference for the pure router."""

import math

import pytest
import torch

from limoe_ds.config.model import MoEConfig
from limoe_ds.moe.routing import (TOKEN_IMAGE, TOKEN_PAD, TOKEN_TEXT, expert_capacity, load_loss, route_top1,
                                  top1_assign, top1_assign_budgets, z_loss)

from slow_reference import (global_entropy_loss, importance_loss, local_entropy_loss, reference_top1_assign,
                            reference_top1_assign_budgets)

LOG2, LOG4 = math.log(2), math.log(4)


# ---- capacity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,E,cf,k,mult,expected", [
    (10, 4, 1.0, 1, 4, 4),      # ceil(2.5) = 3 -> 4
    (100, 8, 1.0, 1, 4, 16),    # ceil(12.5) = 13 -> 16
    (100, 8, 1.0, 1, 1, 13),    # no rounding
    (100, 8, 1.0, 2, 4, 28),    # ceil(25) = 25 -> 28
    (64, 4, 0.5, 1, 4, 8),      # 8 exactly
    (64, 4, 1.25, 1, 6, 24),    # ceil(20) = 20 -> 24 (a tp=6-style multiple)
    (3, 32, 1.0, 1, 4, 4),      # ceil(0.09) = 1 -> 4
])
def test_expert_capacity_golden(n, E, cf, k, mult, expected):
    assert expert_capacity(n, E, cf, k=k, multiple_of=mult) == expected


@pytest.mark.parametrize("args", [(0, 4, 1.0), (10, 0, 1.0), (10, 4, 0.0), (10, 4, -1.0)])
def test_expert_capacity_rejects_non_positive(args):
    with pytest.raises(ValueError, match="must be positive"):
        expert_capacity(*args)


# ---- top-1 assignment and BPR --------------------------------------------------------------------
# Five valid tokens, two experts, capacity 2, plus an invalid (padding) token t5 that would win
# everything if it were routed.
#        probs          top-1  priority
#   t0 [0.60, 0.40]     e0     0.60
#   t1 [0.90, 0.10]     e0     0.90
#   t2 [0.30, 0.70]     e1     0.70
#   t3 [0.80, 0.20]     e0     0.80
#   t4 [0.45, 0.55]     e1     0.55
#   t5 [0.99, 0.01]     --     (invalid)
PROBS = torch.tensor([[.6, .4], [.9, .1], [.3, .7], [.8, .2], [.45, .55], [.99, .01]])
VALID = torch.tensor([True, True, True, True, True, False])


def test_bpr_golden_priority_beats_token_order():
    # BPR order: t1 (.9), t3 (.8), t2 (.7), t0 (.6), t4 (.55).
    # e0 buffer: t1 -> 0, t3 -> 1, t0 -> 2 (over capacity 2: dropped). e1 buffer: t2 -> 0, t4 -> 1.
    expert, position, kept = top1_assign(PROBS, VALID, 2, batch_priority=True)
    assert expert.tolist() == [0, 0, 1, 0, 1, -1]
    assert position.tolist() == [2, 0, 0, 1, 1, -1]
    assert kept.tolist() == [False, True, True, True, True, False]


def test_no_bpr_golden_token_order_wins():
    # Token order: e0 buffer t0 -> 0, t1 -> 1, t3 -> 2 (dropped); e1 buffer t2 -> 0, t4 -> 1.
    expert, position, kept = top1_assign(PROBS, VALID, 2, batch_priority=False)
    assert position.tolist() == [0, 1, 0, 2, 1, -1]
    assert kept.tolist() == [True, True, True, False, True, False]


def test_ties_lowest_expert_and_token_order():
    # Every token has probs [.5, .5]: expert 0 (lowest index); equal priorities keep token order.
    probs = torch.full((3, 2), 0.5)
    expert, position, kept = top1_assign(probs, torch.ones(3, dtype=torch.bool), 2, batch_priority=True)
    assert expert.tolist() == [0, 0, 0]
    assert position.tolist() == [0, 1, 2]
    assert kept.tolist() == [True, True, False]


def test_dropless_keeps_every_valid_token():
    expert, position, kept = top1_assign(PROBS, VALID, None, batch_priority=True)
    assert kept.tolist() == VALID.tolist()


def _random_case(gen, N, E):
    # Integer logits in {0, 1, 2} make ties in both argmax and priority frequent.
    logits = torch.randint(0, 3, (N, E), generator=gen).float()
    probs = torch.softmax(logits, -1)
    valid = torch.rand(N, generator=gen) > 0.25
    capacity = int(torch.randint(1, max(2, N // E + 2), (1,), generator=gen))
    return probs, valid, capacity


@pytest.mark.parametrize("batch_priority", [True, False])
def test_vectorised_assign_equals_slow_reference(batch_priority):
    gen = torch.Generator().manual_seed(1234)
    for trial in range(300):
        N = int(torch.randint(1, 40, (1,), generator=gen))
        E = int(torch.randint(2, 9, (1,), generator=gen))
        probs, valid, capacity = _random_case(gen, N, E)
        got = top1_assign(probs, valid, capacity, batch_priority=batch_priority)
        want = reference_top1_assign(probs, valid, capacity, batch_priority=batch_priority)
        for g, w, name in zip(got, want, ("expert", "position", "kept")):
            assert g.tolist() == w, f"trial {trial}: {name} differs (N={N}, E={E}, C={capacity})"


# ---- modality-aware capacity (moe.modality_capacity) ---------------------------------------------------
def test_modality_budgets_golden_text_keeps_its_slots():
    """Four image patches sure of expert 0 (p .9) and two captions' tokens less sure (p .6): with one
    shared buffer of 2 slots BPR gives both to image patches and drops the text; with budgets
    (image 2, text 2) the text keeps its 2 slots, after the image budget (positions 2, 3)."""
    probs = torch.tensor([[.9, .1]] * 4 + [[.6, .4]] * 2 + [[.7, .3]])
    types = torch.tensor([TOKEN_IMAGE] * 4 + [TOKEN_TEXT] * 2 + [TOKEN_PAD])
    _, _, shared = top1_assign(probs, types != TOKEN_PAD, 2, batch_priority=True)
    assert shared.tolist() == [True, True, False, False, False, False, False]
    expert, position, kept = top1_assign_budgets(probs, types, (2, 2), batch_priority=True)
    assert expert.tolist() == [0, 0, 0, 0, 0, 0, -1]
    assert position.tolist() == [0, 1, 2, 3, 2, 3, -1] and kept.tolist() == [True, True, False, False, True, True,
                                                                             False]
    # a zero budget drops every token of that modality, and only those
    assert top1_assign_budgets(probs, types, (4, 0), batch_priority=True)[2].tolist() == [True] * 4 + [False] * 3


@pytest.mark.parametrize("batch_priority", [True, False])
def test_vectorised_budgets_equal_slow_reference(batch_priority):
    gen = torch.Generator().manual_seed(4321)
    for trial in range(300):
        N = int(torch.randint(1, 40, (1,), generator=gen))
        E = int(torch.randint(2, 9, (1,), generator=gen))
        probs, _, _ = _random_case(gen, N, E)
        types = torch.randint(0, 3, (N,), generator=gen)
        budgets = tuple(int(c) for c in torch.randint(0, max(2, N // E + 2), (2,), generator=gen))
        got = top1_assign_budgets(probs, types, budgets, batch_priority=batch_priority)
        want = reference_top1_assign_budgets(probs, types, budgets, batch_priority=batch_priority)
        for g, w, name in zip(got, want, ("expert", "position", "kept")):
            assert g.tolist() == w, f"trial {trial}: {name} differs (N={N}, E={E}, budgets={budgets})"
        # same expert choice as the shared buffer; a kept token's slot lies in its modality's budget
        shared = top1_assign(probs, types != TOKEN_PAD, None, batch_priority=batch_priority)
        assert got[0].tolist() == shared[0].tolist()
        pos, kept, text = got[1], got[2], types == TOKEN_TEXT
        assert bool(((pos < budgets[0]) | ~kept | text).all() and ((pos >= budgets[0]) | ~kept | ~text).all())


def test_modality_capacity_layer_budgets_and_dispatch():
    """The layer's budgets come from each modality's slots (text padding counted, so equal on every
    expert-parallel rank); the buffer holds both; a dense pool with one modality has one budget;
    the output of a kept token is its expert's, a dropped one's 0, as with the shared buffer."""
    from limoe_ds.config.model import get_preset
    from limoe_ds.moe.layer import LIMoELayer
    cfg = get_preset("tiny").moe
    cfg.modality_capacity = True
    layer = LIMoELayer(16, 32, cfg)
    assert layer.static_capacity(4 * 64 + 4 * 16, 1.0, image_slots=4 * 64) == (64, 16)
    assert layer.static_capacity(4 * 16, 1.0, image_slots=0) == (0, 16)
    assert layer.static_capacity(320, None, image_slots=256) is None  # dropless: no budgets
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    types = torch.tensor([TOKEN_IMAGE] * 24 + [TOKEN_TEXT] * 12 + [TOKEN_PAD] * 4)
    layer.train()
    y, routing, stats = layer(x, types, 0.5)
    assert stats.capacity == sum(layer.static_capacity(40, 0.5, image_slots=24)) == 8  # (4, 4)
    text_kept = routing.kept_N & (types == TOKEN_TEXT)
    assert bool((routing.position_N[text_kept] >= 4).all()) and bool((y[~routing.kept_N] == 0).all())
    counted = layer(x, types, 0.5)[2].capacity  # image slots counted from the token types: the same budgets
    assert counted == stats.capacity


# ---- auxiliary losses ----------------------------------------------------------------------------
def test_importance_loss_golden():
    assert importance_loss(torch.full((6, 4), 0.25), torch.ones(6, dtype=torch.bool)).item() == 0.0
    # imp = [0.8 + 0.6, 0.2 + 0.4] = [1.4, 0.6]; mean 1.0; population var = 0.4^2 = 0.16; cv^2 = 0.16.
    # The invalid third token [1, 0] must not count.
    probs = torch.tensor([[.8, .2], [.6, .4], [1., 0.]])
    valid = torch.tensor([True, True, False])
    assert importance_loss(probs, valid).item() == pytest.approx(0.16, abs=1e-6)


def test_load_loss_golden():
    # sigma = 1. Token a: clean [1, 0], noisy [1, 0] -> thr 1 -> P = [1-Phi(0), 1-Phi(1)] = [.5, .158655]
    # Token b: clean [0, 0], noisy [.5, -.2] -> thr .5 -> P = [1-Phi(.5)] * 2 = [.308538, .308538]
    # load = [.404269, .233596]; mean .318933; pop var .0072823; cv^2 = .0071593 / ... = 0.0715927
    logits = torch.tensor([[1., 0.], [0., 0.], [5., -5.]])
    noisy = torch.tensor([[1., 0.], [.5, -.2], [5., -5.]])
    valid = torch.tensor([True, True, False])
    assert load_loss(logits, noisy, 1.0, valid).item() == pytest.approx(0.0715927, abs=1e-6)
    # Symmetric logits and noise -> equal load -> 0.
    sym = torch.tensor([[0., 0.]])
    assert load_loss(sym, torch.tensor([[.1, -.1]]), 0.1, torch.tensor([True])).item() == pytest.approx(0.0, abs=1e-7)


def test_local_entropy_golden():
    ones = torch.ones(3, dtype=torch.bool)
    assert local_entropy_loss(torch.full((3, 4), 0.25), ones).item() == pytest.approx(LOG4, abs=1e-6)
    assert local_entropy_loss(torch.eye(4)[:3], ones).item() == pytest.approx(0.0, abs=1e-7)
    # mean of H([.5,.5,0,0]) = log 2 and H(one-hot) = 0 -> log(2)/2; the masked-out third token is ignored
    probs = torch.tensor([[.5, .5, 0, 0], [1., 0, 0, 0], [.25, .25, .25, .25]])
    mask = torch.tensor([True, True, False])
    assert local_entropy_loss(probs, mask).item() == pytest.approx(LOG2 / 2, abs=1e-6)


def test_global_entropy_golden():
    ones = torch.ones(4, dtype=torch.bool)
    # Collapse onto one expert: H(mean p) = 0 -> loss = log S = log 4 = 1.386.
    collapsed = torch.tensor([[1., 0, 0, 0]] * 4)
    assert global_entropy_loss(collapsed, ones, LOG4).item() == pytest.approx(1.3862944, abs=1e-6)
    # Spread evenly over 4 >= S = 4 experts (each token confident): H(mean) = log 4 -> 0.
    assert global_entropy_loss(torch.eye(4), ones, LOG4).item() == pytest.approx(0.0, abs=1e-6)
    # Spread over 2 of 4 with S = 4: log 4 - log 2 = log 2.
    two = torch.tensor([[1., 0, 0, 0], [0, 1., 0, 0]] * 2)
    assert global_entropy_loss(two, ones, LOG4).item() == pytest.approx(LOG2, abs=1e-6)
    # ... but with S = 2 the same spread costs nothing.
    assert global_entropy_loss(two, ones, LOG2).item() == pytest.approx(0.0, abs=1e-6)
    # No token of the modality: no loss (not log S).
    assert global_entropy_loss(collapsed, torch.zeros(4, dtype=torch.bool), LOG4).item() == 0.0


def test_z_loss_golden():
    # logsumexp of 4 zeros = log 4; squared = 1.921812
    assert z_loss(torch.zeros(5, 4), torch.ones(5, dtype=torch.bool)).item() == pytest.approx(1.9218121, abs=1e-6)


# ---- route_top1 ----------------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(num_experts=4, layers=(0,), importance_weight=0.005, load_weight=0.005,
                local_entropy_weight=0.01, global_entropy_weight=0.01)
    return MoEConfig(**{**base, **kw})


def test_route_top1_combine_weights_and_noise():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 4, generator=gen)
    noise = torch.randn(20, 4, generator=gen) * 0.25
    types = torch.tensor([TOKEN_IMAGE] * 10 + [TOKEN_TEXT] * 6 + [TOKEN_PAD] * 4)
    r = route_top1(logits, types, _cfg(), capacity=3, noise_NE=noise)
    noisy_p = torch.softmax(logits + noise, -1)
    # selection and combine weight from the NOISY probabilities (V-MoE), not renormalised
    valid = types != TOKEN_PAD
    assert torch.equal(r.expert_N[valid], noisy_p.argmax(-1)[valid])
    want = noisy_p.gather(1, r.expert_N.clamp(min=0)[:, None])[:, 0] * r.kept_N
    torch.testing.assert_close(r.combine_N, want)
    assert (r.combine_N[~r.kept_N] == 0).all()
    # every expert holds at most C tokens; padding never kept
    assert torch.bincount(r.expert_N[r.kept_N], minlength=4).max() <= 3
    assert not r.kept_N[~valid].any()
    # aux: every named term present, load only because noise is on
    assert set(r.aux) == {"importance", "load", "image/local_entropy", "text/local_entropy",
                          "image/global_entropy", "text/global_entropy"}
    r_eval = route_top1(logits, types, _cfg(), capacity=3, noise_NE=None)
    assert "load" not in r_eval.aux


def test_route_top1_stats_are_counts_per_modality():
    logits = torch.randn(30, 4)
    types = torch.tensor([TOKEN_IMAGE] * 16 + [TOKEN_TEXT] * 10 + [TOKEN_PAD] * 4)
    r = route_top1(logits, types, _cfg(), capacity=4, noise_NE=None)
    assert r.routed_ME[0].sum().item() == 16  # image
    assert r.routed_ME[1].sum().item() == 10  # text
    kept = r.kept_ME.sum(dim=0)
    assert kept.sum().item() == r.kept_N.sum().item()
    assert (kept <= 4).all()


def test_route_top1_dropless_capacity_is_max_load():
    logits = torch.tensor([[5., 0, 0, 0]] * 7 + [[0, 5., 0, 0]] * 2)
    types = torch.full((9,), TOKEN_IMAGE)
    r = route_top1(logits, types, _cfg(), capacity=None)
    assert r.kept_N.all()
    assert r.max_load() == 7


def test_padding_at_fixed_capacity_changes_nothing():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(24, 4, generator=gen)
    types = torch.tensor([TOKEN_IMAGE] * 16 + [TOKEN_TEXT] * 8)
    base = route_top1(logits, types, _cfg(), capacity=4)
    # Insert 10 padding tokens with huge logits at random places among the text tokens.
    pad_logits = torch.full((10, 4), 50.0)
    logits2 = torch.cat([logits[:16], pad_logits[:5], logits[16:20], pad_logits[5:], logits[20:]])
    types2 = torch.cat([types[:16], torch.zeros(5, dtype=torch.long), types[16:20],
                        torch.zeros(5, dtype=torch.long), types[20:]])
    padded = route_top1(logits2, types2, _cfg(), capacity=4)
    real = types2 != TOKEN_PAD
    for field in ("expert_N", "position_N", "kept_N", "combine_N"):
        assert torch.equal(getattr(padded, field)[real], getattr(base, field)), field
    for k in base.aux:
        torch.testing.assert_close(padded.aux[k], base.aux[k])


@pytest.mark.parametrize("seed", range(5))
def test_fused_aux_losses_equal_the_reference_functions(seed):
    # route_top1 computes the losses for both modalities at once; they must equal the public,
    # one-loss-at-a-time definitions (values and gradients w.r.t. the logits).
    gen = torch.Generator().manual_seed(seed)
    N, E = 50, 8
    cfg = MoEConfig(num_experts=E, layers=(0,), importance_weight=0.3, load_weight=0.2, z_loss_weight=0.1,
                    local_entropy_weight={"image": 0.5, "text": 0.7},
                    global_entropy_weight={"image": 0.9, "text": 1.1},
                    global_entropy_min_experts={"image": 8, "text": 6})
    types = torch.randint(0, 3, (N,), generator=gen)
    if seed == 0:
        types[types == TOKEN_TEXT] = TOKEN_IMAGE  # a pool with no text token at all
    logits = torch.randn(N, E, generator=gen).requires_grad_(True)
    noise = torch.randn(N, E, generator=gen) / E
    got = route_top1(logits, types, cfg, capacity=8, noise_NE=noise).aux
    probs, valid = torch.softmax(logits, -1), types != TOKEN_PAD
    img, txt = types == TOKEN_IMAGE, types == TOKEN_TEXT
    want = {"importance": 0.3 * importance_loss(probs, valid),
            "load": 0.2 * load_loss(logits, logits + noise, 1.0 / E, valid),
            "z_loss": 0.1 * z_loss(logits, valid),
            "image/local_entropy": 0.5 * local_entropy_loss(probs, img),
            "text/local_entropy": 0.7 * local_entropy_loss(probs, txt),
            "image/global_entropy": 0.9 * global_entropy_loss(probs, img, math.log(8)),
            "text/global_entropy": 1.1 * global_entropy_loss(probs, txt, math.log(6))}
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
        g1, = torch.autograd.grad(got[k], logits, retain_graph=True)
        g2, = torch.autograd.grad(want[k], logits, retain_graph=True)
        torch.testing.assert_close(g1, g2, msg=k)
