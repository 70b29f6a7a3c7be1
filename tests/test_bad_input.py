"""Invalid messages are dead-lettered with their reason; valid neighbours are stored; the server lives on."""

import json
from datetime import datetime, timedelta, timezone

import pika
import pytest

from messages import InvalidMessage, to_document

NOW = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def body(**fields):
    return json.dumps(fields).encode()


# name: (body, words the reason must hold)
BAD_MESSAGES = {
    "not-json": (b"status=3", "not JSON"),
    "byte-order-mark": (b'\xef\xbb\xbf{"status": 3}', "byte order mark"),
    "invalid-utf8": (b'{"status": 3, "device_id": "\xff\xfe"}', "UTF-8"),
    "array": (b"[3]", "array"),
    "string": (b'"3"', "string"),
    "number": (b"3", "number"),
    "null": (b"null", "null"),
    "empty-body": (b"", "empty"),
    "too-large": (body(status=1, device_id="d", padding="x" * 70000), "more than 65536"),
    "nan": (b'{"status": NaN}', "NaN"),
    "deep-nesting": (b'{"status": 1, "x": ' + b"[" * 20000 + b"]" * 20000 + b"}", "not JSON"),
    "status-missing": (body(device_id="d"), "status is missing"),
    "status-null": (body(status=None), "status must be"),
    "status-true": (body(status=True), "status must be"),
    "status-float": (b'{"status": 3.0}', "status must be"),
    "status-string": (body(status="3"), "status must be"),
    "status-negative": (body(status=-1), "status must be"),
    "status-7": (body(status=7), "status must be"),
    "status-huge": (body(status=10**30), "status must be"),
    "timestamp-unparsable": (body(status=1, timestamp="yesterday"), "timestamp"),
    "timestamp-empty": (body(status=1, timestamp=""), "timestamp"),
    "timestamp-future": (body(status=1, timestamp="2999-01-01T00:00:00Z"), "future"),
    "timestamp-number": (body(status=1, timestamp=1732700000), "timestamp must be"),
    "timestamp-year-0": (body(status=1, timestamp="0000-01-01T00:00:00Z"), "timestamp"),
    "device-id-number": (body(status=1, device_id=42), "device_id"),
    "device-id-too-long": (body(status=1, device_id="d" * 129), "device_id"),
    "device-id-empty": (body(status=1, device_id=""), "device_id"),
    "message-id-number": (body(status=1, message_id=7), "message_id"),
    "dollar-key": (body(status=1, **{"$where": "1"}), "'$'"),
    "dotted-key": (body(status=1, **{"a.b": 1}), "'.'"),
    "nested-dollar-key": (body(status=1, extra={"$gt": 1}), "'$'"),
}


@pytest.mark.parametrize("name", BAD_MESSAGES)
def test_to_document_rejects(name):
    raw, reason = BAD_MESSAGES[name]
    with pytest.raises(InvalidMessage, match=None) as error:
        to_document(raw, received_at=NOW)
    assert reason in str(error.value)
    assert len(str(error.value)) < 300


@pytest.mark.parametrize("raw, expected", [
    (body(status=0), {"status": 0, "timestamp": NOW}),
    (body(status=6, timestamp="2026-11-27T11:00:00+01:00", device_id="s-1", message_id="m"),
     {"status": 6, "timestamp": NOW, "device_id": "s-1", "_id": "m"}),
    (body(status=3, timestamp="2026-11-27T09:59:59.5"), {"status": 3, "timestamp": NOW - timedelta(seconds=0.5)}),
    (body(status=3, timestamp="2026-11-27T10:04:59Z"), {"status": 3, "timestamp": NOW + timedelta(seconds=299)}),
    (body(status=3, unknown_field="ignored"), {"status": 3, "timestamp": NOW}),
])
def test_to_document_accepts(raw, expected):
    document = to_document(raw, received_at=NOW)
    assert document == dict(expected, received_at=NOW)


def test_amqp_message_id_wins_over_the_body():
    assert to_document(body(status=1, message_id="body"), message_id="property", received_at=NOW)["_id"] == "property"


def test_bad_messages_are_dead_lettered_with_reasons_between_stored_neighbours(pipeline):
    server = pipeline.start_server()
    for index, name in enumerate(BAD_MESSAGES):
        pipeline.publish({"status": index % 7, "message_id": f"good-{index}"})
        pipeline.publish(BAD_MESSAGES[name][0], pika.BasicProperties(delivery_mode=2, message_id=f"bad-{name}"))
    pipeline.publish({"status": 1, "message_id": "good-last"})

    pipeline.wait_stored(len(BAD_MESSAGES) + 1)
    dead = pipeline.dead_letters(len(BAD_MESSAGES))
    reasons = {properties.message_id: properties.headers["x-rejected-reason"] for properties, _ in dead}
    wrong = {name: reasons.get(f"bad-{name}") for name, (_, words) in BAD_MESSAGES.items()
             if words not in reasons.get(f"bad-{name}", "")}
    assert not wrong, f"dead-lettered without the expected reason: {wrong}"
    bodies = {properties.message_id: raw for properties, raw in dead}
    assert bodies["bad-invalid-utf8"] == BAD_MESSAGES["invalid-utf8"][0]  # kept byte for byte
    assert server.poll() is None
