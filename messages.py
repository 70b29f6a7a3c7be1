"""The status message contract: what a publisher may send and what is stored.

server.py turns every delivery into a stored document with `to_document`, or
rejects it with `InvalidMessage` whose text is the reason that goes into the
dead-letter header, and whose `kind` is the rule it breaks, for the metrics. The contract is documented in README.md ("Message format").
"""

import json
import math
import re
from datetime import datetime, timedelta, timezone

MAX_BODY_BYTES = 64 * 1024
MAX_ID_LENGTH = 128
# Identifiers are ASCII, so characters are bytes. A device id travels in the routing key
# devices.<id>.status, an AMQP short string of at most 255 bytes, and in the MQTT topic
# devices/<id>/status: no '.', '/', '#', '+' or '*' (topic separators and wildcards).
DEVICE_ID = re.compile(r"[A-Za-z0-9_:-]{1,%d}" % MAX_ID_LENGTH)
DEVICE_ID_RULE = f"1..{MAX_ID_LENGTH} ASCII letters, digits, '-', '_' or ':'"
MESSAGE_ID = re.compile(r"[!-~]{1,%d}" % MAX_ID_LENGTH)
MESSAGE_ID_RULE = f"1..{MAX_ID_LENGTH} visible ASCII characters (no spaces)"
MAX_CLOCK_SKEW = timedelta(minutes=5)
STATUSES = range(0, 7)
_FIELDS = frozenset({"status", "timestamp", "device_id", "message_id"})
# The rules a message can break, a small fixed set (a metric label; the reason holds the detail).
INVALID_KINDS = ("too_large", "invalid_json", "invalid_key", "invalid_status", "invalid_timestamp", "future_timestamp",
                 "invalid_message_id", "invalid_device_id", "device_mismatch")


class InvalidMessage(ValueError):
    """A message that can never be stored, whatever is retried. str() is the reason, for
    people; `kind`, one of INVALID_KINDS, the rule it breaks."""

    def __init__(self, reason, kind):
        super().__init__(reason)
        self.kind = kind


# RFC 3339 section 5.6 date-time; see README.md ("Message format") for what is accepted and why.
_DATE_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
                        r"(?:[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})?)?")
# The forms clients send (client.py: milliseconds and +00:00), every field in range: datetime.fromisoformat
# builds them at C speed and exactly, since there is nothing finer than a millisecond to floor or round.
_COMMON = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,3})?"
                     r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?")
_ONE_SECOND = timedelta(seconds=1)
# Forms that look like ISO 8601 but are not this grammar, with the reason they are refused (matched at the start).
_LOOKALIKES = [(re.compile(pattern), reason) for pattern, reason in [
    (r"[0-9]{4}-?[Ww]", "week dates are not accepted"),
    (r"[0-9]{4}-?[0-9]{3}(?![0-9-])", "ordinal dates are not accepted"),
    (r"[0-9]{8}(?:[Tt ]|$)", "the basic format without '-' is not accepted"),
    (r"[+-]|[0-9]{5,}-", "the year must have exactly four digits"),
    (r"[0-9]{4}-[0-9]{2}(?![0-9-])", "a month alone is not accepted"),
    (r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}(?::[0-9]{2})?[.,][0-9]", "a fraction of an hour or a minute is not accepted"),
    (r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2},", "the decimal sign must be '.', not ','"),
    (r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}(?::[0-9]{2})?(?![0-9:])", "seconds are required (HH:MM:SS)"),
    (r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{4}", "the basic format without ':' is not accepted"),
]]
_UP_TO_THE_OFFSET = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?)?")
GRAMMAR = "YYYY-MM-DDTHH:MM:SS[.fraction][Z|+HH:MM|-HH:MM]"


def parse_time(text, round_up=False, date_alone=False):
    """RFC 3339 date-time text to an aware UTC datetime with millisecond precision.

    The grammar is RFC 3339's date-time (section 5.6) with ASCII digits, 'T', 't' or a space
    between date and time, and an optional offset: Z, z or +HH:MM / -HH:MM up to 23:59, none
    meaning UTC. `date_alone` also accepts YYYY-MM-DD, meaning its midnight UTC. The fraction
    may have any number of digits: those finer than a millisecond are dropped (the time is
    floored, as a stored BSON datetime is), or with `round_up` any nonzero ones round up to
    the next millisecond (an API bound: then start <= t < end holds for the stored t).
    Raises ValueError saying why the text is refused: a form that only looks like ISO 8601
    (week or ordinal dates, basic format, fractions of an hour or minute, a decimal comma,
    24:00, the leap second 23:59:60, anything after the offset) or a time outside years
    0001..9999 once in UTC.
    """
    if _COMMON.fullmatch(text) is not None:
        try:
            moment = datetime.fromisoformat(text)
            return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            pass  # a day the month does not have, or beyond year 9999 in UTC: the full parser says which
    return _parse_rfc3339(text, round_up, date_alone)


def _parse_rfc3339(text, round_up, date_alone):
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        raise ValueError(_why_not_a_date_time(text))
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if hour is None:
        if not date_alone:
            raise ValueError(f"a time is required after the date: {GRAMMAR}")
        hour = minute = second = "00"
    if second == "60":
        raise ValueError("second 60 (a leap second) is not accepted")
    millisecond = 0
    if fraction:
        millisecond = int(fraction[:3].ljust(3, "0"))
        if round_up and fraction[3:].strip("0"):
            millisecond += 1
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                          millisecond % 1000 * 1000, timezone.utc)
        if millisecond == 1000:
            moment += _ONE_SECOND
        if offset and offset not in "Zz":
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError(f"the offset {offset} is not within -23:59..+23:59")
            shift = timedelta(hours=hours, minutes=minutes)
            moment = moment - shift if offset[0] == "+" else moment + shift
    except OverflowError:
        raise ValueError("it is outside years 0001..9999 in UTC") from None
    return moment


def _why_not_a_date_time(text):
    if not text:
        return "it is empty"
    if not text.isascii():
        return "it holds characters that are not ASCII"
    for pattern, reason in _LOOKALIKES:
        if pattern.match(text):
            return reason
    known = _UP_TO_THE_OFFSET.match(text)
    if known and known.end() > 10:
        return f"{_show(text[known.end():])} follows the time, where only Z, +HH:MM or -HH:MM may"
    if known:
        return f"{_show(text[known.end():])} follows the date, where only 'T' and HH:MM:SS may"
    return f"it is not of the form {GRAMMAR}"


def routing_key_device_id(routing_key):
    """The <id> of a routing key devices.<id>.status (MQTT topic devices/<id>/status), or None
    for any other key. The id is returned as it is, valid or not: to_document checks it."""
    parts = routing_key.split(".")
    if len(parts) == 3 and parts[0] == "devices" and parts[2] == "status":
        return parts[1]
    return None


def to_document(body, message_id=None, amqp_timestamp=None, topic_device_id=None, received_at=None):
    """Validate one message body and return the document to store.

    `message_id` and `amqp_timestamp` are the AMQP properties (or None);
    `topic_device_id` is the device named by a `devices.<id>.status` routing key.
    """
    received_at = received_at or datetime.now(timezone.utc)
    fields = _decode(body)

    status = fields.get("status")
    if "status" not in fields:
        raise InvalidMessage("status is missing", "invalid_status")
    if type(status) is not int or status not in STATUSES:
        raise InvalidMessage(f"status must be an integer 0..6, got {_show(status)}", "invalid_status")

    document = {"status": status}
    if "message_id" in fields:
        _identifier("message_id", fields["message_id"])
    identity = message_id if message_id is not None else fields.get("message_id")
    if identity is not None:
        document["_id"] = _identifier("message_id", identity)
    document["timestamp"] = _timestamp(fields, amqp_timestamp, received_at)
    document["received_at"] = received_at

    device_id = fields.get("device_id")
    if "device_id" in fields:
        device_id = _identifier("device_id", device_id)
    if topic_device_id is not None:
        if device_id is not None and device_id != topic_device_id:
            raise InvalidMessage(f"device_id {_show(device_id)} does not match the topic's device {_show(topic_device_id)}",
                                 "device_mismatch")
        device_id = _identifier("topic device id", topic_device_id)
    if device_id is not None:
        document["device_id"] = device_id
    return document


def _decode(body):
    if not body:
        raise InvalidMessage("body is empty", "invalid_json")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body is {len(body)} bytes, more than {MAX_BODY_BYTES}", "too_large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidMessage(f"body is not valid UTF-8 ({error.reason} at byte {error.start})", "invalid_json") from None
    if text.startswith("\ufeff"):  # json.loads would say so; the decoder it wraps does not
        raise InvalidMessage("body is not JSON (it starts with a UTF-8 byte order mark)", "invalid_json")
    try:
        fields = _JSON.decode(text)
    except InvalidMessage:
        raise
    except (ValueError, RecursionError) as error:
        raise InvalidMessage(f"body is not JSON ({str(error)[:120]})", "invalid_json") from None
    if not isinstance(fields, dict):
        raise InvalidMessage(f"body must be a JSON object, got {_json_type(fields)}", "invalid_json")
    # A lone surrogate can only come from a \\u escape: the UTF-8 decoder refuses encoded ones.
    if "\\u" in text:
        where = _lone_surrogate(fields)
        if where:
            raise InvalidMessage(f"{where} holds a lone surrogate (a \\uD800..\\uDFFF escape without its pair), "
                                 "which is not Unicode text and cannot be stored", "invalid_json")
    return fields


def _checked_object(pairs):
    """The decoder calls this for every JSON object it builds, at any depth. A key given twice
    makes the message invalid (RFC 8259 section 4: names SHOULD be unique; a validator that
    sees only the last one could be bypassed), and so do keys that MongoDB would read as
    operators or paths."""
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidMessage(f"key {_show(key)} is given twice", "invalid_json")
            seen.add(key)
    if not _FIELDS.issuperset(fields):  # the usual keys need no closer look
        for key in fields:
            if key.startswith("$") or "." in key or "\x00" in key:
                raise InvalidMessage(f"key {_show(key)} may not start with '$' or hold '.' or NUL", "invalid_key")
    return fields


def _lone_surrogate(fields):
    """Where a string of the decoded body, key or value at any depth, holds a lone surrogate
    (RFC 8259 section 8.2), which neither UTF-8 nor BSON can encode; None if none does."""
    pending = [(None, fields)]  # a loop, not recursion: the body may be nested as deep as the decoder allows
    while pending:
        key, value = pending.pop()
        if type(value) is str:
            if _SURROGATE.search(value):
                return f"the value of key {_show(key)}"
        elif type(value) is dict:
            for inner_key, inner_value in value.items():
                if _SURROGATE.search(inner_key):
                    return f"key {_show(inner_key)}"
                pending.append((inner_key, inner_value))
        elif type(value) is list:
            pending.extend((key, item) for item in value)
    return None


def _no_constant(name):
    raise InvalidMessage(f"body is not JSON ({name} is not a JSON number)", "invalid_json")


# One decoder for every message: json.loads(text, **options) would build one per call.
_JSON = json.JSONDecoder(object_pairs_hook=_checked_object, parse_constant=_no_constant)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _identifier(name, value):
    """A message_id, or a device_id from the body or the topic: the same rule everywhere."""
    pattern, rule = (MESSAGE_ID, MESSAGE_ID_RULE) if name == "message_id" else (DEVICE_ID, DEVICE_ID_RULE)
    if type(value) is not str or not pattern.fullmatch(value):
        raise InvalidMessage(f"{name} must be {rule}, got {_show(value)}",
                             "invalid_message_id" if name == "message_id" else "invalid_device_id")
    return value


def _timestamp(fields, amqp_timestamp, received_at):
    if "timestamp" in fields:
        text = fields["timestamp"]
        if type(text) is not str:
            raise InvalidMessage(f"timestamp must be an RFC 3339 date and time string, got {_show(text)}",
                                 "invalid_timestamp")
        try:
            moment = parse_time(text)
        except ValueError as error:
            raise InvalidMessage(f"timestamp {_show(text)} is not an RFC 3339 date and time: {error}",
                                 "invalid_timestamp") from None
    elif amqp_timestamp is not None:
        if type(amqp_timestamp) is not int or not 0 <= amqp_timestamp < 253402300800:
            raise InvalidMessage(f"AMQP timestamp property {_show(amqp_timestamp)} is not a time", "invalid_timestamp")
        moment = datetime.fromtimestamp(amqp_timestamp, timezone.utc)
    else:
        return received_at
    if moment - received_at > MAX_CLOCK_SKEW:
        raise InvalidMessage(f"timestamp {moment.isoformat()} is more than 5 minutes in the future", "future_timestamp")
    return moment


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}[type(value)]


def _show(value):
    """A value for a log line or header: short, and never the whole body."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        text = json.dumps(value)
    except TypeError:  # AMQP properties that are not UTF-8 reach here as bytes
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
