"""A typed JSON codec for frozen record dataclasses: ``decode`` checks parsed JSON against the
type hints field by field and builds the records; ``encode`` is its inverse. The bundle's
manifest (``bundle.py``) is read and written through it, so a record's fields are its schema
and are never listed again by hand.

Errors are ``BundleError``s naming the field as a JSON path (``manifest.vae.latent_shape``) and
the JSON type expected, since a manifest is edited as JSON, not as Python.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from dbmef.errors import BundleError, DBMEFError

_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_name(tp: Any) -> str:
    """What a JSON reader calls the type (a manifest is edited as JSON, not as Python)."""
    return _JSON_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def decode(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses field by field (unknown keys ignored,
    missing required ones refused), tuples, dicts, unions with None, and classes with a
    ``from_dict``. A mismatch is a BundleError naming the field."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            try:
                return decode(inner, value, where)
            except BundleError as exc:
                errors.append(exc)
        raise errors[-1]
    if dataclasses.is_dataclass(tp) and not hasattr(tp, "from_dict"):
        return decode_fields(tp, value, where)
    if hasattr(tp, "from_dict"):
        need(value, dict, where)
        try:
            return tp.from_dict(value)
        except (DBMEFError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"field '{where}': {exc}") from exc
    if origin is tuple:
        need(value, list, where)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{j}]") for j, v in enumerate(value))
        if len(value) != len(args):
            raise BundleError(f"field '{where}' must hold {len(args)} values, got {len(value)}")
        return tuple(decode(a, v, f"{where}[{j}]") for j, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        need(value, list, where)
        (inner,) = typing.get_args(tp)
        return [decode(inner, v, f"{where}[{j}]") for j, v in enumerate(value)]
    if origin is dict:
        need(value, dict, where)
        _, vt = typing.get_args(tp)
        return {str(k): decode(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        need(value, (int, float), where)
        return float(value)
    need(value, tp, where)
    return value


def decode_fields(tp: Any, value: Any, where: str) -> Any:
    """A dataclass ``tp`` from a JSON object, field by field."""
    need(value, dict, where)
    hints = typing.get_type_hints(tp)
    kwargs = {}
    for f in dataclasses.fields(tp):
        if f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BundleError(f"field '{where}.{f.name}' is missing; re-export the bundle")
    try:
        return tp(**kwargs)
    except (DBMEFError, ValueError, TypeError) as exc:
        raise BundleError(f"field '{where}': {exc}") from exc


def need(value: Any, kind: Any, where: str) -> None:
    """Refuse ``value`` unless it is a ``kind`` (bool is not an integer here, as in JSON)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_type_name(k) for k in kinds)
        raise BundleError(f"field '{where}' must be a JSON {names}, got {type(value).__name__} {str(value)[:60]!r}; "
                          "the manifest is damaged: re-export the bundle")


def encode(obj: Any) -> Any:
    """The JSON form of a record (the inverse of ``decode``)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    return obj
