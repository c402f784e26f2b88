"""Caption tokenizer: a thin wrapper around a Hugging Face ``tokenizers`` tokenizer.json.

Policy (see docs/DATA.md): lower-cased byte-level BPE; id 0 is ``<pad>`` (the model masks id 0 and
never routes it); no BOS; a "sticky" EOS: every caption ends with ``</s>``, also when it was cut to
text_len (big_vision SigLIP configs: ``tok(..., bos="no", eos="sticky")``). So every caption has at
least one non-pad token and mean pooling over non-pad tokens is always defined.
Legend: B batch, L text_len.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

PAD = "<pad>"
EOS = "</s>"
SPECIAL_TOKENS = (PAD, EOS)
"""Trained in this order, so PAD is id 0 and EOS id 1 (tools/train_tokenizer.py)."""


class Tokenizer:
    """Encodes captions to fixed-length id rows: [tokens..., EOS, PAD, PAD, ...]."""

    def __init__(self, tok: HFTokenizer) -> None:
        pad_id, eos_id = tok.token_to_id(PAD), tok.token_to_id(EOS)
        if pad_id != 0:
            raise ValueError(f"tokenizer: {PAD!r} must have id 0 (the model masks id 0 as padding), "
                             f"got {pad_id}; retrain with tools/train_tokenizer.py")
        if eos_id is None:
            raise ValueError(f"tokenizer: no {EOS!r} token; retrain with tools/train_tokenizer.py")
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.pad_id = 0
        self.eos_id = int(eos_id)

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"tokenizer: cannot load {path!r} ({e}); build it with tools/train_tokenizer.py") from None
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without EOS or padding."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], text_len: int) -> torch.Tensor:
        """-> LongTensor [B, text_len]: ids cut to text_len - 1, then EOS, then PAD (0)."""
        if text_len < 1:
            raise ValueError(f"text_len: must be >= 1 (room for EOS), got {text_len}")
        tokens_BL = np.zeros((len(texts), text_len), dtype=np.int64)
        # One encode per caption, not the Rust batch call: no thread pool, so DataLoader workers fork
        # cleanly, and captions are short (a batch of 64 encodes in about a millisecond).
        for i, text in enumerate(texts):
            ids = self.encode(text)[: text_len - 1]
            tokens_BL[i, : len(ids)] = ids
            tokens_BL[i, len(ids)] = self.eos_id
        return torch.from_numpy(tokens_BL)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Ids -> text, dropping PAD and EOS."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tok.decode([i for i in ids if i not in (self.pad_id, self.eos_id)]).strip()



def train_bpe(texts, vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a lower-cased byte-level BPE on an iterable of captions; PAD = 0, EOS = 1.

    Byte-level: any script encodes without an unknown token (Openclipart titles are partly Italian and
    French; web captions are anything). Lower-cased (NFKC first): with 4096 ids, case variants of
    the same word would waste merges, and CLIP's tokenizer lower-cases too.
    """
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    if not 256 + len(SPECIAL_TOKENS) <= vocab_size:
        raise ValueError(f"--vocab-size: must be >= {256 + len(SPECIAL_TOKENS)} (256 byte symbols + specials), "
                         f"got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


__all__ = ["Tokenizer", "train_bpe", "PAD", "EOS", "SPECIAL_TOKENS"]
