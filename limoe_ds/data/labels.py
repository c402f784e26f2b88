"""A classifier's targets (V-MoE, ``model.num_classes``): where a contrastive model's loader encodes
captions with a tokenizer, a classifier's loader reads each sample's integer label (a WebDataset
``KEY.cls`` member, or an integer ``label`` field of a parquet/arrow row) and ``Labels`` makes the
batch's ``"labels"`` tensor. A sample without a usable label is a counted skip (``missing_label``);
a label outside ``[0, num_classes)`` is a data/config mismatch and stops the run with one line.
"""

from __future__ import annotations

import torch

from limoe_ds.data.errors import DataError


class Labels:
    """The loader's encoder for a classifier: ``encode_batch(labels)`` -> int64 [B]."""

    batch_key = "labels"
    """The batch's key for what this encodes (a tokenizer's is "tokens")."""
    vocab_size = 0
    """No vocabulary (the trainer's vocabulary check passes)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def encode_batch(self, labels: list[int], text_len: int | None = None) -> torch.Tensor:
        """The labels as int64 [B] (``text_len``, a tokenizer's argument, is ignored)."""
        out = torch.tensor(labels, dtype=torch.int64)
        bad = out[(out < 0) | (out >= self.num_classes)]
        if bad.numel():
            raise DataError(f"label {int(bad[0])} is outside [0, model.num_classes={self.num_classes}): the data "
                            f"has more classes than the model; set model.num_classes to the data's class count")
        return out


__all__ = ["Labels"]
