"""Slow, obviously-correct per-token references for the router and the MoE layer."""

import torch

from limoe_ds.moe.routing import _cv_squared, _masked_mean, entropy


# One loss at a time, as the papers define them (route_top1 computes them fused for both modalities).
def importance_loss(probs_NE: torch.Tensor, valid_N: torch.Tensor) -> torch.Tensor:
    """V-MoE importance loss: imp_e = sum_i p_i[e] over valid tokens (clean p); (std/mean)^2."""
    importance_E = (probs_NE * valid_N[:, None].to(probs_NE.dtype)).sum(dim=0)
    return _cv_squared(importance_E)


def local_entropy_loss(probs_NE: torch.Tensor, mask_N: torch.Tensor) -> torch.Tensor:
    """LIMoE local entropy: mean over the masked tokens of H(p_i) (low = confident routing)."""
    return _masked_mean(entropy(probs_NE), mask_N)


def global_entropy_loss(probs_NE: torch.Tensor, mask_N: torch.Tensor, threshold: float) -> torch.Tensor:
    """LIMoE thresholded global entropy: max(0, tau - H(mean_i p_i)) over the masked tokens."""
    m_N1 = mask_N[:, None].to(probs_NE.dtype)
    mean_probs_E = (probs_NE * m_N1).sum(dim=0) / m_N1.sum().clamp(min=1.0)
    loss = torch.clamp(threshold - entropy(mean_probs_E), min=0.0)
    return torch.where(mask_N.any(), loss, torch.zeros_like(loss))  # no tokens of m: no loss


def reference_top1_assign(probs_NE, valid_N, capacity, *, batch_priority):
    """Python loops over tokens: returns plain lists (expert, position, kept)."""
    N, E = probs_NE.shape
    p = probs_NE.tolist()
    valid = valid_N.tolist()
    expert = [max(range(E), key=lambda e: (p[i][e], -e)) if valid[i] else -1 for i in range(N)]
    order = list(range(N))
    if batch_priority:
        # Python's sort is stable: ties keep token order.
        order = sorted((i for i in range(N) if valid[i]), key=lambda i: -max(p[i]))
    fill = [0] * E
    position = [-1] * N
    for i in order:
        if valid[i]:
            position[i] = fill[expert[i]]
            fill[expert[i]] += 1
    kept = [valid[i] and (capacity is None or position[i] < capacity) for i in range(N)]
    return expert, position, kept


def reference_top1_assign_budgets(probs_NE, token_type_N, capacity_M, *, batch_priority):
    """Modality-aware capacity with Python loops: one fill counter per (expert, modality); a text
    token's slot is after the expert's image budget. Returns lists (expert, position, kept)."""
    N, E = probs_NE.shape
    p = probs_NE.tolist()
    types = token_type_N.tolist()
    valid = [t != 0 for t in types]
    expert = [max(range(E), key=lambda e: (p[i][e], -e)) if valid[i] else -1 for i in range(N)]
    order = list(range(N))
    if batch_priority:
        order = sorted((i for i in range(N) if valid[i]), key=lambda i: -max(p[i]))
    fill = {}
    position, kept = [-1] * N, [False] * N
    for i in order:
        if not valid[i]:
            continue
        m = 1 if types[i] == 2 else 0  # TOKEN_TEXT = 2
        rank = fill.get((expert[i], m), 0)
        fill[(expert[i], m)] = rank + 1
        position[i] = rank + (capacity_M[0] if m else 0)
        kept[i] = rank < capacity_M[m]
    return expert, position, kept


def reference_moe(x_SD, type_S, gate_weight_ED, experts, capacity, *, batch_priority, noise_SE=None):
    """Loop over tokens and experts: y_i = p~_i[e_i] * expert_{e_i}(x_i) if token i kept, else 0."""
    logits = x_SD.float() @ gate_weight_ED.float().t()
    noisy = logits if noise_SE is None else logits + noise_SE
    probs = torch.softmax(noisy, -1)
    expert, _, kept = reference_top1_assign(probs.detach(), type_S != 0, capacity, batch_priority=batch_priority)
    rows = []
    for i in range(x_SD.shape[0]):
        if kept[i]:
            rows.append(probs[i, expert[i]] * experts[expert[i]](x_SD[i:i + 1])[0])
        else:
            rows.append(torch.zeros_like(x_SD[i]))
    return torch.stack(rows), kept
