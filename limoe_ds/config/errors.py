"""Config validation shared by every typed config: one error type, one way to name the key.
(Types and unknown keys are checked by ``limoe_ds.config.typed``.)"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-fixable configuration error; the message starts with the key and says the fix."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")
