"""Routing statistics of a MoE layer as a typed value that travels up the return path.

``RoutingStats`` holds one layer's detached counts (per modality and expert) and the capacity its
buffers had; each MoE layer returns one with its output (``LIMoELayer.forward``), the model returns
them all (``LIMoEOutput.routing``), and training and evaluation merge them over batches
(``accumulate``) and ranks (``sum_over_ranks``) before ``summarize`` turns the totals into readable
diagnostics: per modality routing success rate (kept / routed), tokens per expert, mean per-token
router entropy and the entropy of the mean routing distribution; per expert the share of its tokens
that are image vs text (the LIMoE paper's specialisation chart); dead experts.

Legend: M modalities (``MODALITIES`` order: image, text), E experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from limoe_ds.config.model import MODALITIES
from limoe_ds.moe.routing import Routing, entropy

_COUNTS = ("routed_ME", "kept_ME", "token_entropy_sum_M", "probs_sum_ME")


@dataclass
class RoutingStats:
    """One MoE layer's routing counts, summable over batches and ranks."""

    layer: int
    """The block index of the MoE layer."""
    capacity: int
    """Slots per expert the dispatch used (the largest over what was merged)."""
    routed_ME: torch.Tensor
    """Tokens of modality m whose top-1 expert is e."""
    kept_ME: torch.Tensor
    """Tokens of modality m that got a slot at expert e."""
    token_entropy_sum_M: torch.Tensor
    """Sum of the per-token router entropies H(p_i) of modality m."""
    probs_sum_ME: torch.Tensor
    """Sum of the router probabilities of modality m's tokens."""
    pool: str = ""
    """'' for a layer's one expert pool; 'image' / 'text' for VL-MoE's per-modality pools
    (``moe.modality_experts``): each pool is its own layer in the statistics."""

    @classmethod
    def of(cls, layer: int, routing: Routing, capacity: int, pool: str = "") -> "RoutingStats":
        return cls(layer, capacity, *(getattr(routing, k).detach() for k in _COUNTS), pool=pool)

    @property
    def key(self) -> tuple[int, str]:
        """(block index, pool): what the totals are keyed and ordered by."""
        return self.layer, self.pool

    @property
    def label(self) -> str:
        """'layer3', or 'layer3.image' / 'layer3.text' for a per-modality pool (``layer_label``)."""
        return layer_label(self.layer, self.pool)

    def counts(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in _COUNTS]

    def merged(self, other: "RoutingStats") -> "RoutingStats":
        """Counts added element-wise, the larger capacity (on the counts' own device: no
        device-to-host copy per training step; ``summarize`` moves the totals once)."""
        assert other.key == self.key
        return RoutingStats(self.layer, max(self.capacity, other.capacity),
                            *(a + b.detach().float() for a, b in zip(self.counts(), other.counts())), pool=self.pool)

    def detached(self) -> "RoutingStats":
        return dataclasses.replace(self, **{k: getattr(self, k).detach().float().clone() for k in _COUNTS})

    def zeros_like(self) -> "RoutingStats":
        """No tokens: what a rank that forwards a dummy batch adds (every rank holds the same layers)."""
        return dataclasses.replace(self, capacity=0, **{k: torch.zeros_like(getattr(self, k)) for k in _COUNTS})

    def summary(self) -> dict:
        """Readable diagnostics of these counts (see the module docstring)."""
        routed_ME, kept_ME, entropy_M, probs_ME = (t.detach().float().cpu() for t in self.counts())
        out: dict = {"capacity": int(self.capacity)}
        for i, m in enumerate(MODALITIES):
            routed, kept = routed_ME[i], kept_ME[i]
            n = routed.sum().item()
            out[m] = {
                "routed_tokens": int(n),
                "dropped_tokens": int(n - kept.sum().item()),
                "success_rate": kept.sum().item() / n if n else float("nan"),
                "tokens_per_expert": [int(x) for x in kept.tolist()],
                "mean_token_entropy": entropy_M[i].item() / n if n else float("nan"),
                "entropy_of_mean": entropy(probs_ME[i] / n).item() if n else float("nan"),
            }
        kept_total = kept_ME.sum(dim=0)
        image_share = kept_ME[MODALITIES.index("image")] / kept_total.clamp(min=1)
        out["image_share_per_expert"] = [round(x, 4) if t else float("nan")
                                         for x, t in zip(image_share.tolist(), kept_total.tolist())]
        out["dead_experts"] = [e for e, t in enumerate(kept_total.tolist()) if t == 0]
        return out


def layer_label(layer: int, pool: str = "") -> str:
    """A MoE layer's name in summaries, metrics and warnings: 'layer3', or 'layer3.image' for one
    of VL-MoE's per-modality pools."""
    return f"layer{layer}.{pool}" if pool else f"layer{layer}"


def aux_key(layer: int, term: str, pool: str = "") -> str:
    """The name of MoE layer ``layer``'s auxiliary loss ``term`` in ``LIMoEOutput.aux_losses``
    ('moe/layer3/text/global_entropy', 'moe/layer1.text/importance'); logged as 'aux/' + it."""
    return f"moe/{layer_label(layer, pool)}/{term}"


Totals = dict[tuple[int, str], RoutingStats]
"""Merged statistics by (MoE layer index, pool)."""


def accumulate(totals: Totals, routing: list[RoutingStats]) -> Totals:
    """totals += routing (one forward pass's statistics), layer by layer."""
    for s in routing:
        prev = totals.get(s.key)
        totals[s.key] = s.detached() if prev is None else prev.merged(s)
    return totals


def sum_over_ranks(totals: Totals, group=None) -> Totals:
    """Counts summed over the ranks of ``group`` (tensor-parallel peers route the same tokens: pass
    the data-parallel group), capacities their maximum: one SUM and one MAX all-reduce, every rank
    holding the same layers."""
    from limoe_ds.parallel.collectives import all_reduce_tensors
    layers = sorted(totals)
    if not layers:
        return totals
    flat = all_reduce_tensors([c for layer in layers for c in totals[layer].counts()], group=group)
    caps = all_reduce_tensors([torch.tensor([float(totals[layer].capacity)]) for layer in layers], group=group,
                              op="max")
    per = len(_COUNTS)
    return {key: RoutingStats(key[0], int(caps[i].item()), *flat[i * per:(i + 1) * per], pool=key[1])
            for i, key in enumerate(layers)}


def summarize(totals: Totals) -> dict[str, dict]:
    """{'layer3': {'image': {...}, 'text': {...}, 'capacity': C, 'image_share_per_expert': [...],
    'dead_experts': [...]}} in layer order."""
    return {totals[key].label: totals[key].summary() for key in sorted(totals)}
