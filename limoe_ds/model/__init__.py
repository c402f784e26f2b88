"""The LIMoE model: presets in limoe_ds.config.model, modules in limoe_ds.model.limoe."""

from limoe_ds.model.limoe import LIMoEModel, LIMoEOutput, build_model, flops_per_sample, init_weights, param_counts

__all__ = ["LIMoEModel", "LIMoEOutput", "build_model", "flops_per_sample", "init_weights", "param_counts"]
