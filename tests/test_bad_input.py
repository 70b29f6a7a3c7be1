"""Invalid messages are dead-lettered with their reason; valid neighbours are stored; the server lives on."""

import json
import uuid
from datetime import datetime, timedelta, timezone

import bson
import pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messages import INVALID_KINDS, InvalidMessage, parse_time, to_document
from counts import BatchWriter

NOW = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def body(**fields):
    return json.dumps(fields).encode()


def timestamp(text):
    return body(status=1, timestamp=text)


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
    "nested-nul-key": (body(status=1, extra=[{"a\x00": 1}]), "NUL"),
    # JSON that says two things: RFC 8259 section 4 wants unique names
    "duplicate-status": (b'{"status": 9, "status": 2, "message_id": "k"}', 'key "status" is given twice'),
    "duplicate-same-value": (b'{"status": 2, "status": 2}', 'key "status" is given twice'),
    "duplicate-message-id": (b'{"status": 2, "message_id": "a", "message_id": "b"}', 'key "message_id" is given twice'),
    "duplicate-ignored-key": (b'{"status": 2, "note": 1, "note": 1}', 'key "note" is given twice'),
    "duplicate-nested": (b'{"status": 2, "extra": {"a": 1, "b": {}, "a": 3}}', 'key "a" is given twice'),
    "duplicate-in-array": (b'{"status": 2, "extra": [{"x": 1}, {"y": 1, "y": 2}]}', 'key "y" is given twice'),
    "duplicate-by-escape": (b'{"status": 2, "st\\u0061tus": 3}', 'key "status" is given twice'),
    # A lone surrogate is valid JSON grammar but not Unicode text: UTF-8 and BSON cannot encode it
    "surrogate-device-id": (b'{"status": 2, "message_id": "P", "device_id": "\\ud800"}', '"device_id" holds a lone surrogate'),
    "surrogate-message-id": (b'{"status": 2, "message_id": "a\\uDFFFb"}', '"message_id" holds a lone surrogate'),
    "surrogate-pair-reversed": (b'{"status": 2, "device_id": "\\udc00\\ud800"}', '"device_id" holds a lone surrogate'),
    "surrogate-high-at-end": (b'{"status": 2, "device_id": "ok\\ud83d"}', '"device_id" holds a lone surrogate'),
    "surrogate-timestamp": (b'{"status": 2, "timestamp": "2026-11-27T10:00:00Z\\ud800"}', '"timestamp" holds a lone surrogate'),
    "surrogate-ignored-field": (b'{"status": 2, "note": "\\ud800"}', '"note" holds a lone surrogate'),
    "surrogate-key": (b'{"status": 2, "\\ud800": 1}', 'key "\\ud800" holds a lone surrogate'),
    "surrogate-nested-array": (b'{"status": 2, "extra": {"list": [1, ["\\udbff"]]}}', '"list" holds a lone surrogate'),
    # Times that only look like RFC 3339 are refused, never read as something else
    "time-fraction-of-hour": (timestamp("2026-11-27T10.5Z"), ("timestamp", "fraction of an hour")),
    "time-fraction-of-minute": (timestamp("2026-11-27T10:30.5Z"), ("timestamp", "fraction of an hour or a minute")),
    "time-comma-fraction-of-hour": (timestamp("2026-11-27T10,5Z"), ("timestamp", "fraction of an hour")),
    "time-decimal-comma": (timestamp("2026-11-27T10:00:00,5Z"), ("timestamp", "decimal sign")),
    "time-week-date": (timestamp("2026-W48-5T10:00:00Z"), ("timestamp", "week dates")),
    "time-ordinal-date": (timestamp("2026-331T10:00:00Z"), ("timestamp", "ordinal dates")),
    "time-basic-format": (timestamp("20261127T100000Z"), ("timestamp", "basic format")),
    "time-basic-time": (timestamp("2026-11-27T100000Z"), ("timestamp", "basic format")),
    "time-24-00": (timestamp("2026-11-27T24:00:00Z"), ("timestamp", "hour must be in 0..23")),
    "time-minute-60": (timestamp("2026-11-27T10:60:00Z"), ("timestamp", "minute must be in 0..59")),
    "time-leap-second": (timestamp("2016-12-31T23:59:60Z"), ("timestamp", "leap second")),
    "time-offset-24h": (timestamp("2026-11-27T10:00:00+24:00"), ("timestamp", "offset +24:00")),
    "time-offset-60min": (timestamp("2026-11-27T10:00:00-05:60"), ("timestamp", "offset -05:60")),
    "time-z-and-offset": (timestamp("2026-11-27T10:00:00Z+01:00"), ("timestamp", '"Z+01:00" follows the time')),
    "time-offset-basic": (timestamp("2026-11-27T10:00:00+0100"), ("timestamp", '"+0100" follows the time')),
    "time-offset-hours-only": (timestamp("2026-11-27T10:00:00+01"), ("timestamp", '"+01" follows the time')),
    "time-zone-name": (timestamp("2026-11-27T10:00:00 UTC"), ("timestamp", '" UTC" follows the time')),
    "time-trailing-newline": (timestamp("2026-11-27T10:00:00Z\n"), ("timestamp", "follows the time")),
    "time-empty-fraction": (timestamp("2026-11-27T10:00:00.Z"), ("timestamp", '".Z" follows the time')),
    "time-other-separator": (timestamp("2026-11-27_10:00:00Z"), ("timestamp", "follows the date")),
    "time-arabic-indic-digits": (timestamp("\u0662\u0660\u0662\u0666-11-27T10:00:00Z"), ("timestamp", "not ASCII")),
    "time-fullwidth-digit": (timestamp("2026-11-27T\uff11\uff10:00:00Z"), ("timestamp", "not ASCII")),
    "time-date-alone": (timestamp("2026-11-27"), ("timestamp", "a time is required")),
    "time-no-seconds": (timestamp("2026-11-27T10:00Z"), ("timestamp", "seconds are required")),
    "time-five-digit-year": (timestamp("10000-01-01T00:00:00Z"), ("timestamp", "four digits")),
    "time-signed-year": (timestamp("+2026-11-27T10:00:00Z"), ("timestamp", "four digits")),
    "time-month-13": (timestamp("2026-13-01T00:00:00Z"), ("timestamp", "month must be in 1..12")),
    "time-february-29": (timestamp("2026-02-29T00:00:00Z"), ("timestamp", "day is out of range")),
    "time-before-year-1-in-utc": (timestamp("0001-01-01T00:00:00+00:01"), ("timestamp", "outside years")),
    "time-rfc-2822": (timestamp("Fri, 27 Nov 2026 10:00:00 GMT"), ("timestamp", "not of the form")),
    "time-epoch-seconds-string": (timestamp("1795773600"), ("timestamp", "not of the form")),
}


@pytest.mark.parametrize("name", BAD_MESSAGES)
def test_to_document_rejects(name):
    raw, reason = BAD_MESSAGES[name]
    with pytest.raises(InvalidMessage, match=None) as error:
        to_document(raw, received_at=NOW)
    assert holds(str(error.value), reason)
    assert error.value.kind in INVALID_KINDS
    assert len(str(error.value)) < 300
    str(error.value).encode("ascii")  # it goes into an AMQP header as it is


def holds(reason, words):
    return all(word in reason for word in ((words,) if isinstance(words, str) else words))


@pytest.mark.parametrize("raw, expected", [
    (body(status=0), {"status": 0, "timestamp": NOW}),
    (body(status=6, timestamp="2026-11-27T11:00:00+01:00", device_id="s-1", message_id="m"),
     {"status": 6, "timestamp": NOW, "device_id": "s-1", "_id": "m"}),
    (body(status=3, timestamp="2026-11-27T09:59:59.5"), {"status": 3, "timestamp": NOW - timedelta(seconds=0.5)}),
    (body(status=3, timestamp="2026-11-27T10:04:59Z"), {"status": 3, "timestamp": NOW + timedelta(seconds=299)}),
    (body(status=3, unknown_field="ignored"), {"status": 3, "timestamp": NOW}),
    # RFC 3339's variants: lower-case t and z, a space, -00:00, any offset within 23:59
    (timestamp("2026-11-27t09:59:59z"), {"status": 1, "timestamp": NOW - timedelta(seconds=1)}),
    (timestamp("2026-11-27 10:00:00"), {"status": 1, "timestamp": NOW}),
    (timestamp("2026-11-27T10:00:00-00:00"), {"status": 1, "timestamp": NOW}),
    (timestamp("2026-11-27T15:29:00+05:29"), {"status": 1, "timestamp": NOW}),
    (timestamp("2026-11-26T10:01:00-23:59"), {"status": 1, "timestamp": NOW}),
    # digits finer than a millisecond are dropped, as BSON stores them, however many there are
    (timestamp("2026-11-27T09:59:59.9999999Z"), {"status": 1, "timestamp": NOW - timedelta(milliseconds=1)}),
    (timestamp("2026-11-27T09:59:59.123999999999Z"), {"status": 1, "timestamp": NOW - timedelta(milliseconds=877)}),
    (timestamp("2026-11-27T09:59:59.1Z"), {"status": 1, "timestamp": NOW - timedelta(milliseconds=900)}),
    # a surrogate pair is one character; an escaped backslash before "u" is no escape at all
    (b'{"status": 1, "note": "\\ud83d\\ude00"}', {"status": 1, "timestamp": NOW}),
    (b'{"status": 1, "note": "\\\\ud800"}', {"status": 1, "timestamp": NOW}),
    (b'{"status": 1, "extra": {"a": {"b": [{"a": 1}]}, "b": 2}}', {"status": 1, "timestamp": NOW}),
])
def test_to_document_accepts(raw, expected):
    document = to_document(raw, received_at=NOW)
    assert document == dict(expected, received_at=NOW)


# The kind each is counted under (server.py's dead-letter metric): every kind, and the cases nearest another.
KINDS = {"too-large": "too_large", "not-json": "invalid_json", "empty-body": "invalid_json", "invalid-utf8": "invalid_json",
         "byte-order-mark": "invalid_json", "array": "invalid_json", "nan": "invalid_json",
         "duplicate-status": "invalid_json", "surrogate-device-id": "invalid_json", "dollar-key": "invalid_key",
         "nested-nul-key": "invalid_key", "status-missing": "invalid_status", "status-true": "invalid_status",
         "timestamp-number": "invalid_timestamp", "timestamp-unparsable": "invalid_timestamp",
         "time-leap-second": "invalid_timestamp", "timestamp-future": "future_timestamp",
         "message-id-number": "invalid_message_id", "device-id-too-long": "invalid_device_id"}


# Rules that only the AMQP properties or the topic can break: (to_document's arguments, kind).
KINDS_BEYOND_THE_BODY = {
    "topic-device-id": (dict(body=body(status=1), topic_device_id="a+b"), "invalid_device_id"),
    "device-mismatch": (dict(body=body(status=1, device_id="sensor-7"), topic_device_id="sensor-8"), "device_mismatch"),
    "amqp-timestamp": (dict(body=body(status=1), amqp_timestamp=-1), "invalid_timestamp"),
    "amqp-message-id": (dict(body=body(status=1), message_id="has space"), "invalid_message_id"),
}


def test_each_rejection_names_the_rule_it_breaks():
    cases = {name: (dict(body=BAD_MESSAGES[name][0]), kind) for name, kind in KINDS.items()}
    cases.update(KINDS_BEYOND_THE_BODY)
    found = {}
    for name, (arguments, _) in cases.items():
        with pytest.raises(InvalidMessage) as error:
            to_document(received_at=NOW, **arguments)
        found[name] = error.value.kind
    assert found == {name: kind for name, (_, kind) in cases.items()}
    assert set(found.values()) == set(INVALID_KINDS)


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
             if not holds(reasons.get(f"bad-{name}", ""), words)}
    assert not wrong, f"dead-lettered without the expected reason: {wrong}"
    bodies = {properties.message_id: raw for properties, raw in dead}
    assert bodies["bad-invalid-utf8"] == BAD_MESSAGES["invalid-utf8"][0]  # kept byte for byte
    assert server.poll() is None


# -- every accepted document can be stored -----------------------------------

# Any character, often a surrogate, NUL, '$' or '.'; json.dumps writes surrogates as \\u escapes.
ANY_TEXT = st.lists(st.one_of(st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from("\x00$.a"),
                              st.characters(exclude_categories=())), max_size=8).map("".join)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | ANY_TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=500, deadline=None)
@given(device_id=ANY_TEXT | st.text(min_size=1), message_id=ANY_TEXT | st.text(min_size=1),
       extra=st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=3))
def test_every_document_to_document_accepts_is_encodable_as_bson(device_id, message_id, extra):
    raw = json.dumps(dict(extra, status=1, device_id=device_id, message_id=message_id)).encode()
    try:
        document = to_document(raw, received_at=NOW)
    except InvalidMessage as error:
        str(error).encode("ascii")
        return
    assert len(bson.encode(document)) < 1024


def test_the_writer_refuses_unencodable_documents_alone_and_stores_the_rest(mongo):
    """A document that slipped past validation must not take its batch down (the writer's last line of defence)."""
    database = mongo[f"test_writer_{uuid.uuid4().hex[:10]}"]
    try:
        def document(identity, **fields):
            return dict({"_id": identity, "status": 1, "timestamp": NOW, "received_at": NOW}, **fields)

        documents = [document("A"), document("P", device_id="\ud800"), document("K", extra={"a\x00": 1}),
                     document("O", extra=2**64), document("S", extra={"\udfff": 1}), document("B"),
                     {"status": 2, "timestamp": NOW, "received_at": NOW}]
        failures, duplicates = BatchWriter(database["status"]).write(documents)
        assert sorted(failures) == [1, 2, 3, 4] and duplicates == 0
        for index, words in ((1, "UnicodeEncodeError"), (2, "NULL"), (3, "8-byte ints"), (4, "UnicodeEncodeError")):
            assert "cannot be stored" in failures[index] and words in failures[index]
            failures[index].encode("ascii")
        assert {d["_id"] for d in database["status"].find({}, {"_id": 1}) if isinstance(d["_id"], str)} == {"A", "B"}
        assert database["status"].count_documents({}) == 3
        # Written again, as after a redelivery: the stored ones are duplicates, the others refused again.
        failures, duplicates = BatchWriter(database["status"]).write(documents)
        assert sorted(failures) == [1, 2, 3, 4] and duplicates == 3
        assert database["status"].count_documents({}) == 3
    finally:
        mongo.drop_database(database.name)


UNENCODABLE = {  # where the lone surrogate sits: name -> body
    "device-id": b'{"status": 2, "message_id": "P", "device_id": "\\ud800"}',
    "message-id": b'{"status": 2, "message_id": "\\udc00"}',
    "ignored-field": b'{"status": 2, "note": "x\\ud8ffy"}',
    "key": b'{"status": 2, "\\ud800": "x"}',
    "nested": b'{"status": 2, "extra": [{"deep": ["\\uDBFF"]}]}',
    "topic-and-body": b'{"status": 2, "device_id": "\\ud83d"}',
}


def test_unencodable_messages_are_dead_lettered_alone_and_the_server_lives_on(pipeline):
    server = pipeline.start_server()
    pipeline.publish({"status": 1, "message_id": "A"})
    for name, raw in UNENCODABLE.items():
        pipeline.publish(raw, pika.BasicProperties(delivery_mode=2, headers={"case": name}))
    pipeline.publish({"status": 3, "message_id": "B"})

    pipeline.wait_stored(2)
    assert sorted(d["_id"] for d in pipeline.collection.find()) == ["A", "B"]
    dead = pipeline.dead_letters(len(UNENCODABLE))
    reasons = {properties.headers["case"]: properties.headers.get("x-rejected-reason", "") for properties, _ in dead}
    assert sorted(reasons) == sorted(UNENCODABLE)
    assert all("lone surrogate" in reason for reason in reasons.values()), reasons
    assert '"device_id"' in reasons["device-id"] and '"message_id"' in reasons["message-id"]
    assert '"note"' in reasons["ignored-field"] and 'key "\\ud800"' in reasons["key"] and '"deep"' in reasons["nested"]
    assert server.poll() is None
    assert "Traceback" not in pipeline.log(server)


# -- one time grammar ------------------------------------------------------------

OFFSETS = st.one_of(st.sampled_from(["", "Z", "z", "+00:00", "-00:00"]),
                    st.tuples(st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)).map(
                        lambda o: f"{o[0]}{o[1]:02}:{o[2]:02}"))


@settings(max_examples=1000, deadline=None)
@given(moment=st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)), separator=st.sampled_from("Tt "),
       fraction=st.text("0123456789", max_size=15), offset=OFFSETS)
def test_parse_time_floors_or_rounds_up_every_fraction_exactly(moment, separator, fraction, offset):
    text = f"{moment.year:04}-{moment:%m-%d}{separator}{moment:%H:%M:%S}" + (f".{fraction}" if fraction else "") + offset
    shift = timedelta(0) if offset in ("", "Z", "z") else (1 if offset[0] == "-" else -1) * timedelta(
        hours=int(offset[1:3]), minutes=int(offset[4:6]))
    floor = moment.replace(microsecond=0, tzinfo=timezone.utc) + shift + timedelta(
        milliseconds=int(fraction[:3].ljust(3, "0")))
    ceiling = floor + timedelta(milliseconds=1 if fraction[3:].strip("0") else 0)
    assert parse_time(text) == floor and parse_time(text).tzinfo is timezone.utc
    assert parse_time(text, round_up=True) == ceiling


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(st.text(max_size=40), st.text("0123456789-:.,+TtZzW ", max_size=40)))
def test_parse_time_refuses_with_a_reason_or_returns_utc_milliseconds(text):
    try:
        moment = parse_time(text)
    except ValueError as error:
        assert str(error)
        return
    assert moment.tzinfo is timezone.utc and moment.microsecond % 1000 == 0
