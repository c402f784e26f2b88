"""The process groups of a layout, built once: megatron-core's ``parallel_state`` for the tensor- and
data-parallel groups, and the expert and expert-data groups of DeepSpeed-MoE, built HERE (not by
DeepSpeed) so they are consistent with megatron's rank order (``limoe_ds.parallel.layout``), and
registered where DeepSpeed looks them up. ``MegatronMPU`` hands the same groups to
``deepspeed.initialize(mpu=...)``. A layout without tensor parallelism (tp == 1) builds the same
groups itself (``_NoTensorParallel``): importing megatron-core costs about 3 s of CPU per process,
which every launch, and every rank of every test, paid for groups of one rank.

DeepSpeed 0.19.8 given an mpu would build expert groups from consecutive GLOBAL ranks, i.e. a
tensor-parallel group; that is why we build them (``compat.deepspeed.register_expert_groups``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.distributed as dist

from limoe_ds.compat import deepspeed as compat
from limoe_ds.parallel.layout import Layout
from limoe_ds.compat.megatron import megatron_core


# -- process groups -----------------------------------------------------------------------------------
class MegatronMPU:
    """What ``deepspeed.initialize(mpu=...)`` asks of a model-parallel unit, from megatron-core's
    ``parallel_state`` (no pipeline parallelism: the model-parallel group is the tp group)."""

    def __init__(self, layout: Layout, parallel_state) -> None:
        self.layout, self._ps = layout, parallel_state

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.layout.group_of(self.layout.dp_groups())

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


class _NoTensorParallel:
    """The part of megatron-core's ``parallel_state`` this project reads, for tp == 1: the groups
    ``initialize_model_parallel(tensor_model_parallel_size=1)`` builds for it (a group of one rank
    per rank as the tensor-parallel group, every rank as the data-parallel group), the same ranks
    in the same order, so that collectives over them are the same."""

    def __init__(self, layout: Layout) -> None:
        if layout.tp != 1:
            raise ValueError(f"_NoTensorParallel is for tp == 1, not {layout.tp}")
        self.rank, self.world = layout.rank, layout.world_size
        singles = [dist.new_group([r]) for r in range(self.world)]  # every rank creates every group, in order
        self.tp_group, self.dp_group = singles[self.rank], dist.new_group(list(range(self.world)))

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_world_size(self) -> int:
        return self.world


@dataclass
class ParallelState:
    layout: Layout
    mpu: MegatronMPU
    data_parallel_group: dist.ProcessGroup | None
    expert_group_name: str


_STATE: ParallelState | None = None


def setup(layout: Layout) -> ParallelState:
    """Build every process group for ``layout`` (collective: all ranks call it, once per layout).

    megatron-core's ``parallel_state`` gets the tensor- and data-parallel groups; the expert and
    expert-data groups are built from ``layout`` and registered in DeepSpeed's group tables under
    the name DeepSpeed-MoE looks for (``ep_size_<ep>``), so DeepSpeed does not build its own.
    """
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError("parallel.setup needs the default process group (engine.init_distributed)")
    if dist.get_world_size() != layout.world_size or dist.get_rank() != layout.rank:
        raise ValueError(f"layout is for rank {layout.rank} of {layout.world_size}, this process is rank "
                         f"{dist.get_rank()} of {dist.get_world_size()}")
    teardown()
    if layout.tp == 1:
        parallel_state = _NoTensorParallel(layout)
    else:
        parallel_state = megatron_core().parallel_state
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp, create_gloo_process_groups=False)
    name = f"ep_size_{layout.ep}"
    mine = []
    for family in (layout.ep_groups(), layout.expert_data_groups()):
        groups = [(ranks, dist.new_group(ranks)) for ranks in family]  # every rank creates every group, in order
        mine.append([(ranks, group) for ranks, group in groups if layout.rank in ranks])
    compat.register_expert_groups(name, *mine)
    if layout.tp > 1 and dist.get_backend() == "gloo":
        compat.gather_tokens_on_gloo(parallel_state.get_tensor_model_parallel_group)
    _STATE = ParallelState(layout, MegatronMPU(layout, parallel_state), parallel_state.get_data_parallel_group(), name)
    return _STATE


def teardown() -> None:
    """Forget the groups of the previous ``setup`` (megatron's and DeepSpeed's tables)."""
    global _STATE
    if "megatron.core" in sys.modules:  # else megatron's groups were never built (tp == 1 only)
        parallel_state = megatron_core().parallel_state
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    compat.clear_groups()
    _STATE = None


def state() -> ParallelState | None:
    return _STATE


def data_parallel_group() -> dist.ProcessGroup | None:
    """The group over which samples differ (None = the whole world, when no layout was set up):
    gathers of embeddings and sums of per-sample counts run over it, so tensor-parallel peers,
    which see the same samples, are not counted twice."""
    return None if _STATE is None else _STATE.data_parallel_group


def checkpoint_writers():
    """While DeepSpeed saves: one writer per tensor-parallel lane (``compat.deepspeed.
    one_checkpoint_writer_per_tp_lane``): a rank's index among its lane's ranks holding its experts."""
    tp_lanes = _STATE is not None and _STATE.layout.tp > 1
    return compat.one_checkpoint_writer_per_tp_lane(_STATE.layout.dp_rank // _STATE.layout.ep if tp_lanes else None)
