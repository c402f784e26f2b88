"""Reshard a checkpoint to another layout (tensor-parallel size, expert-parallel size, world size).

The target layout's engine is built and filled from the layout-free state
(``limoe_ds.checkpoint.convert.read_full_state``) through DeepSpeed's own ``safe_set_full_*``, so
ZeRO's partitioning at the new layout is DeepSpeed's; then a normal, atomic checkpoint is saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from limoe_ds.checkpoint import format as fmt
from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.compat import deepspeed as compat
from limoe_ds.checkpoint.convert import CheckpointError, read_full_state
from limoe_ds.moe.names import global_expert_name, local_experts, split_expert_name
from limoe_ds.runtime.launch_env import free_port


def resharded_config(marker: dict[str, Any], *, tp: int, ep: int, world: int) -> dict[str, Any]:
    """The run's config for another layout: parallel sizes, world pin and the global batch."""
    raw = json.loads(json.dumps(marker["config"]))
    parallel = raw["limoe"].setdefault("parallel", {})
    parallel.update(tensor_parallel_size=tp, expert_parallel_size=ep, world_size=world)
    raw.pop("train_batch_size", None)  # re-derived for the new data-parallel size (config.run)
    return raw


def check_reshard(src: Path, out: Path, *, tp: int, ep: int, world: int) -> dict[str, Any]:
    """Everything that can be refused before any process starts; returns the source marker."""
    from limoe_ds.config import run as run_config
    try:
        marker = checkpoint.read_marker(src, "checkpoint")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    from limoe_ds.checkpoint import integrity
    integrity.require(src, "checkpoint")  # every file, once, before any rank reads a part of it
    if marker["config"].get("zero_optimization", {}).get("stage", 0) == 0:
        raise CheckpointError(f"{src}: ZeRO stage 0; reshard fills the target through ZeRO 1/2's partitions; "
                              f"export works for it (tools/convert_checkpoint.py export)")
    if out.exists():
        raise CheckpointError(f"{out} exists; choose another output directory")
    try:
        run_config.resolve(resharded_config(marker, tp=tp, ep=ep, world=world), world_size=world, check_paths=False)
    except ValueError as e:
        raise CheckpointError(f"the layout tp={tp}, ep={ep}, world={world} cannot hold this model: {e}") from None
    return marker


def experts_of(ep_rank: int, num_local: Callable[[str], int]) -> Callable[[str], bool]:
    """name -> whether an expert-parallel rank holds it: every dense parameter, and the experts
    ep_rank * n ... (ep_rank + 1) * n - 1 of its layer, n = ``num_local(name)`` (single-device names)."""

    def keep(name: str) -> bool:
        parts = split_expert_name(name)
        if parts is None:
            return True
        n = num_local(name)
        return ep_rank * n <= parts[1] < (ep_rank + 1) * n
    return keep


def reshard_rank(rank: int, world: int, src: str, out: str, tp: int, ep: int) -> None:
    """One rank of the target layout: build its engine, fill it from the layout-free state, save.

    Module weights, the fp32 master weights and Adam's moments go in through DeepSpeed's own
    ``safe_set_full_*`` (which know its partitioning); the step, LR schedule and per-rank RNG and
    data positions (by data-parallel rank, when that size is unchanged) are carried over.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from limoe_ds import parallel
    from limoe_ds.config import run as run_config
    from limoe_ds.train.engine import build_engine
    from limoe_ds.model import build_model, lit
    src_dir, out_root = Path(src), Path(out)
    marker = checkpoint.read_marker(src_dir, "checkpoint")
    cfg = run_config.resolve(resharded_config(marker, tp=tp, ep=ep, world=world), world_size=world, check_paths=False)
    layout = parallel.Layout(rank=rank, world_size=world, ep=ep, tp=tp)
    state = read_full_state(src_dir, keep=experts_of(layout.ep_rank, lambda name: local_experts(cfg.model, name, ep)))
    parallel.setup(layout)
    # on the CPU, not meta: DeepSpeed tags expert parameters at construction (to_empty would drop the tags)
    model = parallel.parallelize(build_model(cfg.model, ep_size=ep, ep_rank=layout.ep_rank), layout)

    def local(full: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        gname = global_expert_name(name, layout.ep_rank, local_experts(cfg.model, name, ep))
        split = parallel.tp_partition(gname) if tp > 1 else None
        value = full[gname]
        return value if split is None else parallel.tp_shard(value, *split, tp, layout.tp_rank)

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local(state.weights, name))
    lit.lock_image_tower(model, cfg.train.image_tower)  # a locked parameter: a module weight, no optimizer state
    engine, _ = build_engine(model, cfg.deepspeed)
    compat.prepare_adam_state_for_fill(engine, state.optimizer_template)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        safe_set_full_fp32_param(p, local(state.weights, name))
        safe_set_full_optimizer_state(p, local(state.exp_avg, name), "exp_avg")
        safe_set_full_optimizer_state(p, local(state.exp_avg_sq, name), "exp_avg_sq")
    if engine.lr_scheduler is not None and state.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state.lr_scheduler)
    engine.global_steps = state.global_steps
    engine.global_samples = engine.global_steps * cfg.deepspeed["train_batch_size"]
    old = checkpoint.saved_layout(marker)
    if old.dp == layout.dp:  # the same data-parallel rank continues the same data stream and RNG
        rank_state = torch.load(fmt.rank_state(src_dir, layout.dp_rank * old.tp), weights_only=False)
    else:  # per-reader positions cannot carry over: every source continues at its next epoch
        from limoe_ds.data.loader import epoch_start_state
        saved = [torch.load(fmt.rank_state(src_dir, d * old.tp), weights_only=False)["data"]
                 for d in range(old.dp)]
        data = None if None in saved else epoch_start_state(saved, layout.dp_rank)
        rank_state = {"rng": None, "data": data, "step": state.step}
    checkpoint.save(engine, out_root, state.step, rank_state=lambda: rank_state,
                    meta={"preset": marker.get("preset"), "data_skips": marker.get("data_skips", {}),
                          "config": cfg.to_dict(), "resharded_from": str(src_dir.resolve()),
                          "source_layout": {"tp": old.tp, "ep": old.ep, "world_size": old.world_size}},
                    keep_last=1)
    parallel.teardown()


def reshard(src: str | os.PathLike, out: str | os.PathLike, *, tp: int, ep: int, world: int) -> Path:
    """Write ``out/stepN`` (+ ``latest``): the checkpoint ``src`` at layout (tp, ep, world).

    The data position carries over exactly when the data-parallel size stays; otherwise every
    source continues at the start of its next epoch (limoe_ds.data.loader.epoch_start_state).

    Under a launcher that started ``world`` ranks each rank does its part; otherwise ``world`` CPU
    processes (gloo) are started here. ``out`` is a checkpoint root: resume with
    ``--resume OUT/stepN`` (or ``train.run_dir`` whose checkpoints/ is OUT) at the new layout.
    """
    import torch.multiprocessing as mp
    from limoe_ds.runtime.launch_env import world_from_env
    src, out = Path(src), Path(out)
    check_reshard(src, out, tp=tp, ep=ep, world=world)
    rank, launched = world_from_env()
    if launched > 1:
        if launched != world:
            raise CheckpointError(f"--world {world} but the launcher started {launched} ranks")
        from limoe_ds.train.engine import init_distributed
        init_distributed()
        reshard_rank(rank, world, str(src), str(out), tp, ep)
    else:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_spawned, args=(r, world, port, str(src), str(out), tp, ep)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise CheckpointError(f"resharding failed on ranks {failed} (their errors are above); nothing was "
                                  f"written to {out} except possibly a .partial directory, which is ignored")
    return out


def _spawned(rank: int, world: int, port: int, src: str, out: str, tp: int, ep: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(1)
    from limoe_ds.train.engine import init_distributed
    init_distributed()
    try:
        reshard_rank(rank, world, src, out, tp, ep)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
