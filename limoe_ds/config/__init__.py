"""Typed configuration: the model and its presets (``model``), the data sources (``data``), the run
("limoe" block of a DeepSpeed JSON, ``run``) and the one error type (``errors``). No torch here."""

from limoe_ds.config.errors import ConfigError
from limoe_ds.config.model import (MODALITIES, PRESETS, ModelConfig, MoEConfig, config_from_dict, get_preset,
                                   preset_names)

__all__ = ["ConfigError", "MODALITIES", "PRESETS", "ModelConfig", "MoEConfig", "config_from_dict", "get_preset",
           "preset_names"]
