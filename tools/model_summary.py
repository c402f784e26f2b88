#!/usr/bin/env python
"""Print a LIMoE preset's parameter counts as JSON, built on the meta device (h14 costs no memory).

    python tools/model_summary.py h14
    python tools/model_summary.py b16-dense
    python tools/model_summary.py b16-2t                    # the two-tower twin
    python tools/model_summary.py ds_configs/tiny.json      # reads the "limoe" block's model
    python tools/model_summary.py h14 --layout tp=1,ep=8,dp=256 --micro-batch 64
    python tools/model_summary.py ds_configs/h14.json --layout tp=2,ep=8,dp=128

With ``--layout`` it adds a per-GPU memory estimate (weights, gradients, optimizer state,
activations; see limoe_ds/parallel/memory.py for the accounting). From a JSON, ZeRO stage, bf16, micro-batch
and activation checkpointing default to the config's; ``--zero``, ``--micro-batch``,
``--fp32`` and ``--no-activation-checkpointing`` override them.

Per-token (active) parameters follow ../shared/LIMOE_SPEC.md: all parameters minus, in every MoE
layer, the (E-1)/E of expert parameters a token does not use. ``active_params_per_image_token`` /
``_text_token`` count what a token of each modality pays multiply-adds for (its tower with 1/E of
the experts, the patch embedding, its pooling and head; not the token-embedding table): the
numbers to equalise when comparing one tower with two (``NAME-2t``: each tower the one tower's
shape, the same per-token compute, about twice the parameters).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.runtime.cli import fail  # noqa: E402
from limoe_ds.config.model import ModelConfig, get_preset  # noqa: E402
from limoe_ds.config import ds_keys, typed  # noqa: E402
from limoe_ds.config.run import TrainConfig, model_config  # noqa: E402


def load_model_config(preset_or_path: str) -> ModelConfig:
    """A preset name, or a DeepSpeed JSON whose "limoe" block has model.preset and/or model fields."""
    if not preset_or_path.endswith(".json"):
        return get_preset(preset_or_path)
    path = Path(preset_or_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such DeepSpeed config file")
    return model_config(json.loads(path.read_text()).get("limoe", {}).get("model", {}))


def summarize(cfg: ModelConfig) -> dict:
    from limoe_ds.model import build_model, flops_per_sample, param_counts
    model = build_model(cfg, device="meta")
    counts = param_counts(model)
    flops = flops_per_sample(model)
    moe = cfg.moe
    return {"preset": cfg.name, "width": cfg.width, "depth": cfg.depth, "mlp_dim": cfg.mlp_dim,
            "num_heads": cfg.num_heads, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "text_len": cfg.text_len, "vocab_size": cfg.vocab_size,
            "num_experts": moe.num_experts if moe else 0, "moe_layers": list(moe.layers) if moe else [],
            **({"text_experts": moe.pool_experts("text")} if moe and moe.modality_experts else {}),
            "text_tower": None if cfg.text_tower is None else {
                "width": cfg.text_tower.width, "depth": cfg.text_tower.depth, "mlp_dim": cfg.text_tower.mlp_dim,
                "num_heads": cfg.text_tower.num_heads,
                "num_experts": cfg.text_tower.moe.num_experts if cfg.text_tower.moe else 0,
                "moe_layers": list(cfg.text_tower.moe.layers) if cfg.text_tower.moe else []},
            **counts,
            "total_params_b": round(counts["total_params"] / 1e9, 3),
            "active_params_per_token_b": round(counts["active_params_per_token"] / 1e9, 3),
            "train_flops_per_sample": flops["train"]}


def parse_layout(text: str) -> dict[str, int]:
    """'tp=2,ep=8,dp=32' -> {'tp': 2, 'ep': 8, 'dp': 32}; tp and ep default to 1, dp is required."""
    out = {"tp": 1, "ep": 1}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("tp", "ep", "dp") or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--layout: expected tp=N,ep=N,dp=N with positive integers, got {part!r}")
        out[key.strip()] = int(value)
    if "dp" not in out:
        raise ValueError("--layout: dp=N (the number of data-parallel ranks) is required")
    return out


def _run_defaults(preset_or_path: str) -> dict:
    """The JSON's ZeRO stage, bf16, micro-batch and activation checkpointing, each type-checked
    (``config.typed``, against the same annotations as a training run: "false" is not false)."""
    if not preset_or_path.endswith(".json"):
        return {}
    raw = json.loads(Path(preset_or_path).read_text())
    train = raw.get("limoe", {}).get("train", {})
    train = train if isinstance(train, dict) else {}
    return {"zero_stage": typed.build(ds_keys.ZeroKeys, raw.get("zero_optimization", {}), "zero_optimization").stage,
            "bf16": typed.build(ds_keys.PrecisionKeys, raw.get("bf16", {}), "bf16").enabled,
            "micro_batch": typed.convert(int, raw.get("train_micro_batch_size_per_gpu", 64),
                                         "train_micro_batch_size_per_gpu"),
            "activation_checkpointing": typed.convert(typed.hints(TrainConfig)["activation_checkpointing"],
                                                      train.get("activation_checkpointing", False),
                                                      "train.activation_checkpointing")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset_or_config", help="preset (tiny, s32, b16, l16, h14, NAME-dense, NAME-2t, "
                        "NAME-2t-dense) or a ds_configs JSON")
    parser.add_argument("--layout", help="tp=N,ep=N,dp=N: add a per-GPU memory estimate for this layout")
    parser.add_argument("--zero", type=int, help="ZeRO stage (default: the JSON's, else 2)")
    parser.add_argument("--micro-batch", type=int, help="pairs per GPU (default: the JSON's, else 64)")
    parser.add_argument("--fp32", action="store_true", help="fp32 weights (default: the JSON's bf16, else bf16)")
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_model_config(args.preset_or_config)
        out = summarize(cfg)
        if args.layout:
            from limoe_ds.parallel.memory import estimate
            run = {"zero_stage": 2, "bf16": True, "micro_batch": 64, "activation_checkpointing": True,
                   **_run_defaults(args.preset_or_config)}
            if args.zero is not None:
                run["zero_stage"] = args.zero
            if args.micro_batch is not None:
                run["micro_batch"] = args.micro_batch
            if args.fp32:
                run["bf16"] = False
            if args.no_activation_checkpointing:
                run["activation_checkpointing"] = False
            out["memory_per_gpu"] = estimate(cfg, **parse_layout(args.layout), **run).to_dict()
    except ValueError as e:
        return fail(e)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
