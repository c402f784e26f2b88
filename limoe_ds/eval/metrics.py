"""Retrieval and zero-shot metrics on L2-normalised embeddings (pure functions, one process).

Ties are counted against the model: a target's rank is the number of OTHER candidates scoring at
least as high, so a model that scores everything equal gets no credit (and metrics never depend
on sort order). Legend: N images (or queries), M captions (or candidates), C classes, T templates,
K embedding width.
"""

from __future__ import annotations

import math

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


def image_to_text_ranks(scores_NM: torch.Tensor, image_of_caption_M: torch.Tensor) -> torch.Tensor:
    """0-based rank of each image's best-scoring own caption among the OTHER images' captions (ties
    count against). Its own further captions do not compete, so rank < k is the standard "any of the
    image's captions within the top k" (COCO / Flickr30k, 5 captions per image). An image with no
    caption is never found."""
    N = scores_NM.shape[0]
    own_NM = image_of_caption_M[None, :] == torch.arange(N, device=scores_NM.device)[:, None]
    best_N1 = scores_NM.masked_fill(~own_NM, -math.inf).amax(dim=1, keepdim=True)
    return ((scores_NM >= best_N1) & ~own_NM).sum(dim=1)


def retrieval_metrics(image_emb_NK: torch.Tensor, text_emb_MK: torch.Tensor, *,
                      image_of_caption_M: torch.Tensor | None = None, ks=(1, 5, 10),
                      chunk: int = 1024) -> dict[str, float]:
    """Image->text and text->image Recall@k. Caption m describes image ``image_of_caption_M[m]``
    (default: caption i describes image i). Image->text: ``image_to_text_ranks``; text->image: each
    caption has one correct image. Scores are built ``chunk`` queries at a time (a 5k x 25k COCO
    matrix is 0.5 GB in float32)."""
    img, txt = image_emb_NK.float(), text_emb_MK.float()
    if image_of_caption_M is None:
        assert img.shape[0] == txt.shape[0], "one caption per image needs as many captions as images"
        image_of_caption_M = torch.arange(txt.shape[0], device=txt.device)
    image_of_caption_M = image_of_caption_M.to(txt.device)
    i2t_N = torch.cat([image_to_text_ranks(img[i:i + chunk] @ txt.t(), image_of_caption_M - i)
                       for i in range(0, img.shape[0], chunk)] or [torch.zeros(0, dtype=torch.long)])
    t2i_M = torch.cat([target_ranks(txt[i:i + chunk] @ img.t(), image_of_caption_M[i:i + chunk])
                       for i in range(0, txt.shape[0], chunk)] or [torch.zeros(0, dtype=torch.long)])
    return {**{f"i2t/R@{k}": (i2t_N < k).float().mean().item() for k in ks},
            **{f"t2i/R@{k}": (t2i_M < k).float().mean().item() for k in ks}}


def zero_shot_classifier(prompt_emb_CTK: torch.Tensor) -> torch.Tensor:
    """Each class: the mean of its normalised prompt embeddings, renormalised (CLIP)."""
    return F.normalize(F.normalize(prompt_emb_CTK.float(), dim=-1).mean(dim=1), dim=-1)


def topk_correct(image_emb_NK: torch.Tensor, classifier_CK: torch.Tensor, labels_N: torch.Tensor,
                 ks=(1, 5)) -> dict[int, torch.Tensor]:
    """Per image: is the true class within the top k (ties against)? Boolean [N] per k."""
    ranks = target_ranks(image_emb_NK.float() @ classifier_CK.t(), labels_N)
    return {k: ranks < k for k in ks}
