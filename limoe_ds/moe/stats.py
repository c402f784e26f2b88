"""Turn the router's raw counts (summed over batches and ranks) into readable diagnostics.

Input: the ``routing_stats`` dict of a forward pass, or the element-wise sum of several.
Output per MoE layer: per modality routing success rate (kept / routed), tokens per expert,
mean per-token router entropy and the entropy of the mean routing distribution; per expert the
share of its tokens that are image vs text (the LIMoE paper's specialisation chart); dead experts.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from limoe_ds.config.model import MODALITIES
from limoe_ds.moe.routing import entropy

_KEY = re.compile(r"^moe/layer(\d+)/(.+)$")


def accumulate(total: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """total += stats, element-wise (capacity keeps its max), on the stats' own device: no
    device-to-host copy per training step; ``summarize`` moves the totals once."""
    for k, v in stats.items():
        v = v.detach().float()
        if k not in total:
            total[k] = v.clone()
        elif k.endswith("/capacity"):
            total[k] = torch.maximum(total[k], v)
        else:
            total[k] += v
    return total


def summarize(stats: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{'layer3': {'image': {...}, 'text': {...}, 'image_share_per_expert': [...], 'dead_experts': [...]}}."""
    by_layer: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for k, v in stats.items():
        m = _KEY.match(k)
        if m:
            by_layer[f"layer{m.group(1)}"][m.group(2)] = v.detach().float().cpu()
    return {layer: _summarize_layer(s) for layer, s in sorted(by_layer.items(), key=lambda kv: int(kv[0][5:]))}


def _summarize_layer(s: dict[str, torch.Tensor]) -> dict:
    out: dict = {"capacity": int(s["capacity"].item())}
    kept_total = sum(s[f"{m}/kept_per_expert"] for m in MODALITIES)
    for m in MODALITIES:
        routed, kept = s[f"{m}/routed_per_expert"], s[f"{m}/kept_per_expert"]
        n = routed.sum().item()
        out[m] = {
            "routed_tokens": int(n),
            "dropped_tokens": int(n - kept.sum().item()),
            "success_rate": kept.sum().item() / n if n else float("nan"),
            "tokens_per_expert": [int(x) for x in kept.tolist()],
            "mean_token_entropy": s[f"{m}/token_entropy_sum"].item() / n if n else float("nan"),
            "entropy_of_mean": entropy(s[f"{m}/probs_sum"] / n).item() if n else float("nan"),
        }
    image_share = s["image/kept_per_expert"] / kept_total.clamp(min=1)
    out["image_share_per_expert"] = [round(x, 4) if t else float("nan")
                                     for x, t in zip(image_share.tolist(), kept_total.tolist())]
    out["dead_experts"] = [e for e, t in enumerate(kept_total.tolist()) if t == 0]
    return out
