"""Collectives over the data-parallel ranks: sums of counts, "any rank" flags, the communication device.

Tensor-parallel peers hold the same samples, so sums run over the data-parallel group
(``limoe_ds.parallel.groups.data_parallel_group``) and peers are counted once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from limoe_ds.parallel import groups as parallel


def all_finite(t: torch.Tensor) -> bool:
    """True iff ``t`` is finite on EVERY rank (so that all ranks skip a step together)."""
    flag = torch.tensor([0.0 if torch.isfinite(t).all() else 1.0], device=t.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Element-wise sum of a {name: number} dict over the data-parallel ranks (one all-reduce);
    tensor-parallel peers hold the same samples and are counted once."""
    group = parallel.data_parallel_group()
    if not dist.is_initialized() or dist.get_world_size(group) == 1 or not values:
        return dict(values)
    keys = sorted(values)  # the same order on every rank, whatever each dict's insertion order
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, group=group)
    return dict(zip(keys, t.tolist()))


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Mean over the data-parallel ranks."""
    world = dist.get_world_size(parallel.data_parallel_group()) if dist.is_initialized() else 1
    return {k: v / world for k, v in sum_over_ranks(values).items()}
