"""Tolerant decoding of AMQP short strings: one bad byte from a peer must not close our connection.

What pamqp does (pamqp 4.0.1, ``pamqp/decode.py``): ``short_str`` decodes every short string with a strict
``bytes.decode("utf-8")``, and ``field_table`` decodes header-table keys the same way. Short strings carry the
message properties a publisher chooses (``correlation_id``, ``reply_to``, ``message_id``, ``type``,
``app_id``, ``content_type``...), header keys, and method fields such as a delivery's routing key. One invalid
byte raises ``UnicodeDecodeError``; pamqp wraps it in ``UnmarshalingException``; aiormq's
``FrameReceiver.get_frame`` turns that into ``InvalidFrameError`` and closes the whole connection. The broker
then redelivers the same message to the reconnected consumer: a loop that also burns the delivery count of
every other message in the prefetch window (quorum queues dead-letter them all). Long strings are already
tolerant in pamqp (``long_str`` returns the raw bytes), so header *values* never hit this.

What ``install()`` changes: short strings and table keys that are not valid UTF-8 decode with
``surrogateescape`` (PEP 383), so the value stays a ``str`` for aiormq and aio-pika and keeps every byte; and
pamqp's string encoder becomes the exact inverse for property values, so such a value written back (the
caller's correlation id on its error reply) goes out byte for byte. Header names are not re-encoded raw: the
worker never echoes a caller's headers, and parked copies carry printable names (``printable``). Valid UTF-8
decodes and encodes exactly as before; only the failure path differs. It is process-wide because pamqp has no
per-connection decoder hook, and idempotent. The fix belongs upstream (decode short strings as ``long_str``
does); until then this module is the adapter.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

from pamqp import common
from pamqp import decode as _decode
from pamqp import encode as _encode

_state = {"installed": False}


def _short_str(value: bytes) -> tuple[int, str]:
    """pamqp's ``decode.short_str``, with surrogateescape instead of an exception on invalid UTF-8."""
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    raw = value[1 : length + 1]
    try:
        return length + 1, raw.decode("utf-8")
    except UnicodeDecodeError:
        return length + 1, raw.decode("utf-8", "surrogateescape")


def _field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's ``decode.field_table`` with tolerant keys (the loop is pamqp's, line for line)."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, common.FieldValue] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            raw = value[offset : offset + key_length]
            try:
                key = raw.decode("utf-8")
            except UnicodeDecodeError:
                key = raw.decode("utf-8", "surrogateescape")
            offset += key_length
            consumed, result = _decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def _string(encoder: Any, value: str) -> bytes:
    """pamqp's ``encode._string``, writing surrogate-escaped bytes back as they came."""
    if not isinstance(value, str):
        raise TypeError(f"str required, received {type(value)}")
    temp = value.encode("utf-8", "surrogateescape")
    max_length = 255 if encoder is common.Struct.byte else 4294967295
    if len(temp) > max_length:
        raise TypeError(f"string exceeds maximum length of {max_length} bytes")
    return bytes(encoder.pack(len(temp)) + temp)


def install() -> None:
    """Patch pamqp's decoders (and the string encoder) once per process."""
    if _state["installed"]:
        return
    _decode.short_str = _short_str
    _decode.METHODS["shortstr"] = _short_str
    _decode.field_table = _field_table
    _decode.METHODS["table"] = _field_table
    _decode.TABLE_MAPPING[b"F"] = _field_table
    _encode._string = _string
    _state["installed"] = True


# ---------------------------------------------------------------------- spotting what was escaped
def is_utf8(value: str) -> bool:
    """False for a string that came off the wire as invalid UTF-8 (it holds surrogate escapes)."""
    if value.isascii():  # the common case, checked in C without encoding
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_invalid(properties: Iterable[tuple[str, Any]], headers: Mapping[str, Any] | None) -> str | None:
    """The name of the first property or header key that is not valid UTF-8, for an error message."""
    for name, value in properties:
        if isinstance(value, str) and not is_utf8(value):
            return name
    for key in headers or ():
        if not is_utf8(key):
            return "a header name"
    return None


def printable(value: str) -> str:
    """The value with escaped bytes shown as ``\\xNN``: valid UTF-8 text, safe to put in a header or a log."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
