"""Settings written once: a frozen dataclass is both the schema of a ConfigDict section and the
reader of it.

Each field is written once, in its dataclass, with its type, its default and its comment.
`config_dict(cls)` makes the ConfigDict of those defaults (a nested dataclass becomes a sub-
ConfigDict, a tuple of strings written `comma_separated()` becomes "a,b,c"), which the recipes
and `--config.FIELD=VALUE` then change; `read(cls, config)` reads such a ConfigDict back into the
dataclass, coercing as the command line needs (an int for a float field, a list for a tuple, a
comma-separated string for a tuple of strings) and refusing a value of the wrong type in one line
that names the field (`optimizer.b1 must be a number; got 'x'`). Checks of a value's range
stay in the dataclass's `__post_init__`, so a dataclass built directly is checked the same way.

    config = config_dict(OptimizerSettings)      # the defaults, as a ConfigDict
    settings = read(OptimizerSettings, config, "optimizer.", total_steps=1000)

A field whose value another part of the config holds (e.g. the optimizer's `total_steps`, a
top-level field) is declared `given("total_steps")`: it is not in the section's schema, and `read`
takes it from that path of the whole config (or from its caller's keyword arguments).

`partial(cls, mapping, path)` checks and coerces a mapping of *some* fields of `cls` (nested
dataclasses as nested mappings), e.g. the model fields a run overrides; `placeholders(cls,
paths)` adds typed empty fields to a ConfigDict so that the command line can set a field the
recipe left unset.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

_GIVEN = "clip_jax.given"  # the field's value is passed by the caller, not read from the section
_COMMA = "clip_jax.comma_separated"  # a tuple of strings the ConfigDict writes as "a,b,c"
_MAPPINGS = (Mapping, ml_collections.ConfigDict, ml_collections.FrozenConfigDict)


def given(source: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field that is not part of its section's schema: `read` takes it from the dotted
    path `source` of the whole config (e.g. "total_steps"), or its caller passes it."""
    return dataclasses.field(metadata={_GIVEN: source or True}, **kwargs)


def comma_separated(default: tuple[str, ...]) -> Any:
    """A tuple-of-strings field written in the ConfigDict as one comma-separated string."""
    return dataclasses.field(default=default, metadata={_COMMA: True})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), else None."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    return next((option for option in options if dataclasses.is_dataclass(option)), None)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def schema_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` its ConfigDict section holds (all but the `given()` ones)."""
    return [field for field in dataclasses.fields(cls) if field.init and not field.metadata.get(_GIVEN)]


def config_dict(cls: type) -> ml_collections.ConfigDict:
    """The ConfigDict of `cls`'s defaults, nested dataclasses as sub-ConfigDicts."""
    config = ml_collections.ConfigDict()
    for field in schema_fields(cls):
        nested = _dataclass_of(_hints(cls)[field.name])
        default = _default(field)
        if nested is not None and (default is dataclasses.MISSING or dataclasses.is_dataclass(default)):
            config[field.name] = config_dict(nested)
        elif default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name} has no default to write into the schema")
        elif field.metadata.get(_COMMA):
            config[field.name] = ",".join(default)
        else:
            config[field.name] = default
    return config


def refuse(name: str, expected: str, value: Any) -> None:
    """The one-line error of every setting: `name must be expected; got value`."""
    raise ValueError(f"{name} must be {expected}; got {value!r}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (True is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` as a field of type `hint` holds it, or ValueError naming `name`."""
    if hint is Any or hint is object:
        return value
    if _is_union(hint):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        for option in options:
            try:
                return coerce(value, option, name)
            except ValueError:
                continue
        refuse(name, " or ".join(_describe(option) for option in options), value)
    origin = typing.get_origin(hint)
    if hint is float:
        if is_int(value) or isinstance(value, float):
            return float(value)
    elif hint is int:
        if is_int(value):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        return _coerce_tuple(value, typing.get_args(hint), name)
    elif origin is dict or hint is dict:
        if isinstance(value, _MAPPINGS):
            return dict(value) if isinstance(value, Mapping) else value.to_dict()
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, _MAPPINGS):
            return read(hint, value, f"{name}.")
    else:
        return value
    refuse(name, _describe(hint), value)


def _coerce_tuple(value: Any, arguments: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    if isinstance(value, str) and arguments[:1] == (str,):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if not isinstance(value, Sequence) or isinstance(value, str):
        refuse(name, f"a sequence of {_describe(arguments[0])}", value)
    if len(arguments) == 2 and arguments[1] is Ellipsis:
        return tuple(coerce(item, arguments[0], name) for item in value)
    if len(value) != len(arguments):
        refuse(name, f"{len(arguments)} values", value)
    return tuple(coerce(item, argument, name) for item, argument in zip(value, arguments))


def _describe(hint: Any) -> str:
    names = {float: "a number", int: "an int", bool: "True or False", str: "a string", dict: "a mapping"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is tuple:
        return f"a sequence of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def read(
    cls: type, config: Mapping[str, Any], path: str = "", root: Mapping[str, Any] | None = None, **given_values: Any
) -> Any:
    """The `cls` of ConfigDict section `config` (whose fields are named `path` + field in errors);
    a field the section lacks keeps its dataclass default. `root`: the whole config, where the
    `given(source)` fields are read (default `config`); `given_values`: the other `given()` fields."""
    root = config if root is None else root
    values = dict(given_values)
    for field in dataclasses.fields(cls):
        source, hint, name = field.metadata.get(_GIVEN), _hints(cls)[field.name], f"{path}{field.name}"
        if field.name in values or not field.init or source is True:
            continue
        if isinstance(source, str):
            values[field.name] = coerce(_lookup(root, source), hint, source)
        elif field.name in config:
            nested, value = _dataclass_of(hint), config[field.name]
            if nested is not None and isinstance(value, _MAPPINGS):
                values[field.name] = read(nested, value, f"{name}.", root)
            else:
                values[field.name] = coerce(value, hint, name)
    return cls(**values)


def partial(cls: type, mapping: Mapping[str, Any], path: str) -> dict[str, Any]:
    """`mapping`, a few fields of `cls` (a nested dataclass's as a nested mapping), each checked and
    coerced; ValueError naming an unknown field or a value of the wrong type."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    values = {}
    for key, value in mapping.items():
        if key not in fields:
            raise ValueError(f"{path}{key} is not a field of {cls.__name__}; its fields are {', '.join(fields)}")
        hint = _hints(cls)[key]
        nested = _dataclass_of(hint)
        if nested is not None and isinstance(value, _MAPPINGS):
            values[key] = partial(nested, value, f"{path}{key}.")
        else:
            values[key] = coerce(value, hint, f"{path}{key}")
    return values


def _field_type(hint: Any) -> type:
    """The one type a ConfigDict placeholder of a field of type `hint` holds."""
    if _is_union(hint):
        hint = next(option for option in typing.get_args(hint) if option is not type(None))
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


def placeholders(config: ml_collections.ConfigDict, cls: type, paths: Sequence[str], prefix: str = "") -> None:
    """Add to `config` (a section of fields of `cls`, named `prefix` in errors) an empty typed field
    for each dotted path (`decoder.layers`) it lacks, so that `--config.….decoder.layers=2` can
    set it; ValueError naming a path that is no field of `cls`."""
    for dotted in paths:
        node, owner = config, cls
        *parents, last = dotted.split(".")
        for depth, part in enumerate([*parents, last]):
            if not dataclasses.is_dataclass(owner) or part not in _hints(owner):
                fields = ", ".join(_hints(owner)) if dataclasses.is_dataclass(owner) else "none"
                where = ".".join([prefix.rstrip("."), *parents[:depth]])
                raise ValueError(f"{prefix}{dotted}: {where} has no field {part!r}; its fields are {fields}")
            if depth == len(parents):
                break
            owner = _dataclass_of(_hints(owner)[part])
            if part not in node or node[part] is None:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        if last not in node:
            node[last] = ml_collections.config_dict.placeholder(_field_type(_hints(owner)[last]))
