"""Multi-process (gloo, CPU) equivalence suite: every parallel layout computes the same model.

- the gathered contrastive loss and its gradients on 2 data-parallel ranks equal the
  single-process loss on the concatenated batch;
- TP=2, EP=2, DP=2 (2 ranks) and TP=2 x EP=2, TP=2 x DP=2 (4 ranks), through the DeepSpeed engine
  at ZeRO 0, 1 and 2, equal ONE process holding the whole model (every expert, every head): the
  losses, the gradients before clipping, the global gradient norm, and the parameters after
  several AdamW steps with clipping. Router noise is on: each data-parallel rank draws its own
  (seeded per step and data-parallel rank, the reference draws the same per routing pool) and
  tensor-parallel peers must make identical routing decisions.

Tolerances: fp32 throughout; the parallel runs sum the same terms in another order (gather,
all-reduce of averaged gradients, all-to-all, the row-parallel all-reduce of partial matmuls),
which moves results by a few ulps. Step 0's gradients (identical weights) agree to 2e-6 absolute
(gradients are O(1)); losses to 1e-5 relative. After an AdamW step the weights differ by ulps,
except that Adam's first update is ~lr*sign(g) also for entries whose gradient is at
rounding-noise level (ADAM_EPS below bounds that), so later gradients agree to 3e-5 absolute and
parameters after 3 steps (lr 1e-3) to 5e-6 absolute (measured worst: 7e-7).
"""

from __future__ import annotations

import re

import pytest
import torch

from dist_utils import data_parallel_average, run_ranks

pytestmark = pytest.mark.integration  # every test runs gloo ranks (run_ranks)

STEPS, B = 3, 4
# Adam divides by sqrt(v) + eps: for an entry whose gradient is itself ~1e-7 (a rarely used token
# row, without clipping) a rounding-level difference would flip a ~lr-sized update; eps 1e-4
# keeps such updates proportional to the gradient, so parameters stay comparable at 2e-5.
ADAM_EPS = 1e-4


# ---- gathered contrastive loss ----------------------------------------------------------------------
def _features(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)


def _contrastive_worker(rank, world):
    import torch.nn.functional as F
    from limoe_ds.losses import gathered_contrastive_loss
    torch.manual_seed(0)
    w_img, w_txt = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
    scale = torch.nn.Parameter(torch.tensor(7.0))
    x_img, x_txt = _features(1, 5 * world)
    sl = slice(rank * 5, (rank + 1) * 5)
    loss = gathered_contrastive_loss(F.normalize(w_img(x_img[sl]), dim=-1), F.normalize(w_txt(x_txt[sl]), dim=-1),
                                     scale)
    loss.backward()
    return data_parallel_average(loss, [w_img.weight, w_img.bias, w_txt.weight, scale])


def test_gathered_contrastive_equals_single_process_on_concatenated_batch():
    import torch.nn.functional as F
    from limoe_ds.losses import contrastive_loss
    results = run_ranks(_contrastive_worker, 2)
    torch.manual_seed(0)
    w_img, w_txt = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
    scale = torch.nn.Parameter(torch.tensor(7.0))
    x_img, x_txt = _features(1, 10)
    loss = contrastive_loss(F.normalize(w_img(x_img), dim=-1), F.normalize(w_txt(x_txt), dim=-1), scale)
    loss.backward()
    want = [w_img.weight.grad, w_img.bias.grad, w_txt.weight.grad, scale.grad]
    for res in results:
        assert res["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for g, w in zip(res["grads"], want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


# ---- every layout through the DeepSpeed engine ----------------------------------------------------------
def _model_cfg(preset: str = "tiny"):
    """A preset, capacity-limited; 'NAME+modality_capacity': with moe.modality_capacity on."""
    from limoe_ds.config.model import get_preset
    preset, _, option = preset.partition("+")
    cfg = get_preset(preset)
    if option:
        setattr(cfg.moe, option, True)
    cfg.moe.capacity_factor = 1.0  # capacity-limited: drops happen, per routing pool, as in the reference
    if cfg.text_tower is not None:
        cfg.text_tower.moe.capacity_factor = 1.0
    return cfg


def _ds_config(stage: int, clip: float, dp: int) -> dict:
    return {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "train_batch_size": dp * B,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": ADAM_EPS,
                                                      "weight_decay": 0.1, "torch_adam": True}},
            "gradient_clipping": clip, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}


def _batch(step: int, dp_rank: int, cfg):
    gen = torch.Generator().manual_seed(100 * step + dp_rank)
    images = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    tokens = torch.randint(1, cfg.vocab_size, (B, cfg.text_len), generator=gen)
    lengths = torch.randint(1, cfg.text_len + 1, (B, 1), generator=gen)
    return images, tokens.masked_fill(torch.arange(cfg.text_len) >= lengths, 0)


def _noise_seed(step: int, dp_rank: int) -> int:
    return 7919 * step + dp_rank  # router noise of this step's routing pool on this data-parallel rank


def _routing_tensors(routing) -> dict:
    """Each MoE layer's counts and capacity as named tensors (for bitwise comparisons)."""
    out = {}
    for s in routing:
        names = ("routed", "kept", "entropy", "probs")
        out.update({f"layer{s.layer}/{k}": t.clone() for k, t in zip(names, s.counts())})
        out[f"layer{s.layer}/capacity"] = torch.tensor(s.capacity)
    return out


def _global_name(name: str, ep_rank: int, num_local: int) -> str:
    return re.sub(r"deepspeed_experts\.(\d+)\.",
                  lambda m: f"deepspeed_experts.{ep_rank * num_local + int(m.group(1))}.", name)


# (tp, ep, ZeRO stage, gradient clipping, preset) per world size. DeepSpeed's ZeRO-0 clipping is
# wrong with sharded experts (it averages per-rank norms; run_config rejects that combination), so
# ZeRO 0 runs without clipping there. tiny-2t: the two-tower twin (both towers sparse) through
# tensor and expert parallelism at once; +modality_capacity: per-modality expert budgets.
LAYOUTS = {
    2: [(2, 1, 0, 1.0, "tiny"), (2, 1, 1, 1.0, "tiny"), (2, 1, 2, 1.0, "tiny"),   # TP=2
        (1, 2, 0, 0.0, "tiny"), (1, 2, 1, 1.0, "tiny"), (1, 2, 2, 1.0, "tiny"),   # EP=2
        (1, 2, 1, 1.0, "tiny+modality_capacity"),                                 # EP=2, per-modality budgets
        (1, 1, 0, 1.0, "tiny"), (1, 1, 2, 1.0, "tiny")],                          # DP=2
    4: [(2, 2, 0, 0.0, "tiny"), (2, 2, 1, 1.0, "tiny"), (2, 2, 2, 1.0, "tiny"),   # TP=2 x EP=2
        (2, 1, 1, 1.0, "tiny"), (2, 1, 2, 1.0, "tiny"),                           # TP=2 x DP=2
        (2, 2, 1, 1.0, "tiny-2t")],                                               # two towers, TP=2 x EP=2
}
CASES = [(world, *lay) for world, lays in LAYOUTS.items() for lay in lays]


def _layout_worker(rank, world, layouts):
    from deepspeed.utils import safe_get_full_grad
    from limoe_ds.train.engine import build_engine
    from limoe_ds import parallel
    from limoe_ds.losses import gathered_contrastive_loss
    from limoe_ds.model import build_model
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups
    results = {}
    for tp, ep, stage, clip, preset in layouts:
        cfg = _model_cfg(preset)
        layout = parallel.Layout(rank=rank, world_size=world, ep=ep, tp=tp)
        parallel.setup(layout)
        model = parallel.parallelize(build_model(cfg, ep_size=ep, ep_rank=layout.ep_rank, seed=0), layout)
        num_local = cfg.moe.num_experts // ep
        init = {_global_name(n, layout.ep_rank, num_local): p.detach().clone() for n, p in model.named_parameters()}
        tagged = {n: (p.partition_dim, p.partition_stride) for n, p in model.named_parameters()
                  if getattr(p, "tensor_model_parallel", False)}
        numel = sum(p.numel() for p in model.parameters())
        engine, _ = build_engine(model, _ds_config(stage, clip, layout.dp))
        fp32_partition = (sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
                          if stage > 0 else None)
        moe = model.moe_layers()[0]
        groups = {"tp": dist.get_process_group_ranks(parallel.state().mpu.get_tensor_model_parallel_group()),
                  "dp": dist.get_process_group_ranks(ds_groups._get_data_parallel_group()),
                  "ep": dist.get_process_group_ranks(moe.deepspeed_moe.ep_group) if ep > 1 else [rank],
                  "edp": dist.get_process_group_ranks(ds_groups._get_expert_data_parallel_group(moe.expert_group_name))}
        steps = []
        for step in range(STEPS):
            images, tokens = _batch(step, layout.dp_rank, cfg)
            torch.manual_seed(_noise_seed(step, layout.dp_rank))
            out = engine(images, tokens)
            loss = gathered_contrastive_loss(out.image_emb, out.text_emb, out.logit_scale,
                                             group=parallel.data_parallel_group()) + sum(out.aux_losses.values())
            engine.backward(loss)
            grads = {_global_name(n, layout.ep_rank, num_local): safe_get_full_grad(p).clone()
                     for n, p in engine.module.named_parameters()}
            engine.step()
            engine.module.clamp_logit_scale_()
            norm = engine.get_global_grad_norm()  # None under ZeRO 0 (DeepSpeed does not record it)
            steps.append({"loss": loss.item(), "grads": grads, "norm": None if norm is None else float(norm),
                          "routing": _routing_tensors(out.routing)})
        params = {_global_name(n, layout.ep_rank, num_local): p.detach().clone()
                  for n, p in engine.module.named_parameters()}
        results[(tp, ep, stage, clip, preset)] = {"steps": steps, "params": params, "tp_rank": layout.tp_rank,
                                          "dp_rank": layout.dp_rank, "init": init, "tagged": tagged,
                                          "groups": groups, "layout": layout, "numel": numel,
                                          "fp32_partition": fp32_partition}
    parallel.teardown()
    return results


def _reference(dp: int, clip: float, preset: str):
    """One process holding the whole model; each data-parallel rank's micro-batch is its own routing pool."""
    from limoe_ds.train.engine import weight_decay_split
    from limoe_ds.losses import contrastive_loss
    from limoe_ds.model import build_model
    cfg = _model_cfg(preset)
    model = build_model(cfg, seed=0)
    decay, no_decay = weight_decay_split(model)
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3,
                            betas=(0.9, 0.98), eps=ADAM_EPS, weight_decay=0.1)
    steps = []
    for step in range(STEPS):
        outs = []
        for r in range(dp):
            torch.manual_seed(_noise_seed(step, r))
            outs.append(model(*_batch(step, r, cfg)))
        img = torch.cat([o.image_emb for o in outs])
        txt = torch.cat([o.text_emb for o in outs])
        aux = sum(sum(o.aux_losses.values()) for o in outs) / dp  # DeepSpeed averages the ranks' losses
        loss = contrastive_loss(img, txt, outs[0].logit_scale) + aux
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")).item()
        opt.step()
        model.clamp_logit_scale_()
        steps.append({"loss": loss.item(), "grads": grads, "norm": norm})
    return steps, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def layout_results():
    """{world: per-rank results}; one process start-up per world size for all its layouts."""
    return {world: run_ranks(_layout_worker, world, lays) for world, lays in LAYOUTS.items()}


@pytest.fixture(scope="module")
def references():
    return {(dp, clip, preset): _reference(dp, clip, preset)
            for dp, clip, preset in {(w // tp, c, m) for w, tp, _, _, c, m in CASES}}


def _local(full: torch.Tensor, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """This tp rank's part of a full reference tensor."""
    from limoe_ds.parallel.tp_plan import tp_partition, tp_shard
    split = tp_partition(name) if tp > 1 else None
    return full if split is None else tp_shard(full, *split, tp, tp_rank)


def _name(world, tp, ep, stage, clip, preset):
    kind = " x ".join(f"{k}={v}" for k, v in (("TP", tp), ("EP", ep), ("DP", world // tp // ep)) if v > 1)
    return f"{kind} ZeRO-{stage} clip={clip}" + ("" if preset == "tiny" else f" {preset}")


@pytest.mark.parametrize("world,tp,ep,stage,clip,preset", CASES, ids=[_name(*c) for c in CASES])
def test_layout_equals_single_process(layout_results, references, world, tp, ep, stage, clip, preset):
    key = (tp, ep, stage, clip, preset)
    ref_steps, ref_params = references[(world // tp, clip, preset)]
    results = [res[key] for res in layout_results[world]]
    for step, want in enumerate(ref_steps):
        # a rank's loss is its local InfoNCE rows + its pool's aux; their mean is the global loss
        mean_loss = sum(r["steps"][step]["loss"] for r in results) / len(results)
        assert mean_loss == pytest.approx(want["loss"], rel=1e-5), step
    for rank, run in enumerate(results):
        for step, (got, want) in enumerate(zip(run["steps"], ref_steps)):
            atol = 2e-6 if step == 0 else 3e-5  # see the module docstring
            assert set(got["grads"]) <= set(want["grads"])
            for name, g in got["grads"].items():
                torch.testing.assert_close(g, _local(want["grads"][name], name, tp, run["tp_rank"]), rtol=1e-4,
                                           atol=atol, msg=f"rank {rank} step {step} grad {name}")
            if stage > 0:  # ZeRO 0's clipping is checked through the parameters below
                assert got["norm"] == pytest.approx(want["norm"], rel=1e-5), (rank, step)
        for name, p in run["params"].items():
            torch.testing.assert_close(p, _local(ref_params[name], name, tp, run["tp_rank"]), rtol=0, atol=5e-6,
                                       msg=f"rank {rank} {name}")


@pytest.mark.parametrize("world,tp,ep,stage,clip,preset", [c for c in CASES if c[1] > 1],
                         ids=[_name(*c) for c in CASES if c[1] > 1])
def test_tensor_parallel_peers_route_identically_and_stay_in_sync(layout_results, world, tp, ep, stage, clip,
                                                                 preset):
    from limoe_ds.parallel.tp_plan import tp_partition
    results = layout_results[world]
    key = (tp, ep, stage, clip, preset)
    for a, b in zip(results[0::tp], results[1::tp]):  # ranks 2d and 2d+1 are tp peers
        ra, rb = a[key], b[key]
        assert ra["dp_rank"] == rb["dp_rank"] and (ra["tp_rank"], rb["tp_rank"]) == (0, 1)
        for sa, sb in zip(ra["steps"], rb["steps"]):
            assert sa["routing"].keys() == sb["routing"].keys() and sa["routing"]
            for k in sa["routing"]:
                assert torch.equal(sa["routing"][k], sb["routing"][k]), k
        for name, p in ra["params"].items():
            if tp_partition(name) is None:  # replicated: bitwise equal on both peers
                assert torch.equal(p, rb["params"][name]), name
            else:
                assert not torch.equal(p, rb["params"][name]), name


def test_expert_parallel_ranks_hold_disjoint_experts_and_identical_shared_params(layout_results):
    key = (1, 2, 2, 1.0, "tiny")
    p0, p1 = layout_results[2][0][key]["params"], layout_results[2][1][key]["params"]
    experts0 = {n for n in p0 if "deepspeed_experts" in n}
    experts1 = {n for n in p1 if "deepspeed_experts" in n}
    assert experts0.isdisjoint(experts1) and len(experts0) == len(experts1) > 0
    for name in set(p0) & set(p1):
        assert torch.equal(p0[name], p1[name]), name


@pytest.mark.parametrize("world,tp,ep,stage,clip,preset", CASES, ids=[_name(*c) for c in CASES])
def test_process_groups_and_initialisation(layout_results, world, tp, ep, stage, clip, preset):
    """The groups DeepSpeed and megatron-core use are the layout's; the expert group is never a
    tensor-parallel group; every rank starts from its part of the same full model; megatron's
    split tags agree with tp_partition (used by init, consolidation and resharding)."""
    from limoe_ds.model import build_model
    full = {n: p.detach() for n, p in build_model(_model_cfg(preset), seed=0).named_parameters()}
    for rank, res in enumerate(layout_results[world]):
        run = res[(tp, ep, stage, clip, preset)]
        lay = run["layout"]
        want = {"tp": lay.group_of(lay.tp_groups()), "dp": lay.group_of(lay.dp_groups()),
                "ep": lay.group_of(lay.ep_groups()), "edp": lay.group_of(lay.expert_data_groups())}
        assert run["groups"] == want, rank
        assert tp == 1 or run["groups"]["ep"] != run["groups"]["tp"] or ep == 1
        for name, p in run["init"].items():
            assert torch.equal(p, _local(full[name], name, tp, run["tp_rank"])), (rank, name)
        from limoe_ds.parallel.tp_plan import tp_partition
        assert run["tagged"] == ({n: tp_partition(n) for n in full if tp_partition(n)} if tp > 1 else {})


@pytest.mark.parametrize("world,tp,ep,stage,clip,preset", [c for c in CASES if c[3] > 0],
                         ids=[_name(*c) for c in CASES if c[3] > 0])
def test_memory_estimator_counts_what_each_rank_holds(layout_results, world, tp, ep, stage, clip, preset):
    """tools/model_summary.py --layout: parameters per rank exactly; the fp32 master partition that
    ZeRO gives each rank (the optimizer state is 3x it) to within DeepSpeed's alignment padding."""
    from limoe_ds.parallel.memory import estimate
    est = estimate(_model_cfg(preset), tp=tp, ep=ep, dp=world // tp, zero_stage=stage, bf16=False)
    for run in (res[(tp, ep, stage, clip, preset)] for res in layout_results[world]):
        assert run["numel"] == est.params_per_rank
        edp = tp * (world // tp) // ep
        want = est.shared_params_per_rank / (world // tp) + est.expert_params_per_rank / edp
        assert want <= run["fp32_partition"] <= want * 1.001 + 64, (run["fp32_partition"], want)
        assert est.optimizer_gib == pytest.approx(12 * want / 2 ** 30, abs=1e-3)
