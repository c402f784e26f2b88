"""Top-1 routing with Batch Priority Routing and LIMoE's auxiliary losses, as pure functions.

No process groups, no module state: ``route_top1`` maps router logits, token types and a capacity
to an assignment, the weighted auxiliary losses and detached counts (a ``Routing``). The DeepSpeed
layer in ``limoe_ds.moe.layer`` calls it and hands the assignment to DeepSpeed's dispatch.
References: ../shared/LIMOE_SPEC.md; V-MoE (google-research/vmoe, vmoe/nn/routing.py); LIMoE
(arXiv 2206.02770).

Legend: N tokens in the routing pool, E experts, M modalities (image, text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from limoe_ds.config.model import MODALITIES, MoEConfig

# Token types in the routing pool. Padding is never routed, counted or dropped.
TOKEN_PAD, TOKEN_IMAGE, TOKEN_TEXT = 0, 1, 2
MODALITY_TOKEN = {"image": TOKEN_IMAGE, "text": TOKEN_TEXT}


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, *, k: int = 1,
                    multiple_of: int = 4) -> int:
    """C = ceil(k * cf * n / E), rounded up to a multiple of ``multiple_of`` (V-MoE)."""
    for name, v in (("num_tokens", num_tokens), ("num_experts", num_experts),
                    ("capacity_factor", capacity_factor), ("k", k), ("multiple_of", multiple_of)):
        if not v > 0:
            raise ValueError(f"expert_capacity: {name} must be positive, got {v!r}")
    capacity = math.ceil(k * capacity_factor * num_tokens / num_experts)
    return -(-capacity // multiple_of) * multiple_of


def _rank_in_groups(group_N: torch.Tensor, order_N: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Each token's rank within its group (``group_N``, 0 .. num_groups-1), counted in the order
    ``order_N``: the priority-ordered tokens are grouped with a stable sort, which keeps the priority
    order inside each group."""
    grouped_in_order_N = group_N[order_N]
    perm_N = torch.sort(grouped_in_order_N, stable=True).indices
    grouped_N = grouped_in_order_N[perm_N]
    counts = torch.bincount(grouped_N, minlength=num_groups)
    rank_N = torch.arange(group_N.shape[0], device=group_N.device) - (counts.cumsum(0) - counts)[grouped_N]
    return torch.empty_like(rank_N).scatter_(0, order_N[perm_N], rank_N)


def top1_assign(probs_NE: torch.Tensor, valid_N: torch.Tensor, capacity: int | None, *,
                batch_priority: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 expert, buffer position and keep flag for every token.

    expert = argmax of probs (lowest index on ties; torch.argmax returns the first maximum), -1
    for invalid tokens. position = the token's 0-based slot in its expert's buffer, filled in
    priority order: with BPR by max prob descending (stable: ties keep token order), else token
    order; -1 for invalid. kept = valid and position < capacity (capacity None = dropless).
    """
    N, E = probs_NE.shape
    priority_N, argmax_N = probs_NE.max(dim=-1)  # first maximum on ties
    expert_N = torch.where(valid_N, argmax_N, -1)
    if batch_priority:
        # BPR (V-MoE sec. 4.1): the token with the higher router probability wins a slot.
        order_N = torch.sort(priority_N.masked_fill(~valid_N, -math.inf), descending=True, stable=True).indices
    else:
        order_N = torch.arange(N, device=probs_NE.device)
    # Invalid tokens form group E.
    position_N = _rank_in_groups(torch.where(valid_N, expert_N, E), order_N, E + 1)
    position_N = torch.where(valid_N, position_N, -1)
    kept_N = valid_N if capacity is None else valid_N & (position_N < capacity)
    return expert_N, position_N, kept_N


def top1_assign_budgets(probs_NE: torch.Tensor, token_type_N: torch.Tensor, capacity_M: tuple[int, int], *,
                        batch_priority: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top1_assign`` with modality-aware capacity: each expert's buffer is an image budget of
    capacity_M[0] slots followed by a text budget of capacity_M[1]; a token competes (in priority
    order, BPR or token order) only with tokens of its own modality for its modality's budget, so
    image patches can never take the slots text needs, nor the other way round. position = the
    token's slot in the whole buffer (its rank among its expert's tokens of its modality, plus
    capacity_M[0] for text); kept = rank < its budget. Same expert choice as top1_assign."""
    N, E = probs_NE.shape
    valid_N = token_type_N != TOKEN_PAD
    priority_N, argmax_N = probs_NE.max(dim=-1)
    expert_N = torch.where(valid_N, argmax_N, -1)
    if batch_priority:
        order_N = torch.sort(priority_N.masked_fill(~valid_N, -math.inf), descending=True, stable=True).indices
    else:
        order_N = torch.arange(N, device=probs_NE.device)
    text_N = (token_type_N == TOKEN_TEXT).long()
    # groups (expert, modality) -> 2e + m; padding forms group 2E
    rank_N = _rank_in_groups(torch.where(valid_N, 2 * expert_N + text_N, 2 * E), order_N, 2 * E + 1)
    budget_N = torch.where(text_N.bool(), capacity_M[1], capacity_M[0])
    kept_N = valid_N & (rank_N < budget_N)
    position_N = torch.where(valid_N, rank_N + text_N * capacity_M[0], -1)
    return expert_N, position_N, kept_N


def _masked_mean(x_N: torch.Tensor, mask_N: torch.Tensor) -> torch.Tensor:
    """Mean over the masked entries; 0 (not NaN) when the mask is empty."""
    m = mask_N.to(x_N.dtype)
    return (x_N * m).sum() / m.sum().clamp(min=1.0)


def _cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 with the POPULATION std (vmoe uses jnp.var); 0 when everything is 0."""
    mean = x_E.mean()
    return x_E.var(unbiased=False) / (mean * mean).clamp(min=torch.finfo(x_E.dtype).tiny)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, with 0 log 0 = 0."""
    return -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum(dim=dim)


def load_loss(logits_NE: torch.Tensor, noisy_logits_NE: torch.Tensor, noise_std: float,
              valid_N: torch.Tensor) -> torch.Tensor:
    """V-MoE load loss: P(i,e) = 1 - Phi((thr_i - l_i[e]) / noise_std), thr_i = top-1 noisy logit.

    load_e = mean over valid tokens of P(i,e); loss = (std(load)/mean(load))^2. ``noise_std`` is
    the actual std of the noise that was added (sigma / E).
    """
    threshold_N1 = noisy_logits_NE.max(dim=-1, keepdim=True).values
    # z = noise needed to win, in units of noise_std. With noise_std = 1/E, z reaches the hundreds;
    # exp(-z^2/2) in Phi's gradient then underflows to denormals (float32's slow path: 13x slower
    # exp, and denormal gradients slow the router matmul). Capping z at 12 changes P by < 2e-33.
    z_NE = ((threshold_N1 - logits_NE) / noise_std).clamp(max=12.0)
    p_NE = torch.special.ndtr(-z_NE)  # = 1 - Phi(z), without cancellation
    valid_N1 = valid_N[:, None].to(p_NE.dtype)
    load_E = (p_NE * valid_N1).sum(dim=0) / valid_N1.sum().clamp(min=1.0)
    return _cv_squared(load_E)


def z_loss(logits_NE: torch.Tensor, valid_N: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(l)^2."""
    return _masked_mean(torch.logsumexp(logits_NE, dim=-1) ** 2, valid_N)


@dataclass
class Routing:
    """The outcome of routing one pool of N tokens (before a capacity is agreed for dropless routing)."""

    expert_N: torch.Tensor
    """Chosen expert, -1 for padding."""
    position_N: torch.Tensor
    """Slot in the expert's buffer, -1 for padding."""
    kept_N: torch.Tensor
    """True for tokens that got a slot (dropped and padding tokens: False)."""
    combine_N: torch.Tensor
    """Combine weight p~_i[e_i] for kept tokens (not renormalised), 0 otherwise; float32, with grad."""
    aux: dict[str, torch.Tensor]
    """Weighted auxiliary losses by term: 'importance', 'load', 'z_loss', 'text/global_entropy', ..."""
    routed_ME: torch.Tensor
    """Detached counts from here on: tokens of modality m whose top-1 expert is e."""
    kept_ME: torch.Tensor
    """Tokens of modality m that got a slot at expert e."""
    token_entropy_sum_M: torch.Tensor
    """Sum over the modality's tokens of the (clean) router entropy H(p_i)."""
    probs_sum_ME: torch.Tensor
    """Sum over the modality's tokens of the (clean) router probabilities."""

    def max_load(self) -> int:
        """The most tokens any expert was given (the capacity dropless routing needs), at least 1."""
        return max(int(self.position_N.max().item()) + 1 if self.position_N.numel() else 0, 1)


def route_top1(logits_NE: torch.Tensor, token_type_N: torch.Tensor, cfg: MoEConfig, *,
               capacity: int | tuple[int, int] | None, noise_NE: torch.Tensor | None = None) -> Routing:
    """Route a pool of tokens (image and text together) to experts.

    logits_NE: router logits (float32 is required; the caller computes x W_r in float32).
    token_type_N: TOKEN_PAD / TOKEN_IMAGE / TOKEN_TEXT. capacity: slots per expert, None =
    dropless (every token kept; ``Routing.max_load`` is what the buffers need), or (image, text)
    budgets per expert (``moe.modality_capacity``: top1_assign_budgets). noise_NE: the training
    noise added to the logits, None in eval.
    """
    assert logits_NE.dtype == torch.float32, "router math must run in float32"
    valid_N = token_type_N != TOKEN_PAD
    noisy_logits_NE = logits_NE if noise_NE is None else logits_NE + noise_NE
    probs_NE = torch.softmax(logits_NE, dim=-1)
    noisy_probs_NE = probs_NE if noise_NE is None else torch.softmax(noisy_logits_NE, dim=-1)

    if isinstance(capacity, tuple):
        expert_N, position_N, kept_N = top1_assign_budgets(noisy_probs_NE.detach(), token_type_N, capacity,
                                                           batch_priority=cfg.batch_priority)
    else:
        expert_N, position_N, kept_N = top1_assign(noisy_probs_NE.detach(), valid_N, capacity,
                                                   batch_priority=cfg.batch_priority)
    gate_N = noisy_probs_NE.gather(1, expert_N.clamp(min=0)[:, None]).squeeze(1)
    combine_N = gate_N * kept_N.to(gate_N.dtype)
    aux, counts = _losses_and_stats(cfg, logits_NE, noisy_logits_NE, probs_NE, token_type_N, expert_N, kept_N,
                                    noisy=noise_NE is not None)
    return Routing(expert_N, position_N, kept_N, combine_N, aux, **counts)


def _losses_and_stats(cfg: MoEConfig, logits_NE, noisy_logits_NE, probs_NE, token_type_N, expert_N, kept_N, *,
                      noisy: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weighted aux losses (a term whose weight is 0 is left out) and detached counts per modality.

    V-MoE's importance loss ((std/mean)^2 of the summed clean probabilities), LIMoE's local entropy
    (mean H(p_i) over a modality's tokens) and thresholded global entropy (max(0, tau_m - H(mean_i
    p_i))), computed for both modalities at once: one [M, N] modality matrix times the per-token
    quantities, so each [N, E] pass happens once (tests/slow_reference.py has the one-loss-at-a-time
    definitions that the tests compare against).
    """
    E = logits_NE.shape[-1]
    valid_N = token_type_N != TOKEN_PAD
    masks_MN = torch.stack([token_type_N == MODALITY_TOKEN[m] for m in MODALITIES]).to(probs_NE.dtype)
    count_M = masks_MN.sum(dim=1)
    entropy_N = entropy(probs_NE)
    probs_sum_ME = masks_MN @ probs_NE
    entropy_sum_M = masks_MN @ entropy_N
    local_M = entropy_sum_M / count_M.clamp(min=1.0)
    tau_M = torch.tensor([cfg.global_entropy_threshold(m) for m in MODALITIES], device=probs_NE.device)
    global_M = torch.clamp(tau_M - entropy(probs_sum_ME / count_M.clamp(min=1.0)[:, None]), min=0.0)
    global_M = torch.where(count_M > 0, global_M, torch.zeros_like(global_M))  # no tokens of m: no loss

    aux: dict[str, torch.Tensor] = {}
    if cfg.importance_weight:
        aux["importance"] = cfg.importance_weight * _cv_squared(probs_sum_ME.sum(dim=0))
    if cfg.load_weight and noisy and cfg.noise_std > 0:
        aux["load"] = cfg.load_weight * load_loss(logits_NE, noisy_logits_NE, cfg.noise_std / E, valid_N)
    for i, m in enumerate(MODALITIES):
        if cfg.local_entropy_weight[m]:
            aux[f"{m}/local_entropy"] = cfg.local_entropy_weight[m] * local_M[i]
        if cfg.global_entropy_weight[m]:
            aux[f"{m}/global_entropy"] = cfg.global_entropy_weight[m] * global_M[i]
    if cfg.z_loss_weight:
        aux["z_loss"] = cfg.z_loss_weight * z_loss(logits_NE, valid_N)

    # Counts (not ratios) so that batches and ranks can be summed before dividing.
    with torch.no_grad():
        chosen_NE = F.one_hot(expert_N.clamp(min=0), E).to(probs_NE.dtype)
        counts = {"routed_ME": masks_MN @ chosen_NE, "kept_ME": masks_MN @ (chosen_NE * kept_N[:, None]),
                  "token_entropy_sum_M": entropy_sum_M.detach(), "probs_sum_ME": probs_sum_ME.detach()}
    return aux, counts
