"""The contrastive losses: the sigmoid loss (SigLIP) by hand and over 2 and 4 gloo ranks in both
distributed forms, and the choice of loss a model's output makes.

The distributed checks follow tests/test_distributed.py: each rank computes its loss on its
slice of the batch, the gradients are averaged over ranks as DeepSpeed does, and both must equal
the single-process loss on the concatenated batch (fp32; the ranks sum the same terms in another
order, a few ulps).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import data_parallel_average, run_ranks
from limoe_ds.losses import contrastive_loss, gathered_sigmoid_loss, pair_loss, sigmoid_loss


def test_sigmoid_loss_hand_worked_2x2():
    # x1=(1,0), x2=(0,1); y1=(1,0), y2=(0.6,0.8); exp(t)=10, b=-10:
    # logits [[0, -4], [-10, -2]]; loss = (softplus(-0) + softplus(4) + softplus(10) + softplus(-2)) / 2
    # with softplus(-l) = -log sigmoid(l) for the matching pairs and softplus(l) for the others.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    want = 0.5 * (math.log(2) + math.log1p(math.exp(-4)) + math.log1p(math.exp(-10)) + math.log1p(math.exp(2)))
    assert want == pytest.approx(1.4191352592099724, abs=1e-15)
    got = sigmoid_loss(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_sigmoid_loss_is_the_pairwise_binary_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=gen), dim=-1)
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0)
    logits = scale * img @ txt.t() + bias
    labels = torch.eye(6)
    want = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / 6
    torch.testing.assert_close(sigmoid_loss(img, txt, scale, bias), want)
    # an input in bf16 is scored in float32
    low = sigmoid_loss(img.bfloat16(), txt.bfloat16(), scale, bias)
    assert low.dtype == torch.float32


def test_pair_loss_follows_the_model_output():
    from limoe_ds.model.limoe import LIMoEOutput
    gen = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(4, 3, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(4, 3, generator=gen), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    softmax = LIMoEOutput(img, txt, scale, {}, [])
    sigmoid = LIMoEOutput(img, txt, scale, {}, [], bias)
    torch.testing.assert_close(pair_loss(softmax, group=False), contrastive_loss(img, txt, scale))
    torch.testing.assert_close(pair_loss(sigmoid, group=False), sigmoid_loss(img, txt, scale, bias))
    torch.testing.assert_close(pair_loss(sigmoid), sigmoid_loss(img, txt, scale, bias))  # no process group
    with pytest.raises(ValueError, match="train.loss_impl"):
        gathered_sigmoid_loss(img, txt, scale, bias, impl="chunked")


# ---- over gloo ranks -------------------------------------------------------------------------------------
PER_RANK = 3


def _problem(n: int, seed: int = 1):
    torch.manual_seed(0)
    w_img, w_txt = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
    t = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    b = torch.nn.Parameter(torch.tensor(-10.0))
    gen = torch.Generator().manual_seed(seed)
    x_img, x_txt = torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)
    x_txt[:n // 2] = x_img[:n // 2] @ torch.randn(8, 8, generator=gen) * 0.1  # some pairs are easy
    return w_img, w_txt, t, b, x_img, x_txt


def _sigmoid_worker(rank, world, impl):
    w_img, w_txt, t, b, x_img, x_txt = _problem(PER_RANK * world)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        # the loss's own saved tensors only: the towers' are the same for both forms
        img = F.normalize(w_img(x_img[sl]), dim=-1)
        txt = F.normalize(w_txt(x_txt[sl]), dim=-1)
        before = sum(saved)
        loss = gathered_sigmoid_loss(img, txt, t.exp(), b, impl=impl)
        loss_bytes = sum(saved) - before
    loss.backward()
    return {**data_parallel_average(loss, [w_img.weight, w_img.bias, w_txt.weight, w_txt.bias, t, b]),
            "saved_bytes": loss_bytes}


def _single_process(n: int):
    w_img, w_txt, t, b, x_img, x_txt = _problem(n)
    loss = sigmoid_loss(F.normalize(w_img(x_img), dim=-1), F.normalize(w_txt(x_txt), dim=-1), t.exp(), b)
    loss.backward()
    return loss.item(), [p.grad for p in (w_img.weight, w_img.bias, w_txt.weight, w_txt.bias, t, b)]


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_sigmoid_equals_single_process_on_concatenated_batch(world):
    want_loss, want_grads = _single_process(PER_RANK * world)
    saved = {}
    for impl in ("all_gather", "ring"):
        results = run_ranks(_sigmoid_worker, world, impl)
        for res in results:
            assert res["loss"] == pytest.approx(want_loss, rel=1e-6), impl
            for g, w in zip(res["grads"], want_grads):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{impl}: {m}")
        saved[impl] = results[0]["saved_bytes"]
    # the ring keeps the local embeddings only; the gather keeps all W*B captions and B x W*B logits
    assert saved["ring"] < saved["all_gather"]


def _subgroup_sigmoid_worker(rank, world, impl):
    """As with tensor parallelism 2: the data-parallel groups are {0, 2} and {1, 3}, each with its
    own ring (global peers, not group indices) and its own batch, both at once."""
    import torch.distributed as dist
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group, lane = groups[rank % 2], rank % 2
    dp_rank = dist.get_rank(group)
    w_img, w_txt, t, b, x_img, x_txt = _problem(PER_RANK * 2, seed=1 + lane)
    sl = slice(dp_rank * PER_RANK, (dp_rank + 1) * PER_RANK)
    img = F.normalize(w_img(x_img[sl]), dim=-1)
    txt = F.normalize(w_txt(x_txt[sl]), dim=-1)
    loss = gathered_sigmoid_loss(img, txt, t.exp(), b, impl=impl, group=group)
    loss.backward()
    return {**data_parallel_average(loss, [w_img.weight, w_txt.weight, t, b], group=group), "lane": lane}


@pytest.mark.integration
def test_sigmoid_ring_over_data_parallel_subgroups():
    for impl in ("all_gather", "ring"):
        for res in run_ranks(_subgroup_sigmoid_worker, 4, impl):
            w_img, w_txt, t, b, x_img, x_txt = _problem(PER_RANK * 2, seed=1 + res["lane"])
            loss = sigmoid_loss(F.normalize(w_img(x_img), dim=-1), F.normalize(w_txt(x_txt), dim=-1), t.exp(), b)
            loss.backward()
            assert res["loss"] == pytest.approx(loss.item(), rel=1e-6), impl
            for g, w in zip(res["grads"], (w_img.weight.grad, w_txt.weight.grad, t.grad, b.grad)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{impl}: {m}")

