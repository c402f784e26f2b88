"""Atomic, resumable checkpoints on top of DeepSpeed's engine checkpoints.

The files (``limoe_ds.checkpoint.format``): per step, DeepSpeed's (model, ZeRO optimizer shards,
per-expert files), a per-rank state (RNG states, data position) and a completion marker written
last; ``latest`` holds the newest complete tag (replaced atomically).

A save writes ``stepN.partial`` and renames it to ``stepN`` only after every rank has finished
(barrier) and the marker is written, so a crash mid-save leaves the previous checkpoint intact and
loadable; ``find_latest`` ignores partial directories, and the next save removes them.

Integrity (``limoe_ds.checkpoint.integrity``): every file's size and crc32 are computed while it is
written and recorded in the marker (``"files"``); a resume verifies them first, the ranks splitting
the files and gathering one verdict (``verify_collectively``), so that every rank takes the same
decision. ``choose_resume``: ``--resume auto`` takes the newest checkpoint that verifies (a warning
names the damaged file and the steps that will be recomputed); an explicit ``--resume DIR`` that
does not verify is one ``CheckpointError`` line naming the file and the fallback command. A damaged
checkpoint is never deleted: pruning skips it and deletes only earlier steps (``prunable``), and
saving its step again sets it aside as ``stepN.damaged``. A write error on any rank (disk full) is
one line on every rank naming the file, the size needed and what to free (``save``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from limoe_ds.checkpoint import format as fmt
from limoe_ds.checkpoint import integrity
from limoe_ds.checkpoint.format import CheckpointError
from limoe_ds.parallel.collectives import broadcast_object, gather_objects

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
    Every file is checksummed as it is written and recorded in the marker (``integrity``). A write
    error on any rank (disk full) is agreed on by every rank in one gather after the writes, and
    raised on every rank as one ``CheckpointError`` line naming the file; the ``.partial`` stays
    (never taken for complete; the next save removes it) and the previous checkpoint is intact.
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
    with checkpoint_writers(), integrity.recording(engine, partial) as rec:
        engine.save_checkpoint(str(ckpt_root), tag=partial.name, client_state={"limoe_step": step},
                               save_latest=False)
    files, error = dict(rec.files), rec.error
    if error is None:
        final_rank_file = fmt.rank_state(partial, _rank())
        tmp = final_rank_file.with_name(final_rank_file.name + ".tmp")
        try:
            files[final_rank_file.name] = integrity.torch_save(rank_state(), tmp)
            os.replace(tmp, final_rank_file)
        except integrity.WriteError as e:
            error = e
    gathered = gather_objects((_error_report(error), files))  # every rank's errors and file checksums
    _raise_write_error([r for r, _ in gathered], ckpt_root, step)
    report = None
    if _rank() == 0:
        recorded = {name: entry for _, rank_files in gathered for name, entry in rank_files.items()}
        try:
            _finish(ckpt_root, step, partial, final, recorded, meta, keep_last)
        except OSError as e:
            report = _error_report(integrity.WriteError(getattr(e, "filename", None) or partial / MARKER, e, 0))
    _raise_write_error(gather_objects(report), ckpt_root, step)
    return final


def _finish(ckpt_root: Path, step: int, partial: Path, final: Path, recorded: dict, meta: dict,
            keep_last: int) -> None:
    """Rank 0, after every rank has written: the marker (with every rank's file checksums), the
    rename, ``latest``, pruning."""
    for p in sorted(partial.iterdir()):  # written outside the checkpoint engine: hash it now
        if p.is_file() and p.name not in recorded and p.name != MARKER:
            recorded[p.name] = integrity.file_entry(p)
    world = dist.get_world_size() if dist.is_initialized() else 1
    atomic_write_text(partial / MARKER, json.dumps({"step": step, "world_size": world, **meta,
                                                    "files": dict(sorted(recorded.items()))},
                                                   indent=1, default=str))
    if final.exists():  # re-saving a step (e.g. after a resume): replace it; a damaged one is set aside
        if final.resolve() in _DAMAGED:
            aside = final.with_name(final.name + fmt.DAMAGED_SUFFIX)
            n = 1
            while aside.exists():
                n += 1
                aside = final.with_name(f"{final.name}{fmt.DAMAGED_SUFFIX}{n}")
            os.replace(final, aside)
            print(f"warning: {final} was damaged; kept as {aside} (delete it when you no longer need it)",
                  file=sys.stderr, flush=True)
        else:
            shutil.rmtree(final)
    os.replace(partial, final)  # complete from here: failing to write ``latest`` (find_latest ignores it) only warns
    try:
        atomic_write_text(ckpt_root / fmt.LATEST, final.name)
    except OSError as e:
        print(f"warning: {ckpt_root / fmt.LATEST}: cannot be written ({e.strerror}); {final} is complete",
              file=sys.stderr, flush=True)
    for old in prunable(ckpt_root, step, keep_last):
        shutil.rmtree(old)


def prunable(ckpt_root: Path, step: int, keep_last: int) -> list[Path]:
    """What pruning deletes after ``step`` was saved: complete checkpoints of EARLIER steps beyond the
    newest ``keep_last - 1`` of them (``step`` itself is the newest kept). Never a checkpoint found
    damaged in this process (it does not count as a kept one either), never a later step (a run that
    fell back from a damaged checkpoint reaches it again and sets it aside then)."""
    older = [c for c in complete_checkpoints(ckpt_root)
             if fmt.tag_step(c.name) < step and c.resolve() not in _DAMAGED]
    return older[:max(0, len(older) - max(keep_last - 1, 0))]


_DAMAGED: set[Path] = set()
"""Checkpoints found damaged by ``verify_collectively`` in this process: never pruned, set aside
(``stepN.damaged``) when their step is saved again."""


def _error_report(error: "integrity.WriteError | None") -> tuple | None:
    if error is None:
        return None
    return (str(error.path), error.errno, error.strerror, error.written)


def _raise_write_error(reports: list, ckpt_root: Path, step: int) -> None:
    """Every rank: raise the first rank's write error (the same line everywhere), if any."""
    first = next((r for r in reports if r is not None), None)
    if first is None:
        return
    path, err, strerror, _ = first
    good = [c for c in complete_checkpoints(ckpt_root) if fmt.tag_step(c.name) < step and c.resolve() not in _DAMAGED]
    prev = good[-1] if good else None
    partial = ckpt_root / f"{fmt.tag(step)}{fmt.PARTIAL_SUFFIX}"
    if err in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if err == errno.ENOSPC else "disk quota exceeded"
        free = integrity.free_bytes(ckpt_root)
        need = (f"the checkpoint needs about {integrity.human(integrity.checkpoint_bytes(prev))} (the size of "
                f"{prev.name})" if prev is not None else "the checkpoint did not fit")
        keep = (f"the previous complete checkpoint {prev} is intact: resume it with --resume auto"
                if prev is not None else "there is no earlier complete checkpoint")
        raise CheckpointError(f"{path}: {what} while saving step {step}: {need}, "
                              f"{integrity.human(free) if free is not None else 'unknown'} free on {ckpt_root}; "
                              f"free space (delete older checkpoints or lower train.keep_last, or move "
                              f"train.run_dir to a larger disk); {keep}; {partial.name} is incomplete and is "
                              f"removed by the next save")
    raise CheckpointError(f"{path}: cannot be written ({strerror}) while saving step {step}; {partial.name} is "
                          f"incomplete; the previous complete checkpoint {prev} is intact")


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (a ``stepN`` directory with a marker), oldest first; not verified."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if fmt.tag_step(p.name) is not None and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: fmt.tag_step(p.name))


def find_latest(ckpt_root: Path) -> Path | None:
    complete = complete_checkpoints(ckpt_root)
    return complete[-1] if complete else None


def read_marker(ckpt_dir: Path, flag: str) -> dict[str, Any]:
    """The completion marker's contents; a clear error naming ``flag`` when the checkpoint is
    incomplete (ConfigError) or the marker is unreadable (CheckpointError, naming the marker)."""
    marker = Path(ckpt_dir) / MARKER
    if not marker.is_file():
        from limoe_ds.config.errors import ConfigError
        raise ConfigError(f"{flag}: {ckpt_dir} is not a complete limoe_ds checkpoint (no {MARKER})")
    return integrity.read_marker_file(ckpt_dir)


def verify_collectively(ckpt_dir: Path) -> integrity.Verdict:
    """Verify every file of ``ckpt_dir``, the ranks splitting the files (each hashes every n-th),
    and gather what they found: every rank returns the same Verdict, so every rank takes the same
    decision. (DeepSpeed's load has each rank read every ZeRO shard of its lane and the shared model
    file, so "each rank verifies what it reads" would hash most of the checkpoint on every rank.)"""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = integrity.verify(ckpt_dir, share=(_rank(), world))
    found = gather_objects((mine.problems, mine.legacy))
    verdict = integrity.Verdict(sorted(p for problems, _ in found for p in problems),
                                legacy=any(legacy for _, legacy in found))
    if not verdict.ok:
        _DAMAGED.add(Path(ckpt_dir).resolve())
    return verdict


def _problem(verdict: integrity.Verdict) -> str:
    more = len(verdict.problems) - 1
    return verdict.problems[0] + (f" (and {more} more damaged file{'s' * (more > 1)})" if more else "")


def choose_resume(ckpt_root: Path, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume (``resume``: 'auto' or a checkpoint directory), verified on every
    rank together, and the warning lines to print. 'auto': the newest complete checkpoint that
    verifies; a damaged newer one is named in a warning (its steps are recomputed) and kept.
    An explicit directory that does not verify: ``CheckpointError`` naming the file and the newest
    earlier checkpoint that verifies. Every rank returns the same."""
    notes: list[str] = []
    if resume != "auto":
        path = Path(resume)
        if not (path / MARKER).is_file():
            read_marker(path, "--resume")  # no marker: not a complete checkpoint (ConfigError)
        verdict = verify_collectively(path)
        if verdict.ok:
            return path, [f"note: {path}: {integrity.LEGACY_NOTE}"] if verdict.legacy else []
        fallback = _newest_good(path.parent, below=fmt.tag_step(path.name), skip=path)
        hint = (f"the previous complete checkpoint is {fallback}: resume it with --resume {fallback}"
                if fallback is not None else f"no earlier checkpoint under {path.parent} verifies; "
                                             f"start afresh with --resume none")
        raise CheckpointError(f"--resume: {_problem(verdict)}; {hint}")
    names = broadcast_object([p.name for p in complete_checkpoints(ckpt_root)] if _rank() == 0 else None)
    bad: list[tuple[Path, integrity.Verdict]] = []
    for name in reversed(names):
        path = ckpt_root / name
        verdict = verify_collectively(path)
        if verdict.ok:
            step, newest = fmt.tag_step(name), fmt.tag_step(bad[0][0].name) if bad else None
            for b, v in bad:
                notes.append(f"warning: --resume auto: {_problem(v)}; falling back to {path}: steps "
                             f"{step + 1}-{newest} will be recomputed (the damaged {b.name} is kept)")
            if verdict.legacy:
                notes.append(f"note: {path}: {integrity.LEGACY_NOTE}")
            return path, notes
        bad.append((path, verdict))
    if bad:
        raise CheckpointError(f"--resume auto: {_problem(bad[0][1])}; no complete checkpoint under {ckpt_root} "
                              f"verifies ({len(bad)} damaged, kept); start afresh with --resume none")
    return None, notes


def _newest_good(ckpt_root: Path, below: int | None, skip: Path) -> Path | None:
    names = broadcast_object([p.name for p in complete_checkpoints(ckpt_root)] if _rank() == 0 else None)
    for name in reversed(names):
        path = ckpt_root / name
        if path.resolve() == skip.resolve() or (below is not None and fmt.tag_step(name) >= below):
            continue
        if verify_collectively(path).ok:
            return path
    return None


def saved_layout(meta: dict[str, Any]):
    """The parallel layout (rank 0's view) a checkpoint was written at, from its marker."""
    from limoe_ds.parallel.layout import Layout
    saved = meta.get("config", {}).get("limoe", {}).get("parallel", {})
    return Layout(rank=0, world_size=int(meta["world_size"]), ep=int(saved.get("expert_parallel_size", 1)),
                  tp=int(saved.get("tensor_parallel_size", 1)))


def load(engine, ckpt_dir: Path, *, verified: bool = False) -> tuple[int, dict[str, Any]]:
    """Restore model, optimizer, scheduler (DeepSpeed) and this rank's state; returns (step, rank_state).
    Every file is verified first (by the ranks together) unless ``verified`` (``choose_resume`` did)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_marker(ckpt_dir, "--resume")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world:
        raise CheckpointError(f"--resume: {ckpt_dir} was saved by {meta['world_size']} ranks, this run has {world}; "
                              f"resume with {meta['world_size']} ranks, or convert it: "
                              f"tools/convert_checkpoint.py reshard")
    from limoe_ds import parallel
    state, saved = parallel.state(), saved_layout(meta)
    if state is not None and (saved.tp, saved.ep) != (state.layout.tp, state.layout.ep):
        raise CheckpointError(f"--resume: {ckpt_dir} was saved at tp={saved.tp}, ep={saved.ep}; this run is "
                              f"tp={state.layout.tp}, ep={state.layout.ep}: convert it first with "
                              f"tools/convert_checkpoint.py reshard --tp {state.layout.tp} --ep {state.layout.ep} "
                              f"--world {world}")
    if not verified:
        verdict = verify_collectively(ckpt_dir)
        if not verdict.ok:
            raise CheckpointError(f"--resume: {_problem(verdict)}")
    rank_file = fmt.rank_state(ckpt_dir, _rank())
    if not rank_file.is_file():
        raise CheckpointError(f"--resume: {rank_file} is missing; the checkpoint is incomplete")
    path, client = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {ckpt_dir}")
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
    experts = {p.name for p in ckpt_dir.glob(fmt.EXPERT_STATES_GLOB)}
    integrity.require(ckpt_dir, "--checkpoint", only={fmt.model_states(ckpt_dir, t).name for t in range(tp)}
                      | experts | integrity.recorded(ckpt_dir, fmt.EXPERT_STATES_GLOB))
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
