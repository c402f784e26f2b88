"""How parameters are split over tensor-parallel ranks, and the megatron-core linears that hold them.

Tensor-parallel linears: ``TensorParallel.column`` / ``.row`` are the one place that decides how
(plain ``nn.Linear`` at tp=1; megatron-core's Column/RowParallelLinear otherwise, with the CPU
settings on CPU and device initialisation on GPUs). ``tp_partition(name)`` says how each named
parameter is split (dim, stride); initialisation, consolidation and resharding all use it.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn


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
