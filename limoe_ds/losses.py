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
