"""The router-collapse alarm: a watcher of the routing statistics of each log window.

Every log window the trainer turns the window's routing counts (summed over steps and ranks) into
``stats.summarize`` output; ``CollapseAlarm.observe`` reads, per MoE layer and modality, two numbers
of it:

* the modality's **effective experts**, ``exp(entropy_of_mean)``: the exponential of the entropy of
  its mean routing distribution over the window (E when its tokens spread evenly over E experts, 1
  when they all pick one). LIMoE's thresholded global entropy loss asks for at least S_m of them
  (``model.moe.global_entropy_min_experts``, tau_m = log S_m), the default threshold here;
* its **routing success**, the share of its tokens that got a slot (1 - dropped / routed).

A (layer, modality) whose effective experts fall below ``min_experts`` or whose success falls below
``min_success`` for ``windows`` consecutive log windows has collapsed: one warning (rank 0's output
and a TensorBoard text entry, with the layer, the modality, both numbers and the steps), then
silence until it recovers (one line when it does). ``alarm/router_collapse`` (logged every window)
counts the (layer, modality) pairs in collapse. A modality with no tokens in a layer (an image-only
model's text) is not judged. The watcher is passive: it changes nothing in training, and its
streaks start over on a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from limoe_ds.config.model import MODALITIES
from limoe_ds.moe.stats import layer_label


@dataclass(frozen=True)
class Verdict:
    """One (layer, modality)'s numbers in one window and whether they fall short."""

    layer: str
    modality: str
    effective_experts: float
    min_experts: float
    success_rate: float
    min_success: float

    @property
    def few_experts(self) -> bool:
        return self.effective_experts < self.min_experts

    @property
    def low_success(self) -> bool:
        return self.success_rate < self.min_success

    @property
    def bad(self) -> bool:
        return self.few_experts or self.low_success

    def numbers(self) -> str:
        return (f"{self.effective_experts:.2f} effective experts (alarm below {self.min_experts:g}), routing "
                f"success {self.success_rate:.3f} (alarm below {self.min_success:g})")


@dataclass
class CollapseAlarm:
    """Streaks of bad windows per (layer, modality); see the module docstring."""

    min_experts: dict[str, dict[str, float]]
    """{'layer3': {'image': S_image, 'text': S_text}, ...}: the effective-experts threshold per MoE layer."""
    min_success: float
    windows: int
    streak: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    """(layer, modality) -> the steps of its current run of bad windows."""

    @property
    def collapsed(self) -> list[tuple[str, str]]:
        return [k for k, steps in self.streak.items() if len(steps) >= self.windows]

    def judge(self, summary: dict[str, dict]) -> list[Verdict]:
        out = []
        for layer, s in summary.items():
            for m in MODALITIES:
                q = s[m]
                if not q["routed_tokens"]:
                    continue
                out.append(Verdict(layer, m, math.exp(q["entropy_of_mean"]), self.min_experts[layer][m],
                                   q["success_rate"], self.min_success))
        return out

    def observe(self, step: int, summary: dict[str, dict]) -> list[str]:
        """One log window's ``stats.summarize`` output at ``step``: the warning lines to emit now."""
        lines = []
        for v in self.judge(summary):
            key = (v.layer, v.modality)
            steps = self.streak.get(key, [])
            if not v.bad:
                if len(steps) >= self.windows:
                    lines.append(f"router collapse over: MoE {v.layer}, {v.modality} tokens at step {step}: "
                                 f"{v.numbers()}")
                self.streak.pop(key, None)
                continue
            steps = self.streak[key] = [*steps, step]
            if len(steps) == self.windows:
                why = " and ".join(w for w, hit in (("too few experts", v.few_experts),
                                                    ("dropped tokens", v.low_success)) if hit)
                lines.append(f"warning: router collapse in MoE {v.layer}, {v.modality} tokens ({why}) for "
                             f"{self.windows} consecutive log windows (steps {steps[0]}..{step}): {v.numbers()}; "
                             f"raise the entropy-loss weights (model.moe.*_entropy_weight) or the capacity "
                             f"factor, or see docs/TRAINING.md (router collapse)")
        return lines


def thresholds(moe_layers, min_experts: dict[str, float] | None) -> dict[str, dict[str, float]]:
    """{'layer3': {modality: threshold}} for the model's MoE layers (``LIMoE.moe_layers()``): the
    configured ``min_experts`` per modality, or each layer's S_m (its
    ``global_entropy_min_experts``) where not given."""
    given = min_experts or {}
    return {layer_label(layer.index, layer.pool): {m: float(given[m]) if m in given
                                                   else layer.cfg.global_entropy_min_experts[m] for m in MODALITIES}
            for layer in moe_layers}
