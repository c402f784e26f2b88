"""The parallel layout: tensor (tp) x data (dp) ranks, experts sharded over ep of the dp ranks.

Pure: no process group, no torch. ``Layout`` says which rank does what (megatron's rank order:
rank = dp_rank * tp + tp_rank, so a tensor-parallel group is tp consecutive ranks); expert-parallel
groups are runs of ep consecutive data-parallel ranks of one tensor-parallel lane; the expert-data
group of a rank is every rank holding the same experts: the same ep position in every run, in every
lane (experts are replicated across tensor-parallel peers; each peer computes 1/tp of the capacity
slots, DeepSpeed's ``drop_tokens``), so expert gradients are summed over it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """world = tp x dp; experts sharded over ep consecutive data-parallel ranks (ep | dp)."""

    rank: int
    world_size: int
    ep: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        problems = check_layout(self.world_size, tp=self.tp, ep=self.ep)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    # -- group membership (pure: every rank computes every group, in the same order) ------------------
    def _global(self, dp_rank: int, tp_rank: int) -> int:
        return dp_rank * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self._global(d, t) for t in range(self.tp)] for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self._global(d, t) for d in range(self.dp)] for t in range(self.tp)]

    def ep_groups(self) -> list[list[int]]:
        """Ranks that exchange tokens (all-to-all): ep consecutive dp ranks of one tp lane."""
        return [[self._global(run + e, t) for e in range(self.ep)]
                for t in range(self.tp) for run in range(0, self.dp, self.ep)]

    def expert_data_groups(self) -> list[list[int]]:
        """Ranks holding the same experts (same ep position), over every run and every tp lane."""
        return [sorted(self._global(run + e, t) for t in range(self.tp) for run in range(0, self.dp, self.ep))
                for e in range(self.ep)]

    def group_of(self, groups: list[list[int]]) -> list[int]:
        return next(g for g in groups if self.rank in g)


def check_layout(world_size: int, *, tp: int, ep: int, num_experts: int | None = None,
                 num_heads: int | None = None, mlp_dim: int | None = None) -> list[str]:
    """Why this layout cannot run (empty = it can): world = tp x dp, ep | dp, ep | experts,
    tp | heads and tp | MLP width."""
    problems = []
    if world_size % tp:
        problems.append(f"world size {world_size} is not divisible by tensor_parallel_size={tp}")
        return problems
    dp = world_size // tp
    if dp % ep:
        problems.append(f"expert_parallel_size={ep} does not divide the data-parallel size {dp} "
                        f"(world {world_size} / tp {tp})")
    if num_experts is not None and num_experts % ep:
        problems.append(f"expert_parallel_size={ep} does not divide num_experts={num_experts}")
    if num_heads is not None and num_heads % tp:
        problems.append(f"tensor_parallel_size={tp} does not divide num_heads={num_heads}")
    if mlp_dim is not None and mlp_dim % tp:
        problems.append(f"tensor_parallel_size={tp} does not divide mlp_dim={mlp_dim}")
    return problems
