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


def pairwise_wins(image_emb_NK: torch.Tensor, text_emb_MK: torch.Tensor, true_N: torch.Tensor,
                  other_N: torch.Tensor) -> torch.Tensor:
    """Per image: does its true caption score strictly higher than the other one (ties against)?"""
    img = image_emb_NK.float()
    s_true = (img * text_emb_MK[true_N].float()).sum(-1)
    s_other = (img * text_emb_MK[other_N].float()).sum(-1)
    return s_true > s_other


def compositional_metrics(image_emb_NK: torch.Tensor, text_emb_MK: torch.Tensor, *, classifier_CK: torch.Tensor,
                          labels_N: torch.Tensor, heldout_classes: list[int], class_colour_C: torch.Tensor,
                          class_shape_C: torch.Tensor, caption_N: torch.Tensor,
                          negatives: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          negatives_per_image_N: torch.Tensor, retrieval_N: torch.Tensor) -> dict[str, float]:
    """The compositional evaluation's numbers, each with its chance level (``chance_...``).

    ``labels_N``: class of each one-object image (-1: two objects, not classified); ``caption_N``:
    each image's true caption (a row of ``text_emb_MK``); ``negatives``: type -> (image ids, caption
    rows), one hard negative per listed image; ``negatives_per_image_N``: how many each image has;
    ``retrieval_N``: the images (one per distinct caption) of the retrieval test."""
    out: dict[str, float] = {}
    single = labels_N >= 0
    img1, lab1 = image_emb_NK[single].float(), labels_N[single]
    C, n1 = classifier_CK.shape[0], int(single.sum())
    nan = math.nan
    if n1:
        pred = (img1 @ classifier_CK.t()).argmax(dim=1)
        held = torch.tensor(heldout_classes, dtype=torch.long, device=labels_N.device)
        remap = torch.full((C,), -1, dtype=torch.long, device=labels_N.device)
        remap[held] = torch.arange(len(held), device=labels_N.device)
        is_held = remap[lab1] >= 0
        among = topk_correct(img1[is_held], classifier_CK[held], remap[lab1[is_held]], ks=(1,))[1]
        out.update({"classify/top1": topk_correct(img1, classifier_CK, lab1, ks=(1,))[1].float().mean().item(),
                    "classify/heldout_top1": among.float().mean().item() if len(among) else nan,
                    "classify/colour_top1": (class_colour_C[pred] == class_colour_C[lab1]).float().mean().item(),
                    "classify/shape_top1": (class_shape_C[pred] == class_shape_C[lab1]).float().mean().item()})
    out.update({"classify/chance_top1": 1.0 / C, "classify/chance_heldout_top1": 1.0 / len(heldout_classes),
                "classify/chance_colour_top1": 1.0 / len(set(class_colour_C.tolist())),
                "classify/chance_shape_top1": 1.0 / len(set(class_shape_C.tolist())), "classify/images": n1})
    wins_all = torch.ones(image_emb_NK.shape[0], dtype=torch.bool, device=image_emb_NK.device)
    for kind, (ids, rows) in negatives.items():
        wins = pairwise_wins(image_emb_NK[ids], text_emb_MK, caption_N[ids], rows)
        wins_all[ids] &= wins
        out[f"negatives/{kind}"] = wins.float().mean().item() if len(ids) else nan
        out[f"negatives/chance_{kind}"] = 0.5
    has = negatives_per_image_N > 0
    out["negatives/all"] = wins_all[has].float().mean().item() if has.any() else nan
    out["negatives/chance_all"] = (1.0 / (negatives_per_image_N[has].double() + 1)).mean().item() if has.any() else nan
    M = len(retrieval_N)
    r = retrieval_metrics(image_emb_NK[retrieval_N], text_emb_MK[caption_N[retrieval_N]], ks=(1, 5))
    out.update({f"retrieval/{k}": v for k, v in r.items()})
    out.update({"retrieval/chance_R@1": 1.0 / M if M else nan, "retrieval/chance_R@5": min(5, M) / M if M else nan,
                "retrieval/pairs": M})
    return out
