"""limoe_ds: train LIMoE (Language-Image Mixture of Experts) on DeepSpeed."""

__version__ = "0.1.0"
