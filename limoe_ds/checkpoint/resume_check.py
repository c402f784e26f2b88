"""Resuming with a changed configuration: what may change, what is refused, checked before any process group.

``check_resume(cfg, resume, world)`` finds the checkpoint ``--resume`` will take (``auto``: the
latest complete one in ``train.run_dir``; or the given directory), reads the resolved config its
marker saved (``limoe_complete.json`` -> ``"config"``) and compares it key by key with the new
resolved config. A change that cannot be honoured raises ONE ``ConfigError`` naming the key with
the saved and the new value (``--resume: model.width is 256 in CKPT but 128 now (...); resume with
the saved value, or start a new run_dir``); the legitimate changes come back as log lines
(``resume: train.steps changed 8 -> 12``).

The policy, key by key (``RULES``, first match wins; keys of the "limoe" block without their
prefix, DeepSpeed's keys as they are written in the JSON):

* the layout (world size, ``parallel.tensor_parallel_size``, ``parallel.expert_parallel_size``):
  refused with the reshard hint (``tools/convert_checkpoint.py reshard``), as ``checkpoint.io.load``.
* refused, the weights or the optimizer state do not fit: every ``model.*`` key that shapes the
  parameters or the computation (width, depth, heads, patch, vocabulary, pooling, ``moe.num_experts``,
  ``moe.layers``, ``moe.modality_experts``, ``moe.text_experts``, ...);
  ``train_micro_batch_size_per_gpu`` / ``train_batch_size`` (the saved data
  position counts batches of the saved size); ``zero_optimization.stage``; ``bf16.enabled`` /
  ``fp16.enabled``; ``optimizer.type``.
* refused, the new value would be silently ignored: ``optimizer.params.*`` (betas, eps,
  weight_decay, and the lr without a WarmupCosineLR schedule: DeepSpeed restores them from the
  checkpoint's optimizer param groups); ``train.seed``, ``model.init_std``, ``model.temperature_init``
  (they only seed / initialise what the checkpoint restores).
* refused, the saved data position would mean something else: ``data.train`` (the sources; the same
  files under another spelling of the path are fine), ``data.seed``, ``data.shuffle_buffer``,
  ``data.num_workers`` (readers per rank, counted as ``max(1, n)``), ``data.caption_key`` /
  ``data.image_key``; ``tokenizer`` (a file with other contents; the same contents elsewhere are fine).
* refused, the optimizer state holds the saved trainable parameters: ``train.image_tower`` (LiT's lock,
  ``lock``, ``unlocked_groups``); its ``init`` (the checkpoint holds the tower) and ``dropless`` are allowed.
* allowed and logged: ``train.steps`` (and the schedule's ``total_num_steps`` derived from it),
  ``train.run_dir`` (resume another run's checkpoint into a new directory), ``save_every``,
  ``keep_last``, ``log_every``, ``max_consecutive_nonfinite``, ``activation_checkpointing``;
  ``scheduler.*`` (only its position is restored); ``optimizer.params.lr`` with WarmupCosineLR (it
  scales the optimizer's lr as configured now); ``gradient_clipping`` and the other DeepSpeed engine
  settings; ``eval.*``, ``logging.*``, ``parallel.world_size`` (a pin, checked at start);
  ``data.val``, ``data.prefetch_factor``, ``data.max_image_pixels``, ``data.max_caption_chars``,
  ``data.crop_*`` (augmentation); the router's training knobs ``model.moe.capacity_factor``,
  ``eval_capacity_factor``, ``capacity_multiple_of``, ``batch_priority``, ``noise_std`` and the aux
  loss weights; ``model.temperature_max`` (a clamp applied every step).
* any other key of the "limoe" block: refused (not known to be safe); any other DeepSpeed key:
  allowed and logged.

A key a marker does not hold (a checkpoint written before the key existed) is not compared.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from limoe_ds.config.errors import ConfigError

FIX = "resume with the saved value, or start a new run_dir"
_SHAPE = "the checkpoint's weights and optimizer state are of the saved model"
_IGNORED_OPT = "DeepSpeed restores it from the checkpoint's optimizer state: the new value would be ignored"
_DATA = "the saved data position is a position in the saved stream"

ALLOW, REFUSE = "allow", "refuse"
RULES: list[tuple[str, str, str]] = [
    # (key pattern, policy, why); first match wins
    ("train.seed", REFUSE, "it seeds the initialisation and router noise, which the checkpoint restores: "
                           "the new seed would have no effect"),
    ("train.image_tower.init", ALLOW, ""),  # the checkpoint holds the tower: the export only checks its shape
    ("train.image_tower.dropless", ALLOW, ""),  # how the locked tower routes
    ("train.image_tower*", REFUSE, "the optimizer state holds the saved run's trainable parameters: a locked "
                                   "one has none"),
    ("train.*", ALLOW, ""),
    ("eval.*", ALLOW, ""),
    ("logging.*", ALLOW, ""),
    ("parallel.world_size", ALLOW, ""),
    ("parallel.*", REFUSE, "the checkpoint is sharded for the saved layout"),
    ("model.moe.num_experts", REFUSE, _SHAPE),
    ("model.moe.layers", REFUSE, _SHAPE),
    ("model.moe.modality_experts", REFUSE, _SHAPE),  # one shared pool <-> VL-MoE's two
    ("model.moe.text_experts", REFUSE, _SHAPE),
    ("model.moe", REFUSE, _SHAPE),  # dense <-> MoE
    ("model.moe.*", ALLOW, ""),  # routing knobs: capacity, BPR, noise, aux-loss weights
    ("model.temperature_max", ALLOW, ""),
    ("model.init_std", REFUSE, "it only initialises the weights, which the checkpoint restores"),
    ("model.temperature_init", REFUSE, "it only initialises the temperature, which the checkpoint restores"),
    ("model.*", REFUSE, _SHAPE),
    ("data.val", ALLOW, ""),
    ("data.val.*", ALLOW, ""),
    ("data.prefetch_factor", ALLOW, ""),
    ("data.max_image_pixels", ALLOW, ""),
    ("data.max_caption_chars", ALLOW, ""),
    ("data.crop_*", ALLOW, ""),
    ("data.train*", REFUSE, f"another dataset: {_DATA}"),
    ("data.*", REFUSE, _DATA),
    ("tokenizer", REFUSE, "the text embeddings were trained for the saved tokenizer's ids"),
    ("train_micro_batch_size_per_gpu", REFUSE, f"{_DATA} of batches of the saved size"),
    ("train_batch_size", REFUSE, f"{_DATA} of batches of the saved size"),
    ("gradient_accumulation_steps", REFUSE, _SHAPE),
    ("zero_optimization.stage", REFUSE, "the optimizer state is partitioned for the saved ZeRO stage"),
    ("bf16.enabled", REFUSE, "the optimizer state and weights are saved for the saved precision"),
    ("fp16.enabled", REFUSE, "the optimizer state and weights are saved for the saved precision"),
    ("optimizer.type", REFUSE, "the optimizer state is the saved optimizer's"),
    ("optimizer.params.lr", ALLOW, ""),  # refused below without WarmupCosineLR
    ("optimizer.*", REFUSE, _IGNORED_OPT),
    ("scheduler.*", ALLOW, ""),
]
_LIMOE_SECTIONS = ("model", "parallel", "data", "tokenizer", "train", "eval", "logging")


def policy(key: str) -> tuple[str, str]:
    """(ALLOW or REFUSE, why) for a display key."""
    for pattern, verdict, why in RULES:
        if fnmatch.fnmatchcase(key, pattern):
            return verdict, why
    if key.split(".")[0] in _LIMOE_SECTIONS:
        return REFUSE, "not known to be safe to change on a resume"
    return ALLOW, ""  # another DeepSpeed engine setting: applied from the new config


def find_checkpoint(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint ``--resume`` takes: None for 'none' or an empty run_dir."""
    from limoe_ds.checkpoint import io as checkpoint
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoint.find_latest(Path(run_dir) / "checkpoints")
    return Path(resume)


def check_resume(cfg, resume: str, world: int) -> tuple[Path | None, list[str]]:
    """-> (the checkpoint a resume will load or None, one log line per allowed change).
    Raises ConfigError (one line) for a change that cannot be honoured."""
    path = find_checkpoint(cfg.train.run_dir, resume)
    if path is None:
        return None, []
    meta = _marker(path, auto=resume == "auto")
    if meta is None:
        return path, [f"resume: no readable marker in {path.parent}; the config is not compared before the load"]
    path, meta = meta
    _check_layout(meta, path, cfg, world)
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return path, [f"resume: {path} stores no config (an old checkpoint); the new config is not compared with it"]
    new = json.loads(json.dumps(cfg.to_dict(), default=str))
    return path, compare(saved, new, path)


def _marker(path: Path, *, auto: bool) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint, its marker). A given directory's marker must read; with ``auto``, an unreadable
    marker (a damaged latest checkpoint, for the load to fall back from) is passed over for the
    next older one, whose config is the run's all the same (structural changes are refused)."""
    from limoe_ds.checkpoint import io as checkpoint
    candidates = [path]
    if auto:
        candidates += [p for p in reversed(checkpoint.complete_checkpoints(path.parent)) if p != path]
    for p in candidates:
        try:
            return p, checkpoint.read_marker(p, "--resume")
        except ConfigError:
            if not auto:
                raise
        except (OSError, ValueError) as e:  # a truncated or foreign marker
            if not auto:
                raise ConfigError(f"--resume: {p / checkpoint.MARKER} is unreadable ({e}); resume from another "
                                  f"checkpoint (--resume DIR) or start a new run_dir") from None
    return None


def _check_layout(meta: dict[str, Any], path: Path, cfg, world: int) -> None:
    from limoe_ds.checkpoint import io as checkpoint
    saved_world = int(meta["world_size"])
    if saved_world != world:
        raise ConfigError(f"--resume: {path} was saved by {saved_world} ranks, this run has {world}; resume with "
                          f"{saved_world} ranks, or convert it: tools/convert_checkpoint.py reshard")
    saved = checkpoint.saved_layout(meta)
    tp, ep = cfg.parallel.tensor_parallel_size, cfg.parallel.expert_parallel_size
    if (saved.tp, saved.ep) != (tp, ep):
        raise ConfigError(f"--resume: {path} was saved at tp={saved.tp}, ep={saved.ep}; this run is tp={tp}, ep={ep}: "
                          f"convert it first with tools/convert_checkpoint.py reshard --tp {tp} --ep {ep} "
                          f"--world {world}")


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    """Display keys -> values: the "limoe" block's keys without their prefix, DeepSpeed's as written;
    mappings are walked, lists are values."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    for k, v in d.items():
        walk(v, "" if k == "limoe" else k)
    return out


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def compare(saved: dict[str, Any], new: dict[str, Any], path: Path) -> list[str]:
    """Compare two resolved configs (``RunConfig.to_dict()``, JSON-normalised); -> the allowed
    changes' log lines; ConfigError for the first refused change (and how many more there are)."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        if key in old_flat and key in new_flat:
            if old_flat[key] != new_flat[key]:
                changes[key] = (old_flat[key], new_flat[key])
            continue
        # on one side only: a section replaced by a value (model.moe: {...} -> null) is a change of
        # that section; a key the marker does not hold at all (an older checkpoint) is not compared
        have, other = (old_flat, new_flat) if key in old_flat else (new_flat, old_flat)
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if parent in other:
                sub = _section(saved if have is old_flat else new, parts[:i])
                changes[parent] = (sub, other[parent]) if have is old_flat else (other[parent], sub)
                break
    _split_sources(changes)
    logs, refused = [], []
    for key, (old, cur) in sorted(changes.items()):
        verdict, why = _verdict(key, old, cur, new_flat)
        if verdict == REFUSE:
            refused.append((key, old, cur, why))
        else:
            logs.append(f"resume: {key} changed {_show(old)} -> {_show(cur)}{f' ({why})' if why else ''}")
    if refused:
        order = [k for k in ("model.", "train_micro", "train_batch", "zero_", "bf16", "fp16", "optimizer", "data",
                             "tokenizer")]
        refused.sort(key=lambda r: next((i for i, p in enumerate(order) if r[0].startswith(p)), len(order)))
        key, old, cur, why = refused[0]
        more = f"; {len(refused) - 1} more refused change(s): {', '.join(r[0] for r in refused[1:])}" \
            if len(refused) > 1 else ""
        raise ConfigError(f"--resume: {key} is {_show(old)} in {path} but {_show(cur)} now ({why}){more}; {FIX}")
    return logs


def _split_sources(changes: dict[str, tuple[Any, Any]]) -> None:
    """data.train, the same number of sources: one change per field (``data.train[0].path``)."""
    old, cur = changes.get("data.train", (None, None))
    if not (isinstance(old, list) and isinstance(cur, list) and len(old) == len(cur)
            and all(isinstance(s, dict) for s in old + cur)):
        return
    del changes["data.train"]
    for i, (a, b) in enumerate(zip(old, cur)):
        for k in sorted(set(a) & set(b)):  # the fields of both (an older marker may lack new ones)
            if a[k] != b[k]:
                changes[f"data.train[{i}].{k}"] = (a[k], b[k])


def _section(d: dict[str, Any], parts: list[str]) -> Any:
    node = d.get("limoe", {}) if parts[0] in _LIMOE_SECTIONS else d
    for p in parts:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def _verdict(key: str, old: Any, cur: Any, new_flat: dict[str, Any]) -> tuple[str, str]:
    """The policy, refined where the values decide: paths to the same files, readers per rank,
    the tokenizer's contents, the lr under a schedule that uses it."""
    if (key == "data.val.path" or (key.startswith("data.train[") and key.endswith("].path"))) \
            and _real(old) == _real(cur):
        return ALLOW, "the same files"
    if key == "data.num_workers" and isinstance(old, int) and isinstance(cur, int) and max(1, old) == max(1, cur):
        return ALLOW, "the same number of readers per rank"
    if key == "tokenizer":
        return _tokenizer_verdict(old, cur)
    if key == "optimizer.params.lr" and new_flat.get("scheduler.type") != "WarmupCosineLR":
        return REFUSE, f"without a WarmupCosineLR scheduler {_IGNORED_OPT}"
    return policy(key)


def _real(p: Any) -> Any:
    if isinstance(p, str):  # a procedural source's name (synthetic:scenes) is compared as it is written
        return p if p.startswith("synthetic:") else os.path.realpath(p)
    if isinstance(p, list):
        return [_real(q) for q in p]
    return p


def _tokenizer_verdict(old: Any, cur: Any) -> tuple[str, str]:
    old_p, cur_p = Path(str(old)), Path(str(cur))
    if not old_p.is_file():
        return ALLOW, (f"the saved tokenizer {str(old)!r} is not there to compare: make sure {str(cur)!r} "
                       f"is the same file")
    if old_p.read_bytes() == cur_p.read_bytes():
        return ALLOW, "the same contents"
    return REFUSE, "a tokenizer with other contents: the text embeddings were trained for the saved tokenizer's ids"
