"""Expert parameter names: the one parser of DeepSpeed's per-expert naming (no torch).

DeepSpeed's ``Experts`` container names a rank's LOCAL experts 0 .. E/ep - 1:
``blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight``. A single-device model (ep=1)
names each expert by its GLOBAL index; an expert-parallel rank's local expert i is global expert
``ep_rank * E/ep + i``. Checkpoint conversion, resharding, initialisation and the memory estimate
all go through these functions.
"""

from __future__ import annotations

EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."


def split_expert_name(name: str) -> tuple[str, int, str] | None:
    """'blocks.1.ffn.<EXPERT_PREFIX>3.fc1.weight' -> ('blocks.1.ffn.', 3, 'fc1.weight'); None for a
    parameter outside the experts."""
    head, sep, tail = name.partition(EXPERT_PREFIX)
    if not sep:
        return None
    index, _, rest = tail.partition(".")
    return head, int(index), rest


def is_expert(name: str) -> bool:
    return EXPERT_PREFIX in name


def global_expert_name(name: str, ep_rank: int, num_local: int) -> str:
    """A rank's local parameter name -> the single-device name (experts renumbered globally)."""
    parts = split_expert_name(name)
    if parts is None:
        return name
    head, local, rest = parts
    return f"{head}{EXPERT_PREFIX}{ep_rank * num_local + local}.{rest}"


def layer_experts(model_cfg, name: str) -> int:
    """The expert count of the MoE layer (pool) that parameter ``name`` of a ``ModelConfig``'s
    model is an expert of: the text tower's, VL-MoE's text pool's (``moe.text_experts``), or the
    first tower's; 1 for a parameter outside the experts."""
    if not is_expert(name):
        return 1
    if model_cfg.text_tower is not None and (name.startswith("text_tower.") or ".text_tower." in name):
        return model_cfg.text_tower.moe.num_experts
    return model_cfg.moe.pool_experts("text" if ".ffn.text." in name else "image")


def local_experts(model_cfg, name: str, ep: int) -> int:
    """Experts of parameter ``name``'s MoE layer on each of ``ep`` expert-parallel ranks: what
    turns a rank's local expert index into the global one (init, conversion, resharding, export)."""
    return layer_experts(model_cfg, name) // ep
