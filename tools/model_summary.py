#!/usr/bin/env python
"""Print a LIMoE preset's parameter counts as JSON, built on the meta device (h14 costs no memory).

    python tools/model_summary.py h14
    python tools/model_summary.py b16-dense
    python tools/model_summary.py ds_configs/tiny.json      # reads the "limoe" block's model

Per-token (active) parameters follow ../shared/LIMOE_SPEC.md: all parameters minus, in every MoE
layer, the (E-1)/E of expert parameters a token does not use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.config import ModelConfig, get_preset  # noqa: E402
from limoe_ds.run_config import model_config  # noqa: E402


def load_model_config(preset_or_path: str) -> ModelConfig:
    """A preset name, or a DeepSpeed JSON whose "limoe" block has model.preset and/or model fields."""
    if not preset_or_path.endswith(".json"):
        return get_preset(preset_or_path)
    path = Path(preset_or_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such DeepSpeed config file")
    return model_config(json.loads(path.read_text()).get("limoe", {}).get("model", {}))


def summarize(cfg: ModelConfig) -> dict:
    from limoe_ds.model import build_model, param_counts
    model = build_model(cfg, device="meta")
    counts = param_counts(model)
    moe = cfg.moe
    return {"preset": cfg.name, "width": cfg.width, "depth": cfg.depth, "mlp_dim": cfg.mlp_dim,
            "num_heads": cfg.num_heads, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "text_len": cfg.text_len, "vocab_size": cfg.vocab_size,
            "num_experts": moe.num_experts if moe else 0, "moe_layers": list(moe.layers) if moe else [],
            **counts,
            "total_params_b": round(counts["total_params"] / 1e9, 3),
            "active_params_per_token_b": round(counts["active_params_per_token"] / 1e9, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset_or_config", help="preset (tiny, s32, b16, l16, h14, NAME-dense) or a ds_configs JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_model_config(args.preset_or_config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summarize(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
