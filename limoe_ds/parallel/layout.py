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
            raise ValueError(format_problems(problems))

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


def check_model_layout(world_size: int, *, tp: int, ep: int, model) -> list[tuple[str, str]]:
    """check_layout for a ModelConfig: its expert count (each pool's), and the heads and MLP width
    of each tower."""
    problems = check_layout(world_size, tp=tp, ep=ep, num_experts=model.num_experts, num_heads=model.num_heads,
                            mlp_dim=model.mlp_dim, dense=model.num_experts is None)
    for key, n in model.expert_pools()[1:]:  # a text tower's or VL-MoE's text pool's count
        if not problems and n % ep:
            problems.append(("parallel.expert_parallel_size",
                             f"ep={ep} does not divide {key}={n} (every expert pool is sharded over the "
                             f"expert-parallel group); use a common divisor of the pools' counts"))
    if model.text_tower is not None and not problems:
        problems = check_layout(world_size, tp=tp, ep=ep, num_heads=model.text_tower.num_heads,
                                mlp_dim=model.text_tower.mlp_dim, key="model.text_tower")
    return problems


def check_layout(world_size: int, *, tp: int, ep: int, num_experts: int | None = None, num_heads: int | None = None,
                 mlp_dim: int | None = None, dense: bool = False, key: str = "model") -> list[tuple[str, str]]:
    """Why this layout cannot run, as (config key, message with the fix) pairs; empty = it can.

    Every divisibility rule of the stack, stated once: world = tp x dp, ep | dp, ep | experts,
    tp | heads, tp | MLP width, and ep = 1 for a dense model. The run config, ``Layout`` and the
    memory estimate all report these messages."""
    problems = []
    if world_size % tp:
        return [("parallel.tensor_parallel_size", f"world size {world_size} is not divisible by tp={tp}")]
    dp = world_size // tp
    if dp % ep:
        problems.append(("parallel.expert_parallel_size",
                         f"ep={ep} does not divide the data-parallel size {dp} (world {world_size} / tp {tp}); "
                         f"use an ep that divides {dp} or change the number of ranks"))
    if dense and ep != 1:
        problems.append(("parallel.expert_parallel_size", "the model has no MoE layer (dense twin); set it to 1"))
    if num_experts is not None and num_experts % ep:
        problems.append(("parallel.expert_parallel_size",
                         f"ep={ep} does not divide model.moe.num_experts={num_experts}; "
                         f"use a divisor of {num_experts}"))
    for what, n in (("num_heads", num_heads), ("mlp_dim", mlp_dim)):
        if n is not None and n % tp:
            problems.append(("parallel.tensor_parallel_size",
                             f"tp={tp} does not divide {key}.{what}={n}; use a divisor of {n}"))
    return problems


def format_problems(problems: list[tuple[str, str]]) -> str:
    return "; ".join(f"{key}: {msg}" for key, msg in problems)
