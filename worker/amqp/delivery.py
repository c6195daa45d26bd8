"""A message taken from a queue, as the core sees it (``ports.Delivery``), and the copy we park when we
dead-letter it.

Built straight from aiormq's ``DeliveredMessage`` (any ``seams.Delivered``): the delivery tag and the channel it came
on are kept for ``settle.py``, which is the only place that settles it (``AmqpDelivery`` is a
``seams.SettleableDelivery``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pamqp.commands import Basic

from worker.amqp import codec
from worker.amqp.seams import Delivered, SettleableDelivery, SettlingChannel
from worker.topology import ERROR_HEADER

# Short-string properties a publisher chooses (pamqp attribute -> AMQP name); any may arrive as invalid
# UTF-8 (see codec.py). reply_to comes first so that it is the one named when several are bad.
STRING_PROPERTIES = {
    "reply_to": "reply_to",
    "correlation_id": "correlation_id",
    "content_type": "content_type",
    "content_encoding": "content_encoding",
    "message_id": "message_id",
    "message_type": "type",
    "app_id": "app_id",
    "user_id": "user_id",
    "expiration": "expiration",
    "cluster_id": "cluster_id",
}
_EMPTY: Mapping[str, Any] = {}


class AmqpDelivery:
    __slots__ = (
        "body",
        "channel",
        "content_encoding",
        "content_type",
        "correlation_id",
        "headers",
        "invalid_property",
        "message_id",
        "properties",
        "reply_to",
        "tag",
    )

    def __init__(self, message: Delivered):
        props: Basic.Properties = message.header.properties
        self.properties = props
        self.body = message.body
        self.tag: int = message.delivery.delivery_tag  # type: ignore[union-attr,assignment]
        self.channel: SettlingChannel = message.channel
        self.content_type = props.content_type
        self.content_encoding = props.content_encoding
        self.headers: Mapping[str, Any] = props.headers or _EMPTY
        self.reply_to = props.reply_to
        self.correlation_id = props.correlation_id
        self.message_id = props.message_id
        self.invalid_property = codec.first_invalid(
            ((name, getattr(props, attr)) for attr, name in STRING_PROPERTIES.items()), props.headers
        )


def parked_copy(delivery: SettleableDelivery, reason: str) -> Basic.Properties:
    """The properties of the copy we park: the message as it came, made safe for any AMQP reader.

    Properties that are not valid UTF-8 move into ``x-original-<name>`` headers as raw bytes (pamqp reads byte
    arrays without decoding them); header names are made printable; ``user_id`` is kept only as a header (the
    broker refuses a user_id that is not the publisher's); the copy is persistent and does not expire; and
    ``x-embed-error`` says why it is there."""
    props = delivery.properties
    headers: dict[str, Any] = {codec.printable(k): _writable(v) for k, v in (props.headers or {}).items()}
    fields: dict[str, Any] = {}
    for attr, name in STRING_PROPERTIES.items():
        value = getattr(props, attr)
        if value is None or attr in ("expiration", "cluster_id"):
            continue
        if attr == "user_id" or not codec.is_utf8(value):
            headers[f"x-original-{name.replace('_', '-')}"] = bytearray(value.encode("utf-8", "surrogateescape"))
        else:
            fields[attr] = value
    headers[ERROR_HEADER] = reason
    return Basic.Properties(
        headers=headers, delivery_mode=2, priority=props.priority, timestamp=props.timestamp, **fields
    )


def _writable(value: Any) -> Any:
    """A header value pamqp can encode again: it reads invalid long strings as bytes but writes only bytearray."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {codec.printable(k): _writable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_writable(v) for v in value]
    return value
