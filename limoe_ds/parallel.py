"""The parallel layout: tensor (tp) x data (dp) ranks, experts sharded over ep of the dp ranks.

One object (``Layout``) says which rank does what; ``setup(layout)`` builds every process group
once: megatron-core's ``parallel_state`` for the tensor- and data-parallel groups, and the expert
and expert-data groups of DeepSpeed-MoE, built HERE (not by DeepSpeed) so they are consistent
with megatron's rank order, and registered where DeepSpeed looks them up. ``MegatronMPU`` hands
the same groups to ``deepspeed.initialize(mpu=...)``.

Rank order (megatron's): rank = dp_rank * tp + tp_rank, so a tensor-parallel group is tp
consecutive ranks. Expert-parallel groups are runs of ep consecutive data-parallel ranks of one
tensor-parallel lane; the expert-data group of a rank is every rank holding the same experts:
the same ep position in every run, in every lane (experts are replicated across tensor-parallel
peers; each peer computes 1/tp of the capacity slots, DeepSpeed's ``drop_tokens``), so expert
gradients are summed over it.

DeepSpeed 0.19.8 given an mpu would build expert groups from consecutive GLOBAL ranks, i.e. a
tensor-parallel group; that is why we build them.

Tensor-parallel linears: ``TensorParallel.column`` / ``.row`` are the one place that decides how
(plain ``nn.Linear`` at tp=1; megatron-core's Column/RowParallelLinear otherwise, with the CPU
settings on CPU and device initialisation on GPUs). ``tp_partition(name)`` says how each named
parameter is split (dim, stride); initialisation, consolidation and resharding all use it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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


# -- how parameters are split over tensor-parallel ranks ------------------------------------------------
_TP_RULES = (
    # (pattern on the parameter name, partition dim, stride). qkv's rows are [3, heads, head_dim]:
    # stride 3 gives every rank the q, k and v rows of ITS heads (megatron's stride semantics).
    (re.compile(r"(^|\.)blocks\.\d+\.attn\.qkv\.(weight|bias)$"), 0, 3),
    (re.compile(r"(^|\.)blocks\.\d+\.attn\.proj\.weight$"), 1, 1),
    (re.compile(r"(^|\.)blocks\.\d+\.ffn\.fc1\.(weight|bias)$"), 0, 1),
    (re.compile(r"(^|\.)blocks\.\d+\.ffn\.fc2\.weight$"), 1, 1),
)


def tp_partition(name: str) -> tuple[int, int] | None:
    """(dim, stride) along which parameter ``name`` is split over tp ranks; None = replicated.

    Attention and the dense MLPs are split; embeddings, norms, heads, the router and the MoE
    experts are replicated (experts: DeepSpeed splits their capacity slots over tp ranks instead).
    """
    for pattern, dim, stride in _TP_RULES:
        if pattern.search(name):
            return dim, stride
    return None


def tp_shard(full: torch.Tensor, dim: int, stride: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s part of ``full``: of ``stride`` equal blocks along ``dim``, each is cut
    into tp pieces and the rank takes piece tp_rank of every block."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[tp_rank] for b in blocks], dim=dim)


def tp_unshard(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``tp_shard`` over all ranks' parts (in tp-rank order)."""
    per_block = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([torch.cat([pb[s] for pb in per_block], dim=dim) for s in range(stride)], dim=dim)


# -- the linears --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorParallel:
    """Builds the tensor-parallel linears; the ONE place that picks megatron-core's settings.

    On CPU megatron-core needs ``use_cpu_initialization=True``; on GPUs parameters are allocated
    on the device. Both skip megatron's initialisation (``limoe_ds.model.init_weights`` fills
    every parameter layout-independently) and keep ``sequence_parallel`` and
    ``gradient_accumulation_fusion`` off: DeepSpeed reads ``.grad`` (fusion writes ``main_grad``)
    and our MoE pool routes whole sequences.
    """

    size: int = 1
    rank: int = 0

    def column(self, in_features: int, out_features: int, *, stride: int = 1) -> nn.Module:
        """y = x A^T + b with A's rows split over tp ranks; input replicated, output split."""
        if self.size == 1:
            return nn.Linear(in_features, out_features)
        layer = _megatron_linears()[0](in_features, out_features, config=self._config(), init_method=_no_init,
                                       bias=True, gather_output=False, stride=stride)
        return _tag(layer, 0, stride)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        """y = x A^T + b with A's columns split; input split, output all-reduced (bias added once)."""
        if self.size == 1:
            return nn.Linear(in_features, out_features)
        layer = _megatron_linears()[1](in_features, out_features, config=self._config(), init_method=_no_init,
                                       bias=True, input_is_parallel=True, skip_bias_add=False)
        return _tag(layer, 1, 1)

    def _config(self):
        ModelParallelConfig = _megatron().model_parallel_config.ModelParallelConfig
        on_gpu = torch.cuda.is_available()
        return ModelParallelConfig(tensor_model_parallel_size=self.size, use_cpu_initialization=not on_gpu,
                                   perform_initialization=False, sequence_parallel=False,
                                   gradient_accumulation_fusion=False, params_dtype=torch.float32)


@functools.cache
def _megatron():
    """megatron.core, imported once and quietly (it warns that Transformer Engine and Apex are
    missing; we use neither)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.model_parallel_config
        import megatron.core.parallel_state
        import megatron.core.tensor_parallel
    return megatron.core


def _no_init(_weight: torch.Tensor) -> None:
    """Megatron's init_method; unused (perform_initialization=False): init_weights does it."""


@functools.cache
def _megatron_linears():
    """megatron-core's Column/RowParallelLinear returning one tensor (megatron returns (y, bias))."""
    tensor_parallel = _megatron().tensor_parallel
    ColumnParallelLinear, RowParallelLinear = tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear
    # its advice to set CUDA_DEVICE_MAX_CONNECTIONS (on every forward) is about overlapping GPU streams
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")

    class Column(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return Column, Row


def _tag(layer: nn.Module, dim: int, stride: int) -> nn.Module:
    """Megatron tags parameters only when it initialises them; we tag them here. DeepSpeed's
    gradient norm reads ``tensor_model_parallel`` to count each split parameter on every tp rank
    and each replicated one once."""
    set_tensor_model_parallel_attributes = _megatron().tensor_parallel.set_tensor_model_parallel_attributes
    set_tensor_model_parallel_attributes(layer.weight, True, dim, stride)
    # megatron tags a column-parallel bias (split with the rows) itself; a row-parallel one is replicated
    assert dim == 1 or layer.bias.partition_dim == 0
    return layer


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
