"""Array parameters bound in binary at the cost of their contents.

psycopg binds a plain ``list`` by looking through its elements for their type on every
execute (``ListDumper.get_key``/``upgrade``), then dumping each element through its own
dumper: for the dozen arrays of one ``authority_state_batch`` that is about a quarter of
the gateway's CPU per statement. The statements that bind arrays know their element types,
so they pass these list types instead; each has a dumper of its own (looked up once per
type, as for any scalar) that writes PostgreSQL's binary array format directly.

Use them only with binary placeholders (``%b``) on a server-side cursor: a client-side
cursor (``ClientCursor``, the relaxed statements) quotes text literals and takes plain lists.
"""

from __future__ import annotations

import abc
import struct
from typing import Any

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

__all__ = ["FloatArray", "Int4Array", "Int8Array", "TextArray"]


class TextArray(list[str | None]):
    """A ``text[]`` parameter (``None``: NULL)."""


class FloatArray(list[float | None]):
    """A ``float8[]`` parameter (``None``: NULL)."""


class Int4Array(list[int]):
    """An ``int4[]`` parameter."""


class Int8Array(list[int]):
    """An ``int8[]`` parameter."""


_HEAD = struct.Struct("!iiiii")  # ndim 1, has NULLs, element oid, length, lower bound 1
_EMPTY = struct.Struct("!iii")  # ndim 0, no NULLs, element oid
_LEN = struct.Struct("!i")
_NULL = _LEN.pack(-1)
_F8 = struct.Struct("!id")
_I4 = struct.Struct("!ii")
_I8 = struct.Struct("!iq")


def _oids(name: str) -> tuple[int, int]:
    info = psycopg.postgres.types[name]
    return info.oid, info.array_oid


class _ArrayDumper(Dumper):
    format = Format.BINARY
    element = ""  # the element type's name
    element_oid = 0

    def __init_subclass__(cls) -> None:
        cls.element_oid, cls.oid = _oids(cls.element)

    def dump(self, obj: Any) -> bytes:
        if not obj:
            return _EMPTY.pack(0, 0, self.element_oid)
        try:
            nulls, body = self.elements(obj)
        except struct.error as exc:  # a value out of the type's range: refused as psycopg would
            raise psycopg.DataError(f"{self.element}[] parameter: {exc}") from None
        return _HEAD.pack(1, nulls, self.element_oid, len(obj), 1) + body

    @abc.abstractmethod
    def elements(self, obj: Any) -> tuple[int, bytes]:
        """Whether any element is NULL (1 or 0), and the elements, length-prefixed."""


class _TextArrayDumper(_ArrayDumper):
    element = "text"

    def elements(self, obj: Any) -> tuple[int, bytes]:
        parts: list[bytes] = []
        nulls = 0
        for value in obj:
            if value is None:
                parts.append(_NULL)
                nulls = 1
            else:
                raw = str(value).encode()
                parts.append(_LEN.pack(len(raw)))
                parts.append(raw)
        return nulls, b"".join(parts)


class _FloatArrayDumper(_ArrayDumper):
    element = "float8"

    def elements(self, obj: Any) -> tuple[int, bytes]:
        pack = _F8.pack
        if None not in obj:
            return 0, b"".join([pack(8, float(v)) for v in obj])
        return 1, b"".join([_NULL if v is None else pack(8, float(v)) for v in obj])


class _Int4ArrayDumper(_ArrayDumper):
    element = "int4"

    def elements(self, obj: Any) -> tuple[int, bytes]:
        pack = _I4.pack
        return 0, b"".join([pack(4, v) for v in obj])


class _Int8ArrayDumper(_ArrayDumper):
    element = "int8"

    def elements(self, obj: Any) -> tuple[int, bytes]:
        pack = _I8.pack
        return 0, b"".join([pack(8, v) for v in obj])


# Registered process-wide: the types are this module's own, so nothing else changes.
for _cls, _dumper in ((TextArray, _TextArrayDumper), (FloatArray, _FloatArrayDumper),
                      (Int4Array, _Int4ArrayDumper), (Int8Array, _Int8ArrayDumper)):
    psycopg.adapters.register_dumper(_cls, _dumper)
