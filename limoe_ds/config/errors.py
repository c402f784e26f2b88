"""Config validation shared by every typed config: one error type, one way to name the key."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
    """A user-fixable configuration error; the message starts with the key and says the fix."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def reject_unknown(cls: type, d: Mapping[str, Any], key: str) -> None:
    """Unknown keys of dataclass ``cls`` in ``d`` -> ConfigError listing the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - valid)
    check(not unknown, f"{key}.{unknown[0] if unknown else ''}", f"unknown key; valid keys are {sorted(valid)}")
