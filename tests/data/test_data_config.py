"""DataConfig validation: every error is a ValueError naming the key."""

import re

import pytest

from limoe_ds.config.data import DataConfig, SourceConfig


def test_defaults_and_coercion():
    cfg = DataConfig(train=["a/*.tar", {"path": "b.parquet", "weight": 2}], val="v/*.tar")
    assert [s.path for s in cfg.train] == ["a/*.tar", "b.parquet"]
    assert cfg.train[1].weight == 2 and cfg.train[0].format == "auto"
    assert isinstance(cfg.val, SourceConfig) and cfg.val.path == "v/*.tar"
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, key", [
    ({"shuffle_buffer": 0}, "data.shuffle_buffer"),
    ({"num_workers": -1}, "data.num_workers"),
    ({"max_image_pixels": 0}, "data.max_image_pixels"),
    ({"max_caption_chars": 0}, "data.max_caption_chars"),
    ({"crop_scale": (0.5, 1.5)}, "data.crop_scale"),
    ({"crop_ratio": (2.0, 1.0)}, "data.crop_ratio"),
    ({"train": ["a.tar", {"path": "x.tar", "weight": 0}]}, "data.train[1].weight"),
    ({"train": [{"path": "x.tar", "format": "zip"}]}, "data.train[0].format"),
    ({"train": [{"path": ""}]}, "data.train[0].path"),
    ({"val": {"path": []}}, "data.val.path"),
    ({"train": [{"weight": 1}]}, "data.train[0].path"),
    ({"train": [{"path": "x", "colour": 1}]}, "data.train[0].colour"),
    ({"train": [42]}, "data.train[0]"),
])
def test_invalid_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match="^" + re.escape(key) + ":"):
        DataConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"^data\.shufle_buffer: unknown key; valid keys are"):
        DataConfig.from_dict({"shufle_buffer": 3})
