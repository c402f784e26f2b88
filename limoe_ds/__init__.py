"""limoe_ds: train LIMoE (Language-Image Mixture of Experts) on DeepSpeed."""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu", dtype=None):
    """Load a directory written by ``tools/convert_checkpoint.py export`` (see limoe_ds.pretrained)."""
    import torch
    from limoe_ds.pretrained import load_pretrained as _load
    return _load(path, device=device, dtype=dtype or torch.float32)
