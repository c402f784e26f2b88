"""The contrastive image-text loss (symmetric softmax InfoNCE, CLIP/open_clip).

Legend: B batch, K embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image_emb_BK: torch.Tensor, text_emb_BK: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """(CE(rows) + CE(cols)) / 2 over logits = exp(t) * z_img z_txt^T; pair i matches pair i.

    Computed in float32 whatever the embeddings' dtype.
    """
    logits_BB = logit_scale.float() * image_emb_BK.float() @ text_emb_BK.float().t()
    labels_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return (F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.t(), labels_B)) / 2


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient into the owner's slice.

    (torch.distributed.nn's version is deprecated; this one needs only all_gather and all_reduce,
    which every backend, gloo included, supports.)
    """

    @staticmethod
    def forward(ctx, x_BK, group):
        import torch.distributed as dist
        ctx.group, ctx.rank, ctx.B = group, dist.get_rank(group), x_BK.shape[0]
        out = x_BK.new_empty((dist.get_world_size(group) * ctx.B, *x_BK.shape[1:]))
        dist.all_gather_single(out, x_BK.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad_WBK):
        import torch.distributed as dist
        grad_WBK = grad_WBK.contiguous()
        dist.all_reduce(grad_WBK, group=ctx.group)
        return grad_WBK[ctx.rank * ctx.B:(ctx.rank + 1) * ctx.B], None


def gathered_contrastive_loss(image_emb_BK: torch.Tensor, text_emb_BK: torch.Tensor, logit_scale: torch.Tensor,
                              group=None) -> torch.Tensor:
    """The contrastive loss over the GLOBAL data-parallel batch, gradients through the gather.

    Each rank scores its own B images against all W*B captions and its own captions against all
    images (open_clip's local loss with gather-with-grad). The backward of the gather sums every
    rank's gradient into the features' owner, so after the usual data-parallel gradient average
    the gradient equals that of the single-process loss on the concatenated batch
    (tests/test_distributed.py). Micro-batches must have equal size on every rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrastive_loss(image_emb_BK, text_emb_BK, logit_scale)
    all_img = _GatherWithGrad.apply(image_emb_BK.float(), group)
    all_txt = _GatherWithGrad.apply(text_emb_BK.float(), group)
    B = image_emb_BK.shape[0]
    labels_B = torch.arange(B, device=image_emb_BK.device) + dist.get_rank(group) * B
    scale = logit_scale.float()
    loss_img = F.cross_entropy(scale * image_emb_BK.float() @ all_txt.t(), labels_B)
    loss_txt = F.cross_entropy(scale * text_emb_BK.float() @ all_img.t(), labels_B)
    return (loss_img + loss_txt) / 2
