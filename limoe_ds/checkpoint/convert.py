"""Read a limoe_ds DeepSpeed checkpoint of any layout into one layout-free state, and export it.

DeepSpeed's ``zero_to_fp32`` rejects MoE checkpoints (it does not know the per-expert files and
the expert optimizer groups). Here, for ZeRO 0/1/2 checkpoints of any tensor- and expert-parallel
size (ZeRO 0, whose optimizer states are whole: ``_zero0_parts``). For ZeRO 1/2:

- each rank's ZeRO file holds, per optimizer group, its flat partition of the fp32 master weights
  and of Adam's two moments; the flat group tensor is the partitions of the group's ranks in order
  (dense groups: the data-parallel ranks of one tensor-parallel lane; expert groups: the
  expert-data group, ``limoe_ds.parallel.Layout``), cut in the order of ``param_shapes`` saved in
  ``mp_rank_<t>_model_states.pt``;
- expert names are made global (rank's expert-parallel position x experts per rank + local index)
  and tensor-parallel shards joined (``limoe_ds.parallel.tp_unshard``);

giving every parameter under the name it has in a single-device model (tp=1, ep=1), with its fp32
master weight and Adam moments. ``export`` writes the weights as one safetensors file with the
model config and the tokenizer, into a directory that is renamed into place only when complete.

Errors (``CheckpointError``, a one-line message naming the file): missing shard, unreadable or
truncated file, a checkpoint whose parameters do not match its own config, ZeRO 3, resharding ZeRO 0.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from limoe_ds.checkpoint import format as fmt
from limoe_ds.checkpoint import integrity
from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.checkpoint.format import CheckpointError
from limoe_ds.moe.names import global_expert_name, is_expert, local_experts, split_expert_name
from limoe_ds.parallel.layout import Layout
from limoe_ds.parallel.tp_plan import tp_partition, tp_unshard

__all__ = ["CheckpointError", "FullState", "export", "read_full_state"]


@dataclass
class FullState:
    """A checkpoint without its layout: names as in a single-device model (tp=1, ep=1)."""

    weights: dict[str, torch.Tensor]
    """fp32 master weights (a locked parameter's: its module weight, in the run's dtype, as float32)."""
    exp_avg: dict[str, torch.Tensor]
    """Adam's moments of the trained parameters; a locked one (``locked``) has none."""
    exp_avg_sq: dict[str, torch.Tensor]
    adam_step: dict[str, int]
    """Adam's step count per parameter (per optimizer group in DeepSpeed)."""
    step: int
    config: dict[str, Any]
    """The run's resolved config (DeepSpeed JSON with the "limoe" block), from the checkpoint."""
    layout: Layout
    """The layout the checkpoint was written at (rank 0's view)."""
    lr_scheduler: dict[str, Any] | None
    global_steps: int
    optimizer_template: dict[str, Any]
    """The base optimizer's per-group hyperparameters and non-partition state (e.g. Adam's step),
    from rank 0's shard: what a resharded optimizer is given before its moments are filled in."""
    locked: frozenset[str] = frozenset()
    """The parameters a locked image tower keeps out of the optimizer (train.image_tower,
    limoe_ds.model.lit): read from the module state, without moments."""


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint file, memory-mapped: tensors are read from disk only where they are used (and
    then shared through the page cache by every process on the machine reading the same file)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (was it copied whole?)")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # torch's legacy (pre-zip) format cannot be mapped: read it whole
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupt: torch raises several kinds
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                              f"the file is truncated or damaged") from None


class _Flat:
    """One optimizer group's partitions end to end, not copied (they are memory-mapped): only the
    slices asked for are read."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + p.numel())

    def numel(self) -> int:
        return self.starts[-1]

    def slice(self, start: int, n: int) -> torch.Tensor:
        pieces = []
        for p, lo, hi in zip(self.parts, self.starts, self.starts[1:]):
            a, b = max(start, lo), min(start + n, hi)
            if a < b:
                pieces.append(p[a - lo:b - lo])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()


def read_full_state(ckpt_dir: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> FullState:
    """Weights, Adam moments and step of a ZeRO 0/1/2 checkpoint of any layout, by single-device name.

    ``keep(name)`` picks the parameters to read (default: all); the shard files are memory-mapped, so
    what is not kept is not read. A resharding rank keeps the dense parameters and its own experts."""
    ckpt_dir = Path(ckpt_dir)
    try:
        marker = checkpoint.read_marker(ckpt_dir, "checkpoint")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if keep is None:  # every file, before reading any (a resharding rank's source was verified by check_reshard)
        integrity.require(ckpt_dir, "checkpoint")
    cfg = marker["config"]
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise CheckpointError(f"{ckpt_dir}: ZeRO stage {stage}; conversion reads ZeRO 0/1/2 checkpoints")
    layout = checkpoint.saved_layout(marker)
    lanes = [_load(fmt.model_states(ckpt_dir, t)) for t in range(layout.tp)]
    from limoe_ds.config.run import model_config
    model_cfg = model_config(cfg["limoe"]["model"])
    read = _zero0_parts if stage == 0 else _zero12_parts
    # per lane: dense parameters (tp shards, local names); experts by global name
    prefixes = _locked_prefixes(cfg, model_cfg)
    lane_parts, experts, adam_step, template = read(ckpt_dir, lanes, layout, model_cfg, keep, prefixes)
    locked = _locked_names(model_cfg, prefixes, keep)

    weights, exp_avg, exp_avg_sq = {}, {}, {}
    for name in lane_parts[0]:
        split = tp_partition(name) if layout.tp > 1 else None
        for out, key in ((weights, "fp32"), (exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
            parts = [lane[name][key] for lane in lane_parts]
            out[name] = parts[0] if split is None else tp_unshard(parts, *split)
    for name, values in experts.items():
        weights[name], exp_avg[name], exp_avg_sq[name] = values["fp32"], values["exp_avg"], values["exp_avg_sq"]
    weights.update(_locked_weights(ckpt_dir, lanes, layout, model_cfg, locked))
    _check_against_config(weights, model_cfg, ckpt_dir, keep)
    return FullState(weights, exp_avg, exp_avg_sq, adam_step, int(marker["step"]), cfg, layout,
                     lr_scheduler=lanes[0].get("lr_scheduler"),
                     global_steps=int(lanes[0].get("global_steps", marker["step"])),
                     optimizer_template=template, locked=frozenset(locked))


def _locked_prefixes(cfg: dict[str, Any], model_cfg) -> tuple[str, ...]:
    """The name prefixes the run's train.image_tower locks (limoe_ds.model.lit), () for none."""
    from limoe_ds.config import typed
    from limoe_ds.config.run import ImageTowerInit
    from limoe_ds.model import lit
    init = typed.convert(ImageTowerInit | None, cfg["limoe"].get("train", {}).get("image_tower"), "train.image_tower")
    return lit.locked_prefixes(model_cfg, init)


def _locked_names(model_cfg, prefixes: tuple[str, ...], keep: Callable[[str], bool] | None) -> list[str]:
    """Single-device names of the locked parameters (those ``keep`` keeps)."""
    from limoe_ds.model import build_model, lit
    if not prefixes:
        return []
    return [n for n, _ in build_model(model_cfg, device="meta").named_parameters()
            if lit.is_locked(n, prefixes) and (keep is None or keep(n))]


def _moe_layer_numbers(model) -> dict[str, int]:
    """An MoE layer's name prefix ('blocks.1.ffn.') -> its number in model order (DeepSpeed's
    per-expert checkpoint files, layer_L_expert_X, count them so)."""
    heads = [parts[0] for n, _ in model.named_parameters() if (parts := split_expert_name(n)) is not None]
    return {h: i for i, h in enumerate(dict.fromkeys(heads))}


def _locked_weights(ckpt_dir: Path, lanes: list[dict], layout: Layout, model_cfg,
                    locked: list[str]) -> dict[str, torch.Tensor]:
    """A locked parameter is in no optimizer group: its value is the module's (DeepSpeed saves every
    module parameter), dense ones per tensor-parallel lane in mp_rank_TT, experts in their files."""
    if not locked:
        return {}
    from limoe_ds.model import build_model
    moe_layer = _moe_layer_numbers(build_model(model_cfg, device="meta"))
    cache: dict[Path, dict] = {}
    out = {}
    for name in locked:
        if is_expert(name):
            out[name] = _zero0_module_weight(ckpt_dir, lanes[0], name, 0, moe_layer, cache).float().clone()
            continue
        parts = [_zero0_module_weight(ckpt_dir, lanes[t], name, t, moe_layer, cache).float() for t in range(layout.tp)]
        split = tp_partition(name) if layout.tp > 1 else None
        out[name] = parts[0].clone() if split is None else tp_unshard(parts, *split)
    return out


Parts = dict[str, dict[str, torch.Tensor]]


def _zero12_parts(ckpt_dir: Path, lanes: list[dict], layout: Layout, model_cfg,
                  keep: Callable[[str], bool] | None, locked: tuple[str, ...]
                  ) -> tuple[list[Parts], Parts, dict[str, int], dict]:
    """ZeRO 1/2: every rank's file holds its flat partition of every optimizer group."""
    files = {r: fmt.zero_states(ckpt_dir, r // layout.tp, r % layout.tp) for r in range(layout.world_size)}
    shards = {r: _load(f)["optimizer_state_dict"] for r, f in files.items()}
    lane_parts: list[Parts] = [{} for _ in range(layout.tp)]
    experts: Parts = {}
    adam_step: dict[str, int] = {}
    groups0 = shards[0]["base_optimizer_state"]["param_groups"]
    for g, group in enumerate(groups0):
        is_moe = bool(group.get("moe"))
        # the ranks whose partitions make up the group, in partition order: per ep position (experts)
        # or per tp lane (dense)
        for key, ranks in enumerate(layout.expert_data_groups() if is_moe else layout.dp_groups()):
            lane = 0 if is_moe else key
            shapes = lanes[lane]["param_shapes"][g]
            flat = {k: _Flat([_partition(shards[r], g, k, files[r]) for r in ranks])
                    for k in ("fp32", "exp_avg", "exp_avg_sq")}
            paddings = shards[ranks[0]].get("param_alignment_paddings", [[0]])[g]
            if any(paddings):
                raise CheckpointError(f"{ckpt_dir}: per-parameter alignment padding in optimizer group {g} is not "
                                      f"supported by this converter")
            offset = 0
            step = int(shards[ranks[0]]["base_optimizer_state"]["state"][g]["step"])
            for name, shape in shapes.items():
                n = int(torch.Size(shape).numel())
                if offset + n > flat["fp32"].numel():
                    raise CheckpointError(f"{ckpt_dir}: optimizer group {g} holds {flat['fp32'].numel()} values, "
                                          f"fewer than its parameters need; a shard is truncated or from another run")
                gname = global_expert_name(name, key, local_experts(model_cfg, name, layout.ep)) if is_moe else name
                if keep is not None and not keep(gname):
                    offset += n
                    continue
                values = {k: v.slice(offset, n).view(shape) for k, v in flat.items()}
                offset += n
                if is_moe:
                    experts[gname] = values
                    adam_step[gname] = step
                else:
                    lane_parts[lane][name] = values
                    adam_step[name] = step
            pad = flat["fp32"].numel() - offset
            if pad < 0 or pad > 2 * len(ranks) * 64:
                raise CheckpointError(f"{ckpt_dir}: optimizer group {g} has {pad} values after its parameters; "
                                      f"the shards do not belong together")

    base = shards[0]["base_optimizer_state"]

    def is_partition(v) -> bool:  # a per-entry state tensor (Adam's moments), laid out like the partition
        return torch.is_tensor(v) and v.dim() == 1

    groups = range(len(base["param_groups"]))
    template = {"param_groups": [{k: v for k, v in grp.items() if k != "params"} for grp in base["param_groups"]],
                "state": [{k: v for k, v in base["state"][g].items() if not is_partition(v)} for g in groups],
                "partition_keys": [[k for k, v in base["state"][g].items() if is_partition(v)] for g in groups]}
    return lane_parts, experts, adam_step, template


def _zero0_parts(ckpt_dir: Path, lanes: list[dict], layout: Layout, model_cfg,
                 keep: Callable[[str], bool] | None, locked: tuple[str, ...]
                 ) -> tuple[list[Parts], Parts, dict[str, int], None]:
    """ZeRO 0: DeepSpeed writes one whole (unpartitioned) optimizer state per expert-parallel rank and
    tp lane, ``expp_rank_E_mp_rank_TT_optim_states.pt``: torch's state_dict numbering the parameters
    in the order of our optimizer groups (engine.param_groups, rebuilt here on the meta device); the
    fp32 master is the module itself (fp32 runs: mp_rank_TT / layer_L_expert_X files) or the
    optimizer's ``fp32_groups`` (bf16 runs). Dense parameters come from ep rank 0, experts from tp lane 0."""
    from limoe_ds.train.engine import param_groups
    from limoe_ds.model import build_model, lit
    lane_parts: list[Parts] = [{} for _ in range(layout.tp)]
    experts: Parts = {}
    adam_step: dict[str, int] = {}
    expert_files: dict[Path, dict] = {}
    # local names and their order are the same on every ep rank (each layer's experts numbered 0..E/ep-1)
    model = build_model(model_cfg, device="meta", ep_size=layout.ep, ep_rank=0)
    for n, p in model.named_parameters():  # a locked parameter is in no group (train.engine.param_groups)
        p.requires_grad_(not lit.is_locked(n, locked))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in param_groups(model) for p in group["params"]]
    moe_layer = _moe_layer_numbers(model)
    for e in range(layout.ep):
        for t in range(layout.tp):
            path = fmt.zero0_states(ckpt_dir, e, t)
            saved = _load(path).get("optimizer") or {}
            bf16 = "fp32_groups" in saved
            opt = saved.get("optimizer_state_dict", {}) if bf16 else saved
            numbered = [i for group in opt.get("param_groups", []) for i in group["params"]]
            if numbered != list(range(len(order))):
                raise CheckpointError(f"{path}: its optimizer holds {len(numbered)} parameters, the checkpoint's "
                                      f"model config has {len(order)}; the file is from another run or optimizer")
            master = [p for group in saved["fp32_groups"] for p in group] if bf16 else None
            for i, name in enumerate(order):
                expert = is_expert(name)
                gname = global_expert_name(name, e, local_experts(model_cfg, name, layout.ep))
                if (expert and t != 0) or (not expert and e != 0) or (keep is not None and not keep(gname)):
                    continue
                state = opt["state"].get(i)
                if state is None:
                    raise CheckpointError(f"{path}: no Adam state for parameter {i} ({gname}); the run saved before "
                                          f"its first optimizer step, or the file is damaged")
                fp32 = (master[i] if bf16 else
                        _zero0_module_weight(ckpt_dir, lanes[t], gname, t, moe_layer, expert_files))
                values = {"fp32": fp32.float().clone(), "exp_avg": state["exp_avg"].float().clone(),
                          "exp_avg_sq": state["exp_avg_sq"].float().clone()}
                adam_step[gname] = int(state["step"])
                if expert:
                    experts[gname] = values
                else:
                    lane_parts[t][name] = values
    return lane_parts, experts, adam_step, None


def _zero0_module_weight(ckpt_dir: Path, lane: dict, gname: str, t: int, moe_layer: dict[str, int],
                         cache: dict[Path, dict]) -> torch.Tensor:
    """An fp32 ZeRO-0 run's weight as saved with the module: dense ones in mp_rank_TT, each expert in
    layer_L_expert_X_mp_rank_TT.pt (L numbers the MoE layers in model order, X is the global index)."""
    parts = split_expert_name(gname)
    if parts is None:
        if gname not in lane["module"]:
            raise CheckpointError(f"{fmt.model_states(ckpt_dir, t)} has no {gname}")
        return lane["module"][gname]
    head, expert, _ = parts
    path = fmt.expert_states(ckpt_dir, moe_layer[head], expert, t)
    if path not in cache:
        cache[path] = _load(path)
    if gname not in cache[path]:
        raise CheckpointError(f"{path} has no {gname}; the file is from another run")
    return cache[path][gname]


def _partition(shard: dict[str, Any], g: int, key: str, path: Path) -> torch.Tensor:
    try:
        if key == "fp32":
            return shard["single_partition_of_fp32_groups"][g].float()
        return shard["base_optimizer_state"]["state"][g][key].float()
    except (KeyError, IndexError):
        raise CheckpointError(f"{path}: no {key} for optimizer group {g}; "
                              f"the shard is from another run or optimizer") from None


def _check_against_config(weights: dict[str, torch.Tensor], model_cfg, ckpt_dir: Path,
                          keep: Callable[[str], bool] | None = None) -> None:
    from limoe_ds.model import build_model
    want = {n: tuple(p.shape) for n, p in build_model(model_cfg, device="meta").named_parameters()
            if keep is None or keep(n)}
    got = {n: tuple(t.shape) for n, t in weights.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(n for n in set(want) & set(got) if want[n] != got[n])
    if missing or extra or bad:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"{bad[0]} is {got[bad[0]]}, the config says {want[bad[0]]}")
        raise CheckpointError(f"{ckpt_dir}: the weights do not match the checkpoint's model config ({detail})")


def export(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``out_dir``: model.safetensors (fp32 master weights), config.json (model config),
    tokenizer.json (none for a CLIPPO model), limoe_export.json (provenance). Written to a temporary
    directory, renamed last."""
    from safetensors.torch import save_file
    from limoe_ds.config.run import model_config
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; choose another directory or pass --overwrite")
    state = read_full_state(ckpt_dir)
    tokenizer = state.config["limoe"].get("tokenizer")  # None: a CLIPPO model renders its captions
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise CheckpointError(f"the run's tokenizer {tokenizer} is missing; export needs it next to the weights")
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in state.weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "limoe_step": str(state.step)})
        weights_entry = integrity.file_entry(tmp / "model.safetensors")  # just written: hot in the page cache
        cfg = model_config(state.config["limoe"]["model"])
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        (tmp / "limoe_export.json").write_text(json.dumps({
            "source": str(Path(ckpt_dir).resolve()), "step": state.step, "weights": "fp32 optimizer master copy",
            "source_layout": {"tp": state.layout.tp, "ep": state.layout.ep, "world_size": state.layout.world_size},
            "num_params": sum(v.numel() for v in state.weights.values()),
            "files": {"model.safetensors": weights_entry}}, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
