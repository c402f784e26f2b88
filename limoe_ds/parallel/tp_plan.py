"""The tensor-parallel plan: ONE table, applied to a plain model from outside.

``TP_PLAN`` maps module names of the plain single-device model (``limoe_ds.model``) to how they are
split over tensor-parallel ranks (torchtitan's ``layer_plan`` in ``parallelize.py``). Everything
that needs to know reads it:

- ``apply(model, tp, tp_rank)`` replaces each planned ``nn.Linear`` by megatron-core's
  Column/RowParallelLinear holding this rank's shard of its (already initialised) weights, so the
  same seed gives the same full model at any tensor-parallel size;
- ``tp_partition(param_name)`` says how a parameter is split (dim, stride): checkpoint
  consolidation, conversion, resharding and the memory estimate use it.

Attention and the dense MLPs are split; embeddings, norms, heads, the router and the MoE experts are
replicated (experts: DeepSpeed splits their capacity slots over tp ranks instead, so capacities are
multiples of tp). megatron-core runs with ``use_cpu_initialization`` on CPU (device allocation on
GPUs), without its initialisation, ``sequence_parallel`` or ``gradient_accumulation_fusion``:
DeepSpeed reads ``.grad`` (fusion writes ``main_grad``) and our MoE pool routes whole sequences.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from limoe_ds.compat.megatron import megatron_core


@dataclass(frozen=True)
class Colwise:
    """y = x A^T + b with A's rows (and b) split over tp ranks: input replicated, output split.
    ``stride``: the rows are ``stride`` equal blocks, each split on its own (megatron's stride)."""

    stride: int = 1

    def partition(self, param: str) -> tuple[int, int] | None:
        return 0, self.stride

    def build(self, in_features: int, out_features: int, tp: int) -> nn.Module:
        layer = _megatron_linears()[0](in_features, out_features, config=_config(tp), init_method=_no_init,
                                       bias=True, gather_output=False, stride=self.stride)
        return _tag(layer, 0, self.stride)


@dataclass(frozen=True)
class Rowwise:
    """y = x A^T + b with A's columns split: input split, output all-reduced, b replicated (added once)."""

    def partition(self, param: str) -> tuple[int, int] | None:
        return (1, 1) if param == "weight" else None

    def build(self, in_features: int, out_features: int, tp: int) -> nn.Module:
        layer = _megatron_linears()[1](in_features, out_features, config=_config(tp), init_method=_no_init,
                                       bias=True, input_is_parallel=True, skip_bias_add=False)
        return _tag(layer, 1, 1)


TP_PLAN: dict[str, Colwise | Rowwise] = {
    # qkv's rows are [3, heads, head_dim]: stride 3 gives every rank the q, k and v rows of ITS heads
    "blocks.*.attn.qkv": Colwise(stride=3),
    "blocks.*.attn.proj": Rowwise(),
    # dense blocks only: an MoE block's ffn is a LIMoELayer, whose experts are replicated
    "blocks.*.ffn.fc1": Colwise(),
    "blocks.*.ffn.fc2": Rowwise(),
}
"""Module name (``*`` = a block index) -> how it is split over tensor-parallel ranks."""

_PLAN = [(re.compile(r"(^|\.)" + re.escape(k).replace(r"\*", r"\d+") + "$"), style) for k, style in TP_PLAN.items()]


def style_of(module_name: str) -> Colwise | Rowwise | None:
    """The plan's entry for a module name (a prefix such as DeepSpeed's 'module.' is allowed)."""
    return next((style for pattern, style in _PLAN if pattern.search(module_name)), None)


def tp_partition(name: str) -> tuple[int, int] | None:
    """(dim, stride) along which parameter ``name`` is split over tp ranks; None = replicated."""
    module, _, param = name.rpartition(".")
    style = style_of(module)
    return None if style is None else style.partition(param)


def tp_shard(full: torch.Tensor, dim: int, stride: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s part of ``full``: of ``stride`` equal blocks along ``dim``, each is cut
    into tp pieces and the rank takes piece tp_rank of every block."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[tp_rank] for b in blocks], dim=dim)


def tp_unshard(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``tp_shard`` over all ranks' parts (in tp-rank order)."""
    per_block = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([torch.cat([pb[s] for pb in per_block], dim=dim) for s in range(stride)], dim=dim)


@torch.no_grad()
def apply(model: nn.Module, tp: int, tp_rank: int) -> nn.Module:
    """Shard ``model`` (a plain, initialised LIMoE model) over ``tp`` tensor-parallel ranks, in place.

    Needs megatron-core's parallel state for ``tp`` (``limoe_ds.parallel.groups.setup``). The full
    weights exist until their module is replaced: the dense part of the model, once, per rank.
    """
    if tp == 1:
        return model
    for name, module in list(model.named_modules()):
        style = style_of(name)
        if style is None:
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"tensor-parallel plan: {name} is a {type(module).__name__}, not an nn.Linear")
        sharded = style.build(module.in_features, module.out_features, tp)
        for param, value in sharded.named_parameters(recurse=False):
            part = style.partition(param)
            full = getattr(module, param)
            value.copy_(full if part is None else tp_shard(full, *part, tp, tp_rank))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, sharded)
    for layer in model.moe_layers():
        layer.capacity_multiple_of = moe_capacity_multiple(layer.cfg.capacity_multiple_of, tp)
    model.tp_degree = tp
    return model


def moe_capacity_multiple(multiple_of: int, tp: int) -> int:
    """What an MoE layer's capacity is a multiple of at tensor-parallel size ``tp``: DeepSpeed
    splits the capacity dimension across tp ranks (``drop_tokens``), so C must divide by tp."""
    return math.lcm(multiple_of, tp)


def _config(tp: int):
    ModelParallelConfig = megatron_core().model_parallel_config.ModelParallelConfig
    on_gpu = torch.cuda.is_available()
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=not on_gpu,
                               perform_initialization=False, sequence_parallel=False,
                               gradient_accumulation_fusion=False, params_dtype=torch.float32)


def _no_init(_weight: torch.Tensor) -> None:
    """Megatron's init_method; unused (perform_initialization=False): the weights are copied in."""


@functools.cache
def _megatron_linears():
    """megatron-core's Column/RowParallelLinear returning one tensor (megatron returns (y, bias))."""
    tensor_parallel = megatron_core().tensor_parallel
    ColumnParallelLinear, RowParallelLinear = tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear

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
    set_tensor_model_parallel_attributes = megatron_core().tensor_parallel.set_tensor_model_parallel_attributes
    set_tensor_model_parallel_attributes(layer.weight, True, dim, stride)
    # megatron tags a column-parallel bias (split with the rows) itself; a row-parallel one is replicated
    assert dim == 1 or layer.bias.partition_dim == 0
    return layer
