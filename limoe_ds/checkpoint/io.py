"""Atomic, resumable checkpoints on top of DeepSpeed's engine checkpoints.

The files (``limoe_ds.checkpoint.format``): per step, DeepSpeed's (model, ZeRO optimizer shards,
per-expert files), a per-rank state (RNG states, data position) and a completion marker written
last; ``latest`` holds the newest complete tag (replaced atomically).

A save writes ``stepN.partial`` and renames it to ``stepN`` only after every rank has finished
(barrier) and the marker is written, so a crash mid-save leaves the previous checkpoint intact and
loadable; ``find_latest`` ignores partial directories, and the next save removes them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from limoe_ds.checkpoint import format as fmt

MARKER = fmt.MARKER


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def params_finite(module: torch.nn.Module) -> bool:
    """True iff every parameter is finite on EVERY rank."""
    from limoe_ds.parallel.collectives import any_rank
    return not any_rank(any(not torch.isfinite(p.detach()).all() for p in module.parameters()))


def save(engine, ckpt_root: Path, step: int, *, rank_state: Callable[[], dict[str, Any]], meta: dict[str, Any],
         keep_last: int) -> Path:
    """Save a complete checkpoint for ``step`` atomically; prune to the newest ``keep_last``.

    ``rank_state()`` (RNG states, data position) is called AFTER DeepSpeed's save_checkpoint,
    which draws from torch's RNG: the saved state is the one the uninterrupted run continues with.
    """
    if not params_finite(engine.module):
        raise RuntimeError(f"refusing to save step {step}: the weights are not finite "
                           f"(the run diverged); the last good checkpoint is kept")
    tag = fmt.tag(step)
    final, partial = ckpt_root / tag, ckpt_root / f"{tag}{fmt.PARTIAL_SUFFIX}"
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(f"*{fmt.PARTIAL_SUFFIX}"):
            shutil.rmtree(stale)
    _barrier()
    from limoe_ds.parallel.groups import checkpoint_writers
    with checkpoint_writers():
        engine.save_checkpoint(str(ckpt_root), tag=partial.name, client_state={"limoe_step": step},
                               save_latest=False)
    final_rank_file = fmt.rank_state(partial, _rank())
    tmp = final_rank_file.with_name(final_rank_file.name + ".tmp")
    torch.save(rank_state(), tmp)
    os.replace(tmp, final_rank_file)
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_text(partial / MARKER, json.dumps({"step": step, "world_size": world, **meta}, indent=1,
                                                       default=str))
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(ckpt_root / fmt.LATEST, tag)
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if fmt.tag_step(p.name) is not None and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: fmt.tag_step(p.name))


def find_latest(ckpt_root: Path) -> Path | None:
    complete = complete_checkpoints(ckpt_root)
    return complete[-1] if complete else None


def read_marker(ckpt_dir: Path, flag: str) -> dict[str, Any]:
    """The completion marker's contents; a clear error naming ``flag`` when the checkpoint is incomplete."""
    marker = Path(ckpt_dir) / MARKER
    if not marker.is_file():
        from limoe_ds.config.errors import ConfigError
        raise ConfigError(f"{flag}: {ckpt_dir} is not a complete limoe_ds checkpoint (no {MARKER})")
    return json.loads(marker.read_text())


def saved_layout(meta: dict[str, Any]):
    """The parallel layout (rank 0's view) a checkpoint was written at, from its marker."""
    from limoe_ds.parallel.layout import Layout
    saved = meta.get("config", {}).get("limoe", {}).get("parallel", {})
    return Layout(rank=0, world_size=int(meta["world_size"]), ep=int(saved.get("expert_parallel_size", 1)),
                  tp=int(saved.get("tensor_parallel_size", 1)))


def load(engine, ckpt_dir: Path) -> tuple[int, dict[str, Any]]:
    """Restore model, optimizer, scheduler (DeepSpeed) and this rank's state; returns (step, rank_state)."""
    meta = read_marker(ckpt_dir, "--resume")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world:
        raise ValueError(f"--resume: {ckpt_dir} was saved by {meta['world_size']} ranks, this run has {world}; "
                         f"resume with {meta['world_size']} ranks, or convert it: tools/convert_checkpoint.py reshard")
    from limoe_ds import parallel
    state, saved = parallel.state(), saved_layout(meta)
    if state is not None and (saved.tp, saved.ep) != (state.layout.tp, state.layout.ep):
        raise ValueError(f"--resume: {ckpt_dir} was saved at tp={saved.tp}, ep={saved.ep}; this run is "
                         f"tp={state.layout.tp}, ep={state.layout.ep}: convert it first with "
                         f"tools/convert_checkpoint.py reshard --tp {state.layout.tp} --ep {state.layout.ep} "
                         f"--world {world}")
    rank_file = fmt.rank_state(ckpt_dir, _rank())
    if not rank_file.is_file():
        raise ValueError(f"--resume: {rank_file} is missing; the checkpoint is incomplete")
    path, client = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"--resume: DeepSpeed could not load {ckpt_dir}")
    return int(client["limoe_step"]), torch.load(rank_file, weights_only=False)


def consolidated_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full model's weights (every expert, every head) from a DeepSpeed MoE checkpoint of any
    expert- and tensor-parallel size, for a model built with ep_size=1, tp=1: the shared weights
    (``mp_rank_<t>_model_states.pt`` per tensor-parallel rank t, joined along each parameter's split,
    ``limoe_ds.parallel.tp_partition``) plus one file per expert, named by its global index. These
    are the module weights (bf16 in a bf16 run), not the fp32 optimizer master copy."""
    from limoe_ds.parallel.tp_plan import tp_partition, tp_unshard
    ckpt_dir = Path(ckpt_dir)
    tp = saved_layout(read_marker(ckpt_dir, "--checkpoint")).tp
    parts = []
    for t in range(tp):
        shared = fmt.model_states(ckpt_dir, t)
        if not shared.is_file():
            raise ValueError(f"--checkpoint: {shared} is missing; the checkpoint is incomplete")
        module = torch.load(shared, map_location="cpu", weights_only=False)["module"]
        parts.append({k: v for k, v in module.items() if not k.endswith("._extra_state")})  # megatron's (None)
    state = {}
    for name, value in parts[0].items():
        split = tp_partition(name) if tp > 1 else None
        state[name] = value if split is None else tp_unshard([p[name] for p in parts], *split)
    for f in sorted(ckpt_dir.glob(fmt.EXPERT_STATES_GLOB)):  # replicated over tp
        state.update(torch.load(f, map_location="cpu", weights_only=False))
    return state


def evaluation_config(ckpt_dir: Path, overrides: list[str], world: int):
    """The run's configuration stored in the checkpoint, set up for evaluation on ``world`` ranks
    with the whole model on every rank (expert- and tensor-parallel size 1, any world size)."""
    from limoe_ds.config import run as run_config
    raw = read_marker(ckpt_dir, "--checkpoint")["config"]
    raw = run_config.apply_overrides(raw, ["parallel.expert_parallel_size=1", "parallel.tensor_parallel_size=1",
                                           "parallel.world_size=null", *overrides])
    raw.pop("train_batch_size", None)  # re-derived for this world size
    return run_config.resolve(raw, world_size=world)
