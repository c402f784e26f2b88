"""The process groups of a layout, built once: megatron-core's ``parallel_state`` for the tensor- and
data-parallel groups, and the expert and expert-data groups of DeepSpeed-MoE, built HERE (not by
DeepSpeed) so they are consistent with megatron's rank order (``limoe_ds.parallel.layout``), and
registered where DeepSpeed looks them up. ``MegatronMPU`` hands the same groups to
``deepspeed.initialize(mpu=...)``.

DeepSpeed 0.19.8 given an mpu would build expert groups from consecutive GLOBAL ranks, i.e. a
tensor-parallel group; that is why we build them.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from limoe_ds.parallel.layout import Layout
from limoe_ds.parallel.tp_plan import _megatron


# -- process groups -----------------------------------------------------------------------------------
class MegatronMPU:
    """What ``deepspeed.initialize(mpu=...)`` asks of a model-parallel unit, from megatron-core's
    ``parallel_state`` (no pipeline parallelism: the model-parallel group is the tp group)."""

    def __init__(self, layout: Layout) -> None:
        self.layout, self._ps = layout, _megatron().parallel_state

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
    parallel_state = _megatron().parallel_state
    with _deepspeed_groups() as ds_groups:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                                 create_gloo_process_groups=False)
        name = f"ep_size_{layout.ep}"
        for groups, table, ranks_table in (
                (layout.ep_groups(), ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS),
                (layout.expert_data_groups(), ds_groups._EXPERT_DATA_PARALLEL_GROUP,
                 ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS)):
            for ranks in groups:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if layout.rank in ranks:
                    table[name], ranks_table[name] = group, list(ranks)
    if layout.tp > 1 and dist.get_backend() == "gloo":
        _patch_gather_tokens_for_gloo()
    _STATE = ParallelState(layout, MegatronMPU(layout), parallel_state.get_data_parallel_group(), name)
    return _STATE


def _patch_gather_tokens_for_gloo() -> None:
    """DeepSpeed-MoE's tensor-parallel token gather all-gathers into a FLAT buffer, which NCCL
    accepts and gloo rejects ('invalid tensor size'); on gloo (CPU) gather into a buffer shaped
    [tp * n, ...] instead. Same result; the GPU (NCCL) path stays DeepSpeed's own."""
    from deepspeed.moe import mappings

    def gather_tokens(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
        group = _STATE.mpu.get_tensor_model_parallel_group()
        world = dist.get_world_size(group)
        input_ = input_.contiguous()
        if world == 1:
            return input_
        out = input_.new_empty((world * input_.shape[0], *input_.shape[1:]))
        dist.all_gather_into_tensor(out, input_, group=group)
        return out if dim == 0 else torch.cat(out.chunk(world, dim=0), dim=dim).contiguous()

    mappings._gather_tokens = gather_tokens


def teardown() -> None:
    """Forget the groups of the previous ``setup`` (megatron's and DeepSpeed's tables)."""
    global _STATE
    parallel_state = _megatron().parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    with _deepspeed_groups() as ds_groups:
        for table in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                      ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            table.clear()
        ds_groups.mpu = None
    _STATE = None


def state() -> ParallelState | None:
    return _STATE


def data_parallel_group() -> dist.ProcessGroup | None:
    """The group over which samples differ (None = the whole world, when no layout was set up):
    gathers of embeddings and sums of per-sample counts run over it, so tensor-parallel peers,
    which see the same samples, are not counted twice."""
    return None if _STATE is None else _STATE.data_parallel_group


@contextlib.contextmanager
def _deepspeed_groups():
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils import groups
    yield groups


@contextlib.contextmanager
def checkpoint_writers():
    """While DeepSpeed saves: one writer per tensor-parallel lane, not one per expert-data group.

    DeepSpeed 0.19.8 lets only rank 0 of an expert-data group write the experts AND (it returns
    early otherwise) the shared ``mp_rank_XX_model_states.pt``. Our expert-data groups span the tp
    peers, so tp ranks > 0 would write neither and their attention / MLP shards would be lost.
    Here each rank's expert-data rank is its index among the ranks of its OWN lane holding the
    same experts: the data-parallel-rank-0 rank of every lane writes its model shard
    (mp_rank_<tp rank>) and its (replicated) expert files, which is what a resume at the same
    layout loads.
    """
    if _STATE is None or _STATE.layout.tp == 1:
        yield
        return
    with _deepspeed_groups() as ds_groups:
        original = ds_groups._get_expert_data_parallel_rank
        lane_rank = _STATE.layout.dp_rank // _STATE.layout.ep
        ds_groups._get_expert_data_parallel_rank = lambda _group_name: lane_rank
        try:
            yield
        finally:
            ds_groups._get_expert_data_parallel_rank = original
