"""Data pipeline: image-text pairs from WebDataset tars, Parquet/Arrow or image folders (docs/DATA.md)."""

from limoe_ds.config.data import DataConfig, SourceConfig
from limoe_ds.data.errors import DataError, SKIP_REASONS
from limoe_ds.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from limoe_ds.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "SourceConfig", "DataError", "SKIP_REASONS", "Tokenizer", "TrainLoader", "EvalLoader",
           "build_train_loader", "build_eval_loader"]
