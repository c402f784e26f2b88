"""The DeepSpeed engine: the default process group, optimizer groups, ``deepspeed.initialize``, one step.

The model stays a plain module (limoe_ds.model; parallelism applied by limoe_ds.parallel); this
module starts the default process group, splits the parameters into optimizer groups (no weight
decay on norms, biases, embeddings and the temperature; MoE experts in their own groups, as
DeepSpeed-MoE requires) and calls ``deepspeed.initialize``. DeepSpeed's workarounds are in
limoe_ds.compat.deepspeed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from limoe_ds import parallel
from limoe_ds.compat import deepspeed as compat
from limoe_ds.losses import classification_loss, pair_loss
from limoe_ds.model.limoe import LIMoEModel, MAPHead
from limoe_ds.moe.stats import RoutingStats
from limoe_ds.parallel.collectives import all_finite
from limoe_ds.runtime.launch_env import export_torch_env, free_port

deepspeed = compat.deepspeed()  # quietly imported, version-checked
with compat.quiet_import():
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer


def init_distributed() -> None:
    """Start the default process group: NCCL on GPUs, gloo on CPU. A no-op when already started.

    Without a launcher (plain ``python launch/pretrain.py``, tests) it starts a 1-rank group; under
    ``srun`` without a launcher it maps the SLURM task variables first (limoe_ds.runtime.launch_env).
    """
    if dist.is_initialized():
        return
    launch = export_torch_env()  # under srun: SLURM_PROCID/LOCALID/NTASKS -> RANK/LOCAL_RANK/WORLD_SIZE
    if launch.launcher == "none":
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with compat.chatter_to_stderr(launch.rank):
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if backend == "gloo":
        compat.unlink_shm_buffers()


NO_DECAY_PARAMS = ("logit_scale", "logit_bias", "token_embed.weight", "image_pos", "text_pos")


def weight_decay_split(model: LIMoEModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): no weight decay on norms, biases, embeddings, the temperature, MAP probes.
    A parameter without ``requires_grad`` (a locked image tower, limoe_ds.model.lit) is in neither."""
    decay, no_decay = [], []
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            skip = (isinstance(mod, nn.LayerNorm) or p_name.endswith("bias") or name in NO_DECAY_PARAMS
                    or (isinstance(mod, MAPHead) and p_name == "probe"))
            (no_decay if skip else decay).append(p)
    return decay, no_decay


def param_groups(model: LIMoEModel) -> list[dict]:
    """Optimizer groups: decay / no_decay, then expert parameters split into DeepSpeed's MoE groups."""
    decay, no_decay = weight_decay_split(model)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # a locked tower can empty a group (all of a tower's experts): DeepSpeed's ZeRO refuses empty groups
    return [g for g in groups if g["params"]]


def build_engine(model: LIMoEModel, ds_config: dict):
    """deepspeed.initialize with our parameter groups; the optimizer comes from the JSON.

    When ``limoe_ds.parallel.setup`` built the process groups, DeepSpeed gets them (``mpu=``, and
    the expert groups already registered); otherwise DeepSpeed builds its default ones (tp=1).
    """
    state = parallel.state()
    if state is not None and (model.tp_degree != state.layout.tp or model.ep_size != state.layout.ep):
        raise ValueError(f"model built for tp={model.tp_degree}, ep={model.ep_size}; the process groups are for "
                         f"tp={state.layout.tp}, ep={state.layout.ep}")
    if model.tp_degree > 1:
        compat.tag_experts_tensor_parallel(model, ds_config)
    groups = param_groups(model)
    with compat.chatter_to_stderr(dist.get_rank() if dist.is_initialized() else 0), \
            compat.zero_without_expert_groups(any(g.get("moe") for g in groups) or not model.moe_layers()):
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups,
                                                       config=ds_config, mpu=None if state is None else state.mpu)
    return engine, scheduler


@dataclass
class StepResult:
    skipped: bool
    loss: float
    contrastive: float
    """The task loss: the contrastive loss, or a classifier's cross-entropy."""
    aux: dict[str, float]
    routing: list[RoutingStats]
    task: str = "contrastive"
    """The task loss's name in the metrics: 'contrastive', or a classifier's 'xent'."""


def train_step(engine, batch: dict[str, torch.Tensor], loss_impl: str = "all_gather",
               loss: str = "softmax") -> StepResult:
    """One optimizer step on this rank's batch. A non-finite loss on any rank skips the step on
    every rank. With ``gradient_accumulation_steps`` k > 1 the batch is k micro-batches, trained
    by gradient caching (grad_cached_step).

    The contrastive loss is the model's (limoe_ds.losses.pair_loss: sigmoid when it has a bias);
    ``loss_impl`` says how the sigmoid loss reaches the other ranks' captions. A classifier
    (``"labels"`` in the batch, V-MoE) trains on ``classification_step`` with ``loss``."""
    if "labels" in batch:
        return classification_step(engine, batch, loss)
    if engine.gradient_accumulation_steps() > 1:
        return grad_cached_step(engine, batch, loss_impl)
    device = engine.device
    out = engine(batch["images"].to(device), batch["tokens"].to(device))
    contrastive = pair_loss(out, parallel.data_parallel_group(), loss_impl)
    loss = contrastive + sum(out.aux_losses.values())
    if not all_finite(loss.detach()):
        return StepResult(True, float("nan"), float("nan"), {}, out.routing)
    engine.backward(loss)
    engine.step()
    engine.module.clamp_logit_scale_()
    # one device-to-host copy for all the logged losses, not one per loss
    total, contr, *aux = torch.stack([loss.detach(), contrastive.detach(),
                                      *(v.detach().float() for v in out.aux_losses.values())]).tolist()
    return StepResult(False, total, contr, dict(zip(out.aux_losses, aux)), out.routing)


def classification_step(engine, batch: dict[str, torch.Tensor], kind: str = "softmax",
                        passes: list | None = None) -> StepResult:
    """One optimizer step of a classifier (V-MoE): softmax or sigmoid cross-entropy on the class
    logits plus the MoE auxiliary losses; a non-finite loss on any rank skips the step on every rank.

    With k = ``gradient_accumulation_steps`` > 1 the batch is k micro-batches (each its own routing
    pool, as each data-parallel rank's batch is): a pass without gradients computes every
    micro-batch's loss, keeping the RNG state each started from, so that a non-finite loss skips
    the step before any gradient exists; then each micro-batch is replayed from its RNG state (the
    same router noise, hence the same routing) with gradients, through DeepSpeed's accumulation
    (engine.backward scales by 1/k; engine.step steps the optimizer at the k-th). The gradients are
    those of the mean over micro-batches of (cross-entropy + aux), one step on the k-times larger
    batch, for one extra forward per micro-batch. ``passes``: each pass's output appended (tests)."""
    device = engine.device
    k = engine.gradient_accumulation_steps()
    if k > 1:
        return _accumulated_classification_step(engine, batch, kind, k, passes)
    out = engine(batch["images"].to(device), None)
    xent = classification_loss(out.logits, batch["labels"].to(device), kind)
    loss = xent + sum(out.aux_losses.values())
    if not all_finite(loss.detach()):
        return StepResult(True, float("nan"), float("nan"), {}, out.routing, "xent")
    engine.backward(loss)
    engine.step()
    total, task, *aux = torch.stack([loss.detach(), xent.detach(),
                                     *(v.detach().float() for v in out.aux_losses.values())]).tolist()
    return StepResult(False, total, task, dict(zip(out.aux_losses, aux)), out.routing, "xent")


def _accumulated_classification_step(engine, batch, kind: str, k: int, passes: list | None) -> StepResult:
    device = engine.device
    images, labels = batch["images"].to(device), batch["labels"].to(device)
    if images.shape[0] % k:
        raise ValueError(f"a batch of {images.shape[0]} images does not split into {k} micro-batches")
    images, labels = images.chunk(k), labels.chunk(k)
    states, xent_total, aux_total, routing = [], 0.0, {}, None
    with torch.no_grad():
        for m in range(k):
            states.append(_rng_state(device))
            out = engine(images[m], None)
            xent_total = xent_total + classification_loss(out.logits, labels[m], kind).float() / k
            for name, v in out.aux_losses.items():
                aux_total[name] = aux_total.get(name, 0.0) + v.float() / k
            routing = out.routing if routing is None else [a.merged(b) for a, b in zip(routing, out.routing)]
            if passes is not None:
                passes.append(out)
    loss = xent_total + sum(aux_total.values())
    if not all_finite(loss.detach()):
        return StepResult(True, float("nan"), float("nan"), {}, routing, "xent")
    for m in range(k):
        _set_rng_state(states[m], device)
        out = engine(images[m], None)
        if passes is not None:
            passes.append(out)
        engine.backward(classification_loss(out.logits, labels[m], kind) + sum(out.aux_losses.values()))
        engine.step()  # DeepSpeed steps the optimizer at the k-th (the accumulation boundary)
    total, task, *aux = torch.stack([loss, xent_total, *aux_total.values()]).tolist()
    return StepResult(False, total, task, dict(zip(aux_total, aux)), routing, "xent")


@dataclass
class CachedEmbeddings:
    """A whole batch's embeddings from the no-grad pass: leaves whose .grad the loss fills."""
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_cached_step(engine, batch: dict[str, torch.Tensor], loss_impl: str = "all_gather",
                     passes: list | None = None) -> StepResult:
    """One optimizer step over k = ``gradient_accumulation_steps`` micro-batches by gradient
    caching (Gao et al. 2021, GradCache; open_clip's ``--accum-freq``): the contrastive loss of
    the whole batch, all its negatives, with the activation memory of one micro-batch.

    1. Without gradients, embed every micro-batch (training mode: router noise, training
       capacity), keeping the RNG state each one started from.
    2. The contrastive loss over all k micro-batches' embeddings and every data-parallel rank's
       (pair_loss), backward to the embeddings (and to exp(t), b): the cache of gradients.
    3. Per micro-batch, restore its RNG state and embed it again with gradients: the same
       inputs, the same router noise, the same capacity, hence the same routing and drops
       (tests/test_family.py compares them); backward of <embedding, cached gradient> plus the
       micro-batch's auxiliary losses / k, through DeepSpeed (engine.backward, engine.step at the
       accumulation boundary). The gradients sum to those of
       ``loss = contrastive(whole batch) + mean over micro-batches of the aux losses``: one step
       on the k-times larger batch whose MoE routing pools are the micro-batches (as each
       data-parallel rank's micro-batch is its own pool).

    ``passes``: if a list, each pass's LIMoEOutput is appended (tests compare the routing).
    """
    device, model = engine.device, engine.module
    k = engine.gradient_accumulation_steps()
    images, tokens = batch["images"].to(device), batch["tokens"].to(device)
    if images.shape[0] % k:
        raise ValueError(f"a batch of {images.shape[0]} pairs does not split into {k} micro-batches")
    images, tokens = images.chunk(k), tokens.chunk(k)
    states, img, txt, aux_total, routing = [], [], [], {}, None
    with torch.no_grad():
        for m in range(k):
            states.append(_rng_state(device))
            out = engine(images[m], tokens[m])
            img.append(out.image_emb.float())
            txt.append(out.text_emb.float())
            for name, v in out.aux_losses.items():
                aux_total[name] = aux_total.get(name, 0.0) + v.float() / k
            routing = out.routing if routing is None else [a.merged(b) for a, b in zip(routing, out.routing)]
            if passes is not None:
                passes.append(out)
    bias = model.logit_bias
    cache = CachedEmbeddings(torch.cat(img).requires_grad_(), torch.cat(txt).requires_grad_(),
                             model.logit_scale.detach()[0].exp().requires_grad_(),
                             None if bias is None else bias.detach()[0].clone().requires_grad_())
    with torch.enable_grad():
        contrastive = pair_loss(cache, parallel.data_parallel_group(), loss_impl)
    loss = contrastive.detach() + sum(aux_total.values())
    if not all_finite(loss.detach()):
        return StepResult(True, float("nan"), float("nan"), {}, routing)
    contrastive.backward()
    b = images[0].shape[0]
    for m in range(k):
        _set_rng_state(states[m], device)
        out = engine(images[m], tokens[m])
        if passes is not None:
            passes.append(out)
        rows = slice(m * b, (m + 1) * b)
        surrogate = ((out.image_emb.float() * cache.image_emb.grad[rows]).sum()
                     + (out.text_emb.float() * cache.text_emb.grad[rows]).sum())
        if m == 0:  # exp(t) and b enter the loss once, not once per micro-batch
            surrogate = surrogate + out.logit_scale.float() * cache.logit_scale.grad
            if bias is not None:
                surrogate = surrogate + out.logit_bias.float() * cache.logit_bias.grad
        engine.backward(surrogate + sum(out.aux_losses.values()) / k, scale_wrt_gas=False)
        engine.step()  # DeepSpeed steps the optimizer at the k-th (the accumulation boundary)
    # the RNG is now where the first pass left it: the last recompute replayed the last micro-batch
    engine.module.clamp_logit_scale_()
    total, contr, *aux = torch.stack([loss, contrastive.detach(), *aux_total.values()]).tolist()
    return StepResult(False, total, contr, dict(zip(aux_total, aux)), routing)
