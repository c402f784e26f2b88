"""The contrastive image-text losses: the symmetric softmax InfoNCE (CLIP/open_clip) and the pairwise
sigmoid loss (SigLIP), each over the global data-parallel batch with exact gradients; and a
classifier's (V-MoE) cross-entropy, softmax or sigmoid.

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


# ---- the sigmoid loss (SigLIP) ---------------------------------------------------------------------------
SIGMOID_IMPLS = ("all_gather", "ring")


def _pair_signs(like_BC: torch.Tensor, first: int | None) -> torch.Tensor:
    """z_ij: +1 where image i meets its own caption, column ``first + i`` (None: none of these
    captions is a match), -1 elsewhere."""
    signs = -torch.ones_like(like_BC)
    if first is not None:
        signs[:, first:first + like_BC.shape[0]].diagonal().fill_(1.0)
    return signs


def _sigmoid_terms(logits_BC: torch.Tensor, first: int | None) -> torch.Tensor:
    """sum_ij -log sigmoid(z_ij * l_ij), z from _pair_signs."""
    return -F.logsigmoid(_pair_signs(logits_BC, first) * logits_BC).sum()


def sigmoid_loss(image_emb_BK: torch.Tensor, text_emb_BK: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: -1/B sum_i sum_j log sigmoid(z_ij (exp(t) x_i.y_j + b)),
    z_ij = 1 when pair i is pair j, else -1 (Zhai et al. 2023, big_vision ``sigmoid_loss``).

    Every image-caption pair is an independent binary problem: no normalisation over the batch,
    so a rank needs no other rank's logits. Computed in float32 whatever the embeddings' dtype.
    """
    logits_BB = logit_scale.float() * image_emb_BK.float() @ text_emb_BK.float().t() + logit_bias.float()
    return _sigmoid_terms(logits_BB, first=0) / image_emb_BK.shape[0]


def _exchange(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send each tensor to the next rank of ``group`` and receive the same shapes from the
    previous one, all in one batch of point-to-point ops."""
    import torch.distributed as dist
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dst = dist.get_global_rank(group, (rank + 1) % world)
    src = dist.get_global_rank(group, (rank - 1) % world)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, src, group) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _SigmoidRing(torch.autograd.Function):
    """The sigmoid loss with the captions travelling around the data-parallel ranks.

    Forward: each rank scores its B images against its own captions, passes the caption chunk to
    the next rank and receives the previous one's, W times in all; it keeps no logits. Backward:
    the same walk recomputes each chunk's B x B logits, accumulates the images' gradient here and
    carries each chunk's gradient along with the chunk, so that one last hop returns every
    caption's summed gradient to its owner (what the all-gather's backward all-reduce gives).
    Memory per rank: the B x K embeddings and one B x B block, instead of B x W*B logits and the
    W*B x K gathered captions.
    """

    @staticmethod
    def forward(ctx, img_BK, txt_BK, scale, bias, group):
        import torch.distributed as dist
        world = dist.get_world_size(group)
        ctx.group, ctx.world = group, world
        ctx.save_for_backward(img_BK, txt_BK, scale, bias)
        total, chunk = img_BK.new_zeros(()), txt_BK
        for hop in range(world):
            total = total + _sigmoid_terms(scale * img_BK @ chunk.t() + bias, first=0 if hop == 0 else None)
            if hop < world - 1:
                (chunk,) = _exchange([chunk], group)
        return total / img_BK.shape[0]

    @staticmethod
    def backward(ctx, grad):
        img_BK, txt_BK, scale, bias = ctx.saved_tensors
        g = grad / img_BK.shape[0]
        d_img, d_scale, d_bias = torch.zeros_like(img_BK), torch.zeros_like(scale), torch.zeros_like(bias)
        chunk, d_chunk = txt_BK, torch.zeros_like(txt_BK)
        for hop in range(ctx.world):
            sims_BB = img_BK @ chunk.t()
            signs = _pair_signs(sims_BB, 0 if hop == 0 else None)
            # d/dl of -log sigmoid(z l) = -z sigmoid(-z l)
            d_logits = -signs * torch.sigmoid(-signs * (scale * sims_BB + bias)) * g
            d_bias += d_logits.sum()
            d_scale += (d_logits * sims_BB).sum()
            d_img += scale * d_logits @ chunk
            d_chunk = d_chunk + scale * d_logits.t() @ img_BK
            if hop < ctx.world - 1:
                chunk, d_chunk = _exchange([chunk, d_chunk], ctx.group)
        if ctx.world > 1:  # the chunk held now is the next rank's: its gradient goes home
            (d_chunk,) = _exchange([d_chunk], ctx.group)
        return d_img, d_chunk, d_scale, d_bias, None


def gathered_sigmoid_loss(image_emb_BK: torch.Tensor, text_emb_BK: torch.Tensor, logit_scale: torch.Tensor,
                          logit_bias: torch.Tensor, group=None, impl: str = "all_gather") -> torch.Tensor:
    """The sigmoid loss over the GLOBAL data-parallel batch: each rank's images against every
    rank's captions, normalised by the local batch, so that the data-parallel average of the
    ranks' losses (and of their gradients) is the single-process loss on the concatenated batch
    (tests/test_losses.py). ``impl``: ``all_gather`` (gather the captions with their gradient;
    B x W*B logits per rank) or ``ring`` (the captions travel rank to rank; B x B at a time;
    _SigmoidRing). Both are exact; docs/PERFORMANCE.md measures them side by side.
    """
    import torch.distributed as dist

    if impl not in SIGMOID_IMPLS:
        raise ValueError(f"train.loss_impl: {impl!r} is not one of {SIGMOID_IMPLS}")
    scale, bias = logit_scale.float().reshape(()), logit_bias.float().reshape(())
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return sigmoid_loss(image_emb_BK, text_emb_BK, scale, bias)
    img, txt = image_emb_BK.float(), text_emb_BK.float()
    if impl == "ring":
        return _SigmoidRing.apply(img, txt, scale, bias, group)
    all_txt = _GatherWithGrad.apply(txt, group)
    B, rank = img.shape[0], dist.get_rank(group)
    return _sigmoid_terms(scale * img @ all_txt.t() + bias, first=rank * B) / B


# ---- the loss a model trains with ------------------------------------------------------------------------
def pair_loss(out, group=None, impl: str = "all_gather") -> torch.Tensor:
    """The contrastive loss of a model output over the data-parallel batch: the sigmoid loss when
    the model has a learned bias (``model.logit_bias_init``, set by ``train.loss=sigmoid``), the
    softmax loss otherwise. ``group=False``: this rank's batch alone (evaluation's in-batch loss)."""
    if getattr(out, "logit_bias", None) is not None:
        if group is False:
            return sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias)
        return gathered_sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias, group, impl)
    if group is False:
        return contrastive_loss(out.image_emb, out.text_emb, out.logit_scale)
    return gathered_contrastive_loss(out.image_emb, out.text_emb, out.logit_scale, group=group)


def classification_loss(logits_BC: torch.Tensor, labels_B: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """A classifier's (V-MoE) cross-entropy, the mean over this rank's batch (each sample is its own
    term, so the data-parallel gradient average gives the global batch's mean: no gather). 'softmax':
    softmax cross-entropy; 'sigmoid': per-class sigmoid cross-entropy against the one-hot label,
    summed over classes (big_vision's ``sigmoid_xent``, V-MoE's JFT loss). Float32 whatever the dtype."""
    logits_BC = logits_BC.float()
    if kind == "softmax":
        return F.cross_entropy(logits_BC, labels_B)
    if kind == "sigmoid":
        target_BC = F.one_hot(labels_B, logits_BC.shape[1]).float()
        return F.binary_cross_entropy_with_logits(logits_BC, target_BC, reduction="none").sum(dim=1).mean()
    raise ValueError(f"train.loss: {kind!r} is not a classification loss ('softmax' or 'sigmoid')")
