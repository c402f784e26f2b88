"""The collectives the stack uses, one helper each: sums of counts, "any rank" flags, a maximum,
gathering rows of different lengths, and the device collective tensors live on.

Every helper is a no-op (returns its input) without a process group or on a group of one rank.
``group=None`` is the whole world; sums of per-sample quantities run over the data-parallel group
(``limoe_ds.parallel.groups.data_parallel_group()``), because tensor-parallel peers hold the same
samples and must be counted once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from limoe_ds.parallel import groups as parallel

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def distributed(group=None) -> bool:
    """True when ``group`` (None: the world) has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` when ``flag`` is True on any of them (one MAX all-reduce of
    one element), so that all ranks take the same branch (skip a step, stop, end a loop)."""
    if not distributed(group):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() > 0


def all_finite(t: torch.Tensor) -> bool:
    """True iff ``t`` is finite on EVERY rank (so that all ranks skip a step together)."""
    return not any_rank(not bool(torch.isfinite(t).all()))


def sum_(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place element-wise sum of ``t`` over the ranks of ``group``, in its own dtype; returns it."""
    if distributed(group):
        dist.all_reduce(t, group=group)
    return t


def max_over_ranks(value: int, group=None) -> int:
    """The largest ``value`` over the ranks of ``group``."""
    if not distributed(group):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def all_reduce_tensors(tensors: list[torch.Tensor], group=None, op: str = "sum") -> list[torch.Tensor]:
    """Element-wise ``op`` ("sum" or "max") of each tensor over the ranks of ``group``, in ONE
    all-reduce of their float64 concatenation; returned as float32, in the given order (every rank
    must pass the same shapes in the same order)."""
    if not distributed(group) or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).to(comm_device())
    dist.all_reduce(flat, op=_OPS[op], group=group)
    return [v.view_as(t).float() for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Element-wise sum of a {name: number} dict over the data-parallel ranks (one all-reduce)."""
    group = parallel.data_parallel_group()
    if not distributed(group) or not values:
        return dict(values)
    keys = sorted(values)  # the same order on every rank, whatever each dict's insertion order
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, group=group)
    return dict(zip(keys, t.tolist()))


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Mean over the data-parallel ranks."""
    group = parallel.data_parallel_group()
    world = dist.get_world_size(group) if distributed(group) else 1
    return {k: v / world for k, v in sum_over_ranks(values).items()}


def gather_rows(x_NK: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (ranks may hold different numbers of rows)."""
    if not distributed(group):
        return x_NK
    n = torch.tensor([x_NK.shape[0]], device=x_NK.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    width = int(max(s.item() for s in sizes))
    padded = x_NK.new_zeros((width, *x_NK.shape[1:]))
    padded[:x_NK.shape[0]] = x_NK
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank of ``group`` (one
    all_gather_object: small values only, e.g. per-rank file checksums or error lines)."""
    if not distributed(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (so that every rank takes the same decision)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
