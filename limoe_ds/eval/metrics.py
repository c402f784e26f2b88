"""Retrieval and zero-shot metrics on L2-normalised embeddings (pure functions, one process).

Ties are counted against the model: a target's rank is the number of OTHER candidates scoring at
least as high, so a model that scores everything equal gets no credit (and metrics never depend
on sort order). Legend: N queries, M candidates, C classes, T templates, K embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_ranks(scores_NM: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's target among the candidates (ties count against)."""
    target_score_N1 = scores_NM.gather(1, target_N[:, None])
    at_least_NM = scores_NM >= target_score_N1
    return at_least_NM.sum(dim=1) - 1  # minus the target itself


def recall_at_k(scores_NM: torch.Tensor, target_N: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    ranks = target_ranks(scores_NM, target_N)
    return {k: (ranks < k).float().mean().item() for k in ks}


def retrieval_metrics(image_emb_NK: torch.Tensor, text_emb_NK: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Image i and caption i are a pair: image->text and text->image Recall@k."""
    scores_NN = image_emb_NK.float() @ text_emb_NK.float().t()
    target_N = torch.arange(scores_NN.shape[0], device=scores_NN.device)
    i2t = recall_at_k(scores_NN, target_N, ks)
    t2i = recall_at_k(scores_NN.t(), target_N, ks)
    return {**{f"i2t/R@{k}": v for k, v in i2t.items()}, **{f"t2i/R@{k}": v for k, v in t2i.items()}}


def zero_shot_classifier(prompt_emb_CTK: torch.Tensor) -> torch.Tensor:
    """Each class: the mean of its normalised prompt embeddings, renormalised (CLIP)."""
    return F.normalize(F.normalize(prompt_emb_CTK.float(), dim=-1).mean(dim=1), dim=-1)


def topk_correct(image_emb_NK: torch.Tensor, classifier_CK: torch.Tensor, labels_N: torch.Tensor,
                 ks=(1, 5)) -> dict[int, torch.Tensor]:
    """Per image: is the true class within the top k (ties against)? Boolean [N] per k."""
    ranks = target_ranks(image_emb_NK.float() @ classifier_CK.t(), labels_N)
    return {k: ranks < k for k in ks}
