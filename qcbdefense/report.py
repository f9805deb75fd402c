"""One results model: every report the toolkit writes is a frozen, versioned dataclass that round-trips JSON.

`Report.to_dict` writes `{"version": N, ["command": ...], <every field>}`, recursing into nested dataclasses
(and lists, tuples, dicts and Optionals of them); `Report.from_dict` reads it back by the fields' types and
refuses, in one InputError line, another version, another command, an unknown key or a missing one. A nested
report carries its own version; a nested plain dataclass is read by its fields the same way (or by its own
`from_dict` when it has one, e.g. `QuantSpec`). A field whose metadata says `saved=False` (a tensor kept for
the caller, such as a score's predictions) is neither written nor read.

A report class bumps `VERSION` whenever the keys it writes change, so a file is either read exactly as it was
written or refused: no reader guesses what an older file lacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from qcbdefense.errors import InputError
from qcbdefense.fileio import write_json

R = TypeVar("R", bound="Report")
SAVED = "saved"  # field metadata key: False keeps a field out of the JSON


@dataclass(frozen=True)
class Report:
    """Base of every report: `to_dict` / `from_dict` / `save` / `load`.

    Class attributes a report sets: `VERSION` (bumped when its keys change), `KIND` (its name in messages, e.g.
    "purify report"), `COMMAND` (written as "command" when not None: the verb that made it), and `DERIVED`
    (properties written for readers of the JSON, e.g. "planted", and dropped when read back).
    """

    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "report"
    COMMAND: ClassVar[str | None] = None
    DERIVED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"version": self.VERSION}
        if self.COMMAND is not None:
            data["command"] = self.COMMAND
        data.update(fields_to_dict(self))
        data.update({name: encode(getattr(self, name)) for name in self.DERIVED})
        return data

    @classmethod
    def from_dict(cls: type[R], data: Any) -> R:
        """Inverse of `to_dict`; InputError for another version or command, an unknown or a missing key."""
        if not isinstance(data, Mapping):
            raise InputError(f"a {cls.KIND} must be a mapping, got {type(data).__name__}")
        data = dict(data)
        found = data.pop("version", None)
        if found != cls.VERSION:
            raise InputError(f"{cls.KIND} version {found!r} is not supported; this code reads version "
                             f"{cls.VERSION} (written by another qcbdefense: rerun the step that made it)")
        if cls.COMMAND is not None and data.pop("command", None) != cls.COMMAND:
            raise InputError(f"this is not a {cls.KIND} (its command is not {cls.COMMAND!r})")
        for name in cls.DERIVED:
            data.pop(name, None)
        return decode_fields(cls, data, cls.KIND)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically (`fileio.write_json`)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[R], path: str | os.PathLike) -> R:
        """Read a report saved by `save`; InputError for a missing file or one that is not such a report."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{cls.KIND} {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{cls.KIND} {path} is not valid JSON: {err}") from None


def saved_field(**kwargs: Any) -> Any:
    """A dataclass field kept out of the JSON (`to_dict` skips it, `from_dict` leaves its default)."""
    return dataclasses.field(metadata={SAVED: False}, **kwargs)


def encode(value: Any) -> Any:
    """Plain JSON data of `value`: a report or any object with `to_dict` by it, other dataclasses by their saved
    fields, containers element by element."""
    if hasattr(value, "to_dict") and not isinstance(value, type):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return fields_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {key: encode(v) for key, v in value.items()}
    return value


def fields_to_dict(obj: Any) -> dict:
    """The saved fields of dataclass `obj` as plain data (`encode` of each)."""
    return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.metadata.get(SAVED, True)}


def decode_fields(cls: type, data: Mapping[str, Any], what: str) -> Any:
    """`cls(**fields)` from `data` by the field types; InputError naming `what` for an unknown or missing key."""
    if not isinstance(data, Mapping):
        raise InputError(f"{what} must be a mapping, got {type(data).__name__}")
    saved = [f for f in dataclasses.fields(cls) if f.init and f.metadata.get(SAVED, True)]
    names = {f.name for f in saved}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"unknown {what} key(s): {', '.join(map(str, unknown))}")
    missing = sorted(names - set(data))
    if missing:
        raise InputError(f"{what} lacks key(s): {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: decode(hints[f.name], data[f.name], f"{what} {f.name}") for f in saved})


def decode(tp: Any, value: Any, what: str) -> Any:
    """`value` (plain JSON data) as type `tp`: dataclasses rebuilt, containers element by element."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return decode(rest[0], value, what) if len(rest) == 1 else value
    if origin is list:
        return [decode(args[0], v, what) for v in _sequence(value, what)]
    if origin is tuple:
        items = _sequence(value, what)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, what) for v in items)
        return tuple(decode(a, v, what) for a, v in zip(args, items))
    if origin is dict and args:
        if not isinstance(value, Mapping):
            raise InputError(f"{what} must be a mapping, got {type(value).__name__}")
        return {key: decode(args[1], v, what) for key, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp.from_dict(value) if hasattr(tp, "from_dict") else decode_fields(tp, value, what)
    return value


def _sequence(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)
