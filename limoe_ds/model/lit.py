"""LiT (locked-image tuning, Zhai et al. 2022): the image tower from an export, locked.

``train.image_tower`` (limoe_ds.config.run.ImageTowerInit) names an exported model. At start-up
every rank copies the export's image-tower weights into its (full, not yet tensor-parallel) model
(``limoe_ds.pretrained.load_image_tower``), and after the parallel plan the locked groups get ``requires_grad=False``
(``lock_image_tower``): the optimizer groups skip them (limoe_ds.train.engine.param_groups), so
they have no Adam moments, no fp32 master copy and no weight decay, and DeepSpeed keeps them in
the module state of every checkpoint, which resume, export and reshard read back
(limoe_ds.checkpoint.convert). The model has no BatchNorm and no dropout: a locked tower computes
the same function at every step, up to its MoE routing (router noise and capacity drops, or
dropless with ``dropless``).

The image tower's parameter names are the same in one- and two-tower models (``patch_embed``,
``image_pos``, ``blocks``, ``final_ln``, ``image_pool``, ``image_head``), so either kind of export
can be the source. A resume loads the locked weights from the checkpoint; the export is read again
(and checked against the model) but its values are overwritten by the checkpoint's.
"""

from __future__ import annotations

from limoe_ds.config.model import ModelConfig

IMAGE_TOWER = ("patch_embed.", "image_pos", "blocks.", "final_ln.", "image_pool.", "image_head.")
"""Parameter-name prefixes of the image tower (the text tower's blocks are ``text_tower.blocks``)."""


def is_image_tower(name: str) -> bool:
    return name.startswith(IMAGE_TOWER)


def lock_groups(cfg: ModelConfig) -> list[tuple[str, ...]]:
    """The image tower's groups, first to last, as name prefixes (open_clip's VisionTransformer.lock):
    the embeddings, blocks 0 .. depth-2, the last block with the final norm, the pooling with the head."""
    d = cfg.depth
    return [("patch_embed.", "image_pos"), *((f"blocks.{i}.",) for i in range(d - 1)),
            (f"blocks.{d - 1}.", "final_ln."), ("image_pool.", "image_head.")]


def locked_prefixes(cfg: ModelConfig, init) -> tuple[str, ...]:
    """The name prefixes ``init`` (a train.image_tower section, or None) locks; () when nothing is locked."""
    if init is None or not init.lock:
        return ()
    groups = lock_groups(cfg)
    return tuple(p for g in groups[:len(groups) - init.unlocked_groups] for p in g)


def is_locked(name: str, prefixes: tuple[str, ...]) -> bool:
    return name.startswith(prefixes)  # False for () (nothing locked)


def lock_image_tower(model, init) -> list[str]:
    """``requires_grad=False`` on the locked groups (after the parallel plan, which may replace
    modules); with ``init.dropless`` their MoE layers route dropless. Returns the locked names."""
    prefixes = locked_prefixes(model.cfg, init)
    locked = []
    for name, p in model.named_parameters():
        if is_locked(name, prefixes):
            p.requires_grad_(False)
            locked.append(name)
    if init is not None and init.dropless:
        for block in model.blocks:
            if block.is_moe and is_locked(f"blocks.{block.index}.ffn.", prefixes):
                for layer in block.moe_layers():  # VL-MoE: both pools
                    layer.frozen_dropless = True
    return locked
