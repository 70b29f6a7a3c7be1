"""A minimal MQTT 3.1.1 publisher over a plain socket, for topics that well-behaved clients
refuse to send (wildcards '+' and '#'): RabbitMQ must cope with what a device puts on the wire."""

import socket
import ssl
import struct

import config
from conftest import MQTT_PASSWORD


def _packet(kind, body):
    length, encoded = len(body), bytearray()
    while True:  # the remaining length, 7 bits a byte (MQTT 3.1.1, 2.2.3)
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes([kind]) + bytes(encoded) + body


def _string(data):
    return struct.pack("!H", len(data)) + data


def _connect():
    """The broker's MQTT listener as client.py reaches it: over TLS when config.py has a CA for it."""
    connection = socket.create_connection((config.MQTT_HOST, config.MQTT_PORT), timeout=10)
    if not config.MQTT_TLS_CA:
        return connection
    return ssl.create_default_context(cafile=config.MQTT_TLS_CA).wrap_socket(connection, server_hostname=config.MQTT_HOST)


def publish(topic, payload, username, password=MQTT_PASSWORD, qos=1):
    """Publish once; return "puback" when the broker acknowledged it, "closed" when it closed the
    connection instead, or "sent" for QoS 0 (nothing is answered)."""
    with _connect() as connection:
        connect = b"\x00\x04MQTT\x04\xc2" + struct.pack("!H", 30)  # username, password, clean session
        connection.sendall(_packet(0x10, connect + _string(b"raw-publisher") + _string(username.encode())
                                   + _string(password.encode())))
        if connection.recv(4) != b"\x20\x02\x00\x00":
            raise ConnectionError("the broker refused the MQTT connection")
        topic = topic.encode() if isinstance(topic, str) else topic
        packet_id = struct.pack("!H", 1) if qos else b""
        connection.sendall(_packet(0x30 | qos << 1, _string(topic) + packet_id + payload))
        if qos == 0:
            connection.sendall(b"\xe0\x00")  # DISCONNECT
            return "sent"
        answer = connection.recv(4)
        if answer == b"\x40\x02" + packet_id:
            return "puback"
        if answer == b"":
            return "closed"
        raise ConnectionError(f"unexpected answer {answer!r}")
