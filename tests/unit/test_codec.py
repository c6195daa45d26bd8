"""The tolerant short-string codec, through pamqp's own frame marshal and unmarshal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pamqp import frame, header
from pamqp.commands import Basic

from worker.amqp import codec

codec.install()


def _round_trip(properties: Basic.Properties) -> Basic.Properties:
    raw = frame.marshal(header.ContentHeader(0, 3, properties), 1)
    _, _, decoded = frame.unmarshal(raw)
    assert isinstance(decoded, header.ContentHeader)
    return decoded.properties


def _wire(value: bytes) -> str:
    """How a publisher's raw short string looks after our decoder (what pika would have sent)."""
    return codec._short_str(bytes([len(value)]) + value)[1]


@given(st.binary(min_size=1, max_size=255))
def test_any_property_bytes_survive_decode_and_encode_unchanged(raw: bytes) -> None:
    value = _wire(raw)
    assert isinstance(value, str)
    props = _round_trip(Basic.Properties(correlation_id=value, message_type=value))
    assert props.correlation_id.encode("utf-8", "surrogateescape") == raw
    assert props.message_type == value


@given(st.binary(min_size=1, max_size=128))
def test_any_header_name_decodes(raw: bytes) -> None:
    table = b"".join([bytes([len(raw)]), raw, b"I", (7).to_bytes(4, "big")])
    consumed, decoded = codec._field_table(len(table).to_bytes(4, "big") + table)
    assert consumed == len(table) + 4
    assert [k.encode("utf-8", "surrogateescape") for k in decoded] == [raw] and list(decoded.values()) == [7]


@given(st.text(max_size=60))
def test_valid_utf8_decodes_as_before(text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > 255:
        return
    value = _wire(raw)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:  # lone surrogates in the generated text are not valid UTF-8 either
        assert not codec.is_utf8(value)
        return
    assert value == text and codec.is_utf8(value)


def test_invalid_properties_are_named_and_printable() -> None:
    props = _round_trip(Basic.Properties(message_id=_wire(b"id-\xff"), reply_to="amq.gen-ok"))
    assert codec.first_invalid([("reply_to", props.reply_to), ("message_id", props.message_id)], {}) == "message_id"
    assert codec.first_invalid([("reply_to", props.reply_to)], {_wire(b"\xfe"): 1}) == "a header name"
    assert codec.first_invalid([("reply_to", props.reply_to)], {"fine": 1}) is None
    assert codec.printable(props.message_id) == "id-\\xff"


def test_header_values_stay_as_pamqp_gives_them() -> None:
    """Long strings were already tolerant in pamqp: invalid ones come back as bytes."""
    props = _round_trip(Basic.Properties(headers={"k": "ok", "n": 5}))
    assert props.headers == {"k": "ok", "n": 5}
