"""The status message contract: what a publisher may send and what is stored.

server.py turns every delivery into a stored document with `to_document`, or
rejects it with `InvalidMessage` whose text is the reason that goes into the
dead-letter header. The contract is documented in README.md ("Message format").
"""

import json
import math
import re
from datetime import datetime, timedelta, timezone

from dateutil.parser import isoparse

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


class InvalidMessage(ValueError):
    """A message that can never be stored, whatever is retried."""


def parse_time(text):
    """ISO 8601 text to an aware UTC datetime; no offset means UTC."""
    try:
        moment = datetime.fromisoformat(text)  # C speed for the common forms
    except ValueError:
        moment = isoparse(text)  # every other ISO 8601 form
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


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
        raise InvalidMessage("status is missing")
    if type(status) is not int or status not in STATUSES:
        raise InvalidMessage(f"status must be an integer 0..6, got {_show(status)}")

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
            raise InvalidMessage(f"device_id {_show(device_id)} does not match the topic's device {_show(topic_device_id)}")
        device_id = _identifier("topic device id", topic_device_id)
    if device_id is not None:
        document["device_id"] = device_id
    return document


def _decode(body):
    if not body:
        raise InvalidMessage("body is empty")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body is {len(body)} bytes, more than {MAX_BODY_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidMessage(f"body is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if text.startswith("\ufeff"):  # json.loads would say so; the decoder it wraps does not
        raise InvalidMessage("body is not JSON (it starts with a UTF-8 byte order mark)")
    try:
        fields = _JSON.decode(text)
    except InvalidMessage:
        raise
    except (ValueError, RecursionError) as error:
        raise InvalidMessage(f"body is not JSON ({str(error)[:120]})") from None
    if not isinstance(fields, dict):
        raise InvalidMessage(f"body must be a JSON object, got {_json_type(fields)}")
    return fields


def _checked_object(fields):
    """Keys that MongoDB would read as operators or paths make the message invalid, at any
    depth: the decoder calls this for every JSON object it builds."""
    for key in fields:
        if key.startswith("$") or "." in key or "\x00" in key:
            raise InvalidMessage(f"key {_show(key)} may not start with '$' or hold '.' or NUL")
    return fields


def _no_constant(name):
    raise InvalidMessage(f"body is not JSON ({name} is not a JSON number)")


# One decoder for every message: json.loads(text, **options) would build one per call.
_JSON = json.JSONDecoder(object_hook=_checked_object, parse_constant=_no_constant)


def _identifier(name, value):
    """A message_id, or a device_id from the body or the topic: the same rule everywhere."""
    pattern, rule = (MESSAGE_ID, MESSAGE_ID_RULE) if name == "message_id" else (DEVICE_ID, DEVICE_ID_RULE)
    if type(value) is not str or not pattern.fullmatch(value):
        raise InvalidMessage(f"{name} must be {rule}, got {_show(value)}")
    return value


def _timestamp(fields, amqp_timestamp, received_at):
    if "timestamp" in fields:
        text = fields["timestamp"]
        if type(text) is not str:
            raise InvalidMessage(f"timestamp must be an ISO 8601 string, got {_show(text)}")
        try:
            moment = parse_time(text)
        except (ValueError, OverflowError):
            raise InvalidMessage(f"timestamp {_show(text)} is not an ISO 8601 date and time") from None
    elif amqp_timestamp is not None:
        if type(amqp_timestamp) is not int or not 0 <= amqp_timestamp < 253402300800:
            raise InvalidMessage(f"AMQP timestamp property {_show(amqp_timestamp)} is not a time")
        moment = datetime.fromtimestamp(amqp_timestamp, timezone.utc)
    else:
        return received_at
    if moment - received_at > MAX_CLOCK_SKEW:
        raise InvalidMessage(f"timestamp {moment.isoformat()} is more than 5 minutes in the future")
    return moment


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}[type(value)]


def _show(value):
    """A value for a log line or header: short, and never the whole body."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
