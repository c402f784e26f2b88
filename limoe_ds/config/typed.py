"""The one type check of user-given config values, derived from the dataclass annotations.

``build(cls, value, key)`` turns a mapping read from JSON (or ``--set``) into the dataclass ``cls``:
every field's value is checked against its declared type, recursively, BEFORE ``cls.__post_init__``
runs the section's range checks, and a wrong value is a ``ConfigError`` naming the full dotted key,
what the field takes, what was given and the fix::

    train.activation_checkpointing: must be true or false (a JSON boolean), got the string 'false';
    write false without quotes

Types understood: ``bool`` (a JSON boolean only, never "false" or 0/1), ``int`` (not a bool, not
1.5, not "42"), ``float`` (an int is accepted and converted; not a bool, not a string, finite),
``str``, ``tuple[X, Y]`` / ``tuple[X, ...]`` (a JSON list; becomes a tuple), ``list[X]``,
``dict[str, X]``, a nested dataclass (a mapping, unknown keys rejected with the valid ones), ``Any``
and unions of those (``X | None``, ``str | list[str]``, ``dict[str, float] | float``). Hooks a
dataclass may declare (``ClassVar``): ``shorthand(value)`` (a classmethod turning a non-mapping
value into its mapping, e.g. a path -> ``{"path": path}``; a ``list[cls]`` field then also takes one
item), ``open_keys = True`` (keys that are not fields are left alone: DeepSpeed's blocks),
``check_key`` (the key prefix its ``__post_init__`` messages use, replaced by the real key) and
``expects`` / ``expects_plural`` (how a message describes it). A field's ``metadata["expects"]`` overrides the
description of its type.

Why not pydantic / msgspec / cattrs: they would validate these types well, but the config is a set
of plain dataclasses whose ``__post_init__`` range checks, presets and ``to_dict()`` (stored in
every checkpoint's completion marker) the rest of the code and old checkpoints rely on. Each library
would mean either a second model of every section (pydantic models, msgspec Structs) or a converter
whose error messages have to be re-worded anyway to reach our one-line ``error: KEY: what; fix`` form
(cattrs' exception groups, pydantic's ``loc`` tuples, msgspec's ``$.train.seed``), plus their own
strictness rules to pin (pydantic's lax mode turns "42" into 42, which is exactly the bug). The types
used here are few and stable; one stdlib walk of ``typing.get_type_hints`` is about as long as the
glue a library would need, has no new dependency, and keeps ``config/`` importable without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Mapping

from limoe_ds.config.errors import ConfigError, check

_NAMES = {bool: ("true or false (a JSON boolean)", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"), type(None): ("null", "nulls")}


def hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the config modules use ``from __future__ import annotations``)."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def describe(tp: Any, plural: bool = False) -> str:
    """How a message names what a type takes: 'an integer', 'a list of 2 numbers', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _NAMES:
        return _NAMES[tp][plural]
    if tp is Any:
        return "values" if plural else "any value"
    if len(_members(tp)) > 1:
        return " or ".join(describe(m, plural) for m in _members(tp))
    if origin is tuple:
        n = "" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} "
        return ("lists" if plural else "a list") + f" of {n}{describe(args[0], True)}"
    if origin is list:
        return ("lists" if plural else "a list") + f" of {describe(args[0], True)}"
    if origin in (dict, Mapping):
        return ("mappings" if plural else "a mapping") + f" of {describe(args[1], True)}"
    if dataclasses.is_dataclass(tp):
        return (getattr(tp, "expects_plural", "mappings (sections)") if plural else
                getattr(tp, "expects", "a mapping (a section)"))
    return str(tp)


def show(value: Any) -> str:
    """The value given, as a message names it."""
    if isinstance(value, str):
        return f"the string {value!r}"
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = "a list " if isinstance(value, (list, tuple)) else "a mapping " if isinstance(value, Mapping) else ""
    return kind + text


def _fix(tp: Any, value: Any, default: Any, expects: str | None = None) -> str:
    if isinstance(value, str):
        try:
            parsed = json.loads(value.strip().lower() if value.strip().lower() in ("true", "false") else value)
        except ValueError:
            parsed = dataclasses.MISSING
        if parsed is not dataclasses.MISSING and not isinstance(parsed, str) and _accepts(tp, parsed):
            return f"write {json.dumps(parsed)} without quotes"
    if value is None:
        return ("give a value, or leave the key out for the default " + json.dumps(default, default=str)
                if default is not dataclasses.MISSING else "give a value; this key cannot be null")
    if tp is bool and isinstance(value, (int, float)):
        return "write true or false (1 and 0 are not booleans)"
    if int in _members(tp) and isinstance(value, float) and math.isfinite(value):
        return (f"write {int(value)} without the decimal point" if value.is_integer()
                else "give a whole number")
    shown = dataclasses.MISSING if default in (None, [], {}) else default
    example = "" if shown is dataclasses.MISSING else f", e.g. {json.dumps(shown, default=str)}"
    return f"give {expects or describe(tp)}{example}"


def _accepts(tp: Any, value: Any) -> bool:
    try:
        convert(tp, value, "")
        return True
    except ConfigError:
        return False


def _wrong(tp: Any, value: Any, key: str, default: Any, expects: str | None = None) -> ConfigError:
    return ConfigError(f"{key}: must be {expects or describe(tp)}, got {show(value)}; "
                       f"{_fix(tp, value, default, expects)}")


def convert(tp: Any, value: Any, key: str, default: Any = dataclasses.MISSING, expects: str | None = None) -> Any:
    """``value`` checked against ``tp`` (and converted: int -> float, list -> tuple, mapping ->
    dataclass); a ConfigError naming ``key`` (or a key inside it) when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    members = _members(tp)
    if len(members) > 1:
        if value is None:
            if type(None) in members:
                return None
            raise _wrong(tp, value, key, default, expects)
        # A container goes to the one member of its shape (its errors name the key inside it), a
        # lone section (``X | None``) takes any value; a scalar is tried against each scalar member.
        given = [m for m in members if m is not type(None)]
        if len(given) == 1 and dataclasses.is_dataclass(given[0]):
            return convert(given[0], value, key, default)
        shape = [m for m in given if _shape(m) == _shape_of(value)]
        if len(shape) == 1 and _shape(shape[0]) != "scalar":
            return convert(shape[0], value, key, default)
        for m in shape:
            if _accepts(m, value):
                return convert(m, value, key, default)
        raise _wrong(tp, value, key, default, expects)
    if tp in (bool, str):
        if type(value) is not tp:
            raise _wrong(tp, value, key, default, expects)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(tp, value, key, default, expects)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(tp, value, key, default, expects)
        check(math.isfinite(value), key, f"must be a finite number, got {value}; NaN and infinity are not")
        return float(value)
    if tp is type(None):
        if value is not None:
            raise _wrong(tp, value, key, default, expects)
        return None
    if origin in (tuple, list):
        if origin is list and dataclasses.is_dataclass(args[0]) and not isinstance(value, (list, tuple)):
            short = getattr(args[0], "shorthand", None)
            if isinstance(value, Mapping) or (short is not None and isinstance(short(value), Mapping)):
                value = [value]  # one section where a list of them is expected
        if not isinstance(value, (list, tuple)):
            raise _wrong(tp, value, key, default, expects)
        var = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        if not var and len(value) != len(args):
            raise ConfigError(f"{key}: must be {expects or describe(tp)}, got {show(value)}; "
                              f"give exactly {len(args)} values")
        items = [convert(args[0] if var else a, v, f"{key}[{i}]")
                 for i, (v, a) in enumerate(zip(value, args if not var else [args[0]] * len(value)))]
        return items if origin is list else tuple(items)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong(tp, value, key, default, expects)
        for k in value:
            check(isinstance(k, str), key, f"keys must be strings, got {k!r}")
        return {k: convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise TypeError(f"{key}: limoe_ds.config.typed does not know the type {tp!r}")  # a programming error


def _shape(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return "list"
    if origin in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return "mapping"
    return "scalar"


def _shape_of(value: Any) -> str:
    return "list" if isinstance(value, (list, tuple)) else "mapping" if isinstance(value, Mapping) else "scalar"


def build(cls: type, value: Any, key: str):
    """A mapping -> the dataclass ``cls``, each field type-checked first, then ``cls(**fields)``
    (whose ``__post_init__`` runs the range checks). ``key`` names the mapping in messages ('' for
    the top level of the DeepSpeed JSON)."""
    if not isinstance(value, Mapping) and getattr(cls, "shorthand", None) is not None:
        value = cls.shorthand(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be {describe(cls)}, got {show(value)}; "
                          f"give a mapping with keys from {sorted(hints(cls))}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    types_ = hints(cls)
    if not getattr(cls, "open_keys", False):
        unknown = sorted(str(k) for k in value if k not in fields)
        check(not unknown, _join(key, unknown[0] if unknown else ""), f"unknown key; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if name not in value:
            check(default is not dataclasses.MISSING, _join(key, name), f"is required; give {describe(types_[name])}")
            continue
        kwargs[name] = convert(types_[name], value[name], _join(key, name), default, f.metadata.get("expects"))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        prefix = getattr(cls, "check_key", None)
        if prefix and str(e).startswith(prefix):
            raise ConfigError(key + str(e)[len(prefix):]) from None
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if key and str(e).startswith(key) else f"{key or cls.__name__}: {e}") from None


def _join(key: str, name: str) -> str:
    """The dotted key of a field (a top-level section has no prefix: DeepSpeed's own keys)."""
    return f"{key}.{name}" if key else name


__all__ = ["build", "convert", "describe", "hints", "show"]
