"""Parallelism, applied from outside the plain model: the layout (``layout``), the tensor-parallel
plan (``tp_plan``), the process groups (``groups``), collectives over them (``collectives``) and the
per-GPU memory estimate (``memory``)."""

from limoe_ds.parallel.groups import MegatronMPU, checkpoint_writers, data_parallel_group, setup, state, teardown
from limoe_ds.parallel.layout import Layout, check_layout
from limoe_ds.parallel.tp_plan import TensorParallel, tp_partition, tp_shard, tp_unshard

__all__ = ["Layout", "check_layout", "TensorParallel", "tp_partition", "tp_shard", "tp_unshard", "MegatronMPU",
           "setup", "teardown", "state", "data_parallel_group", "checkpoint_writers"]
