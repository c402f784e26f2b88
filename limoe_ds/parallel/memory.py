"""Per-GPU memory estimate for a preset at a parallel layout (tp, ep, dp), for planning a cluster run.

Parameters are counted from the model itself (built on the meta device) and split the way the
layout splits them: attention and dense-MLP weights by tp (``limoe_ds.parallel.tp_partition``),
experts by ep (each rank holds E/ep, replicated over tp peers), the rest replicated.

States (bytes per parameter held by a rank; the ZeRO paper's mixed-precision Adam accounting):
    bf16 run: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master + Adam m + v)
    fp32 run: 4 (weights) + 4 (gradients) + 12 (fp32 master + Adam m + v; DeepSpeed ZeRO 1/2 keeps
              its own fp32 partition even in fp32 runs)
    ZeRO-1 partitions the 12 over the partition group, ZeRO-2 the gradients too; the partition
    group is the data-parallel group (dp ranks) for shared weights and the expert-data group
    (tp * dp / ep ranks) for experts.

Activations (bytes per token per block, b micro-batch pairs, I + T tokens per pair, h width, m MLP
width, t = tp, cf capacity factor; flash/memory-efficient attention, so no s^2 score matrix; no
sequence parallelism: what attention and the MLP save for backward):
    attention      4h + 8h/t          (LN input, QKV input, q/k/v, attention output)
    dense MLP      4h + 4m/t          (LN input, fc1 input, fc1 output, GELU output)
    MoE MLP        6h + cf (4h + 4m)/t (LN input, routing pool, combine output; the dispatched
                                       slots, expert hidden and output: 1/t of the slots per rank)
    x 2 bytes (bf16) or 4 (fp32). With activation checkpointing only each block's input is kept
    (h values per token per block) plus one block's full activations during its recomputation.
Not counted: DeepSpeed's communication buckets (reduce_bucket_size, allgather_bucket_size), the
all-to-all buffers, the CUDA context (~0.5-1 GB) and allocator fragmentation: keep >= 15% headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from limoe_ds.config.model import ModelConfig
from limoe_ds.parallel.layout import check_model_layout, format_problems
from limoe_ds.moe.names import is_expert
from limoe_ds.parallel.tp_plan import tp_partition

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    tp: int
    ep: int
    dp: int
    world_size: int
    zero_stage: int
    dtype: str
    micro_batch: int
    activation_checkpointing: bool
    params_per_rank: int
    shared_params_per_rank: int
    expert_params_per_rank: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float

    def to_dict(self) -> dict:
        return asdict(self)


def param_split(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by how a layout splits them: tp-split, expert, replicated."""
    from limoe_ds.model import build_model
    model = build_model(cfg, device="meta")
    out = {"tp_split": 0, "expert": 0, "replicated": 0}
    for name, p in model.named_parameters():
        kind = "expert" if is_expert(name) else "tp_split" if tp_partition(name) else "replicated"
        out[kind] += p.numel()
    return out


def estimate(cfg: ModelConfig, *, tp: int, ep: int, dp: int, zero_stage: int = 2, bf16: bool = True,
             micro_batch: int = 64, activation_checkpointing: bool = True) -> MemoryEstimate:
    world = tp * dp
    problems = check_model_layout(world, tp=tp, ep=ep, model=cfg)
    if zero_stage not in (0, 1, 2):
        problems.append(("zero_optimization.stage", f"ZeRO stage {zero_stage} is not supported (0, 1 or 2)"))
    if problems:
        raise ValueError(format_problems(problems))
    split = param_split(cfg)
    shared = split["tp_split"] // tp + split["replicated"]
    expert = split["expert"] // ep
    w_bytes = 2 if bf16 else 4
    edp = tp * dp // ep

    def states(n: int, group: int) -> tuple[float, float, float]:
        weights, grads, optim = w_bytes * n, w_bytes * n, 12 * n
        if zero_stage >= 1:
            optim /= group
        if zero_stage >= 2:
            grads /= group
        return weights, grads, optim

    ws, gs, os_ = states(shared, dp)
    we, ge, oe = states(expert, edp)
    acts = _activation_bytes(cfg, tp, micro_batch, w_bytes, activation_checkpointing)
    total = ws + gs + os_ + we + ge + oe + acts
    return MemoryEstimate(tp=tp, ep=ep, dp=dp, world_size=world, zero_stage=zero_stage,
                          dtype="bf16" if bf16 else "fp32",
                          micro_batch=micro_batch, activation_checkpointing=activation_checkpointing,
                          params_per_rank=shared + expert, shared_params_per_rank=shared, expert_params_per_rank=expert,
                          weights_gib=round((ws + we) / GIB, 3), gradients_gib=round((gs + ge) / GIB, 3),
                          optimizer_gib=round((os_ + oe) / GIB, 3), activations_gib=round(acts / GIB, 3),
                          total_gib=round(total / GIB, 3))


def _activation_bytes(cfg: ModelConfig, tp: int, micro_batch: int, w_bytes: int, checkpointing: bool) -> float:
    """The one tower carries every image and text token; two towers each carry their modality's."""
    if cfg.text_tower is None:
        tokens = micro_batch * (cfg.num_patches + cfg.text_positions)
        return _tower_activation_bytes(cfg, tokens, tp, w_bytes, checkpointing)
    return (_tower_activation_bytes(cfg, micro_batch * cfg.num_patches, tp, w_bytes, checkpointing)
            + _tower_activation_bytes(cfg.text_tower, micro_batch * cfg.text_positions, tp, w_bytes, checkpointing))


def _tower_activation_bytes(tower, tokens: int, tp: int, w_bytes: int, checkpointing: bool) -> float:
    h, m = tower.width, tower.mlp_dim
    cf = tower.moe.capacity_factor if tower.moe else 1.0
    attention = 4 * h + 8 * h / tp
    per_block = [attention + (6 * h + cf * (4 * h + 4 * m) / tp if tower.is_moe_layer(i) else 4 * h + 4 * m / tp)
                 for i in range(tower.depth)]
    if checkpointing:
        per_token = tower.depth * h + max(per_block)
    else:
        per_token = sum(per_block)
    return tokens * per_token * w_bytes
