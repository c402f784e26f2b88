"""Parallelism, applied from outside the plain model: the layout (``layout``), the tensor-parallel
plan (``tp_plan``), the process groups (``groups``), collectives over them (``collectives``) and the
per-GPU memory estimate (``memory``)."""

from limoe_ds.parallel.groups import MegatronMPU, checkpoint_writers, data_parallel_group, setup, state, teardown
from limoe_ds.parallel.layout import Layout, check_layout
from limoe_ds.parallel.tp_plan import TP_PLAN, tp_partition, tp_shard, tp_unshard
from limoe_ds.parallel import tp_plan


def parallelize(model, layout: Layout):
    """Apply ``layout``'s tensor parallelism to a plain model built for its expert-parallel rank
    (``build_model(cfg, ep_size=layout.ep, ep_rank=layout.ep_rank)``); after ``setup(layout)``."""
    return tp_plan.apply(model, layout.tp, layout.tp_rank)


__all__ = ["Layout", "check_layout", "TP_PLAN", "tp_partition", "tp_shard", "tp_unshard", "MegatronMPU", "setup",
           "teardown", "state", "data_parallel_group", "checkpoint_writers", "parallelize"]
