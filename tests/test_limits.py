"""One rule for identifiers, in bytes, everywhere: the MQTT topic, the routing key, the body and
the stored document. The broker refuses at publish what breaks it (topic permissions of
rabbitmq/definitions.json), and a message the broker cannot deliver stalls nothing behind it."""

import json
import time
import uuid

import pytest

import mqtt_raw
from conftest import MQTT_OPEN_USERNAME, MQTT_USERNAME, wait_until
from messages import InvalidMessage, to_document
from test_mqtt import mosquitto_pub

LONG_TOPIC = "devices/" + "é" * 124 + "/status"  # 263 bytes: more than an AMQP routing key can hold

GOOD_DEVICE_IDS = ["a", "sensor-7", "SENSOR_7", "aa:bb:cc:dd:ee:ff", "0", "d" * 128]
BAD_DEVICE_IDS = ["", "d" * 129, "é" * 64, "sensor.7", "a/b", "a b", "a#", "a+", "a*", "tab\t", "nul\x00", "\u2028",
                  "sensor-7\n"]
GOOD_MESSAGE_IDS = ["m", "5b1f2d3e-0000-4000-8000-000000000001", "~!#$%&'()*+,-./:;<=>?@[]^_`{|}", "m" * 128]
BAD_MESSAGE_IDS = ["", "m" * 129, "a b", "é", "tab\t", "line\n", "\x7f", "\u00a0"]


@pytest.mark.parametrize("device_id", GOOD_DEVICE_IDS)
def test_a_device_id_within_the_rule_is_stored_from_the_body_and_the_topic(device_id):
    body = json.dumps({"status": 1, "device_id": device_id}).encode()
    assert to_document(body)["device_id"] == device_id
    assert to_document(body, topic_device_id=device_id)["device_id"] == device_id
    assert len(f"devices.{device_id}.status".encode()) <= 255


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS)
def test_a_device_id_outside_the_rule_is_refused_from_the_body_and_the_topic(device_id):
    with pytest.raises(InvalidMessage, match=r"^device_id must be 1\.\.128 ASCII letters"):
        to_document(json.dumps({"status": 1, "device_id": device_id}).encode())
    with pytest.raises(InvalidMessage, match=r"^topic device id must be 1\.\.128 ASCII letters"):
        to_document(b'{"status": 1}', topic_device_id=device_id)


@pytest.mark.parametrize("message_id", GOOD_MESSAGE_IDS)
def test_a_message_id_within_the_rule_is_the_identity(message_id):
    assert to_document(json.dumps({"status": 1, "message_id": message_id}).encode())["_id"] == message_id
    assert to_document(b'{"status": 1}', message_id=message_id)["_id"] == message_id


@pytest.mark.parametrize("message_id", BAD_MESSAGE_IDS)
def test_a_message_id_outside_the_rule_is_refused_from_the_body_and_the_property(message_id):
    with pytest.raises(InvalidMessage, match=r"^message_id must be 1\.\.128 visible ASCII characters"):
        to_document(json.dumps({"status": 1, "message_id": message_id}).encode())
    with pytest.raises(InvalidMessage, match=r"^message_id must be 1\.\.128 visible ASCII characters"):
        to_document(b'{"status": 1}', message_id=message_id)


def test_the_broker_refuses_at_publish_a_topic_outside_the_rule(mqtt_pipeline):
    """With the topic permissions of rabbitmq/definitions.json: QoS 1 and 2 see the connection
    closed instead of a PUBACK (mosquitto_pub exits 7); QoS 0 is dropped unanswered."""
    pipeline = mqtt_pipeline
    pipeline.start_server()
    refused = [LONG_TOPIC, "devices/sensor.7/status", "devices/a/b/status", "devices//status",
               "devices/" + "d" * 129 + "/status", "devices/dév/status", "devices/a b/status", "status/topic",
               "devices/dev-1/status/"]
    for topic in refused:
        for qos in (1, 2):
            assert mosquitto_pub(topic, '{"status": 1}', qos, check=False) == (7, "Error: The connection was lost."), topic
        assert mosquitto_pub(topic, '{"status": 1}', 0) == (0, "")
    for topic in ("devices/+/status", "devices/#", "+"):
        assert mqtt_raw.publish(topic, b'{"status": 1}', MQTT_USERNAME) == "closed", topic
    mosquitto_pub("devices/" + "d" * 128 + "/status", '{"status": 2}')
    mosquitto_pub("devices/aa:bb:cc_dd-ee/status", '{"status": 3}')
    pipeline.wait_stored(2)
    time.sleep(1)  # nothing else may arrive: give a stray message the time a valid one took
    assert pipeline.stored_count() == 2 and pipeline.dead_letters(0) == []


@pytest.mark.parametrize("topic", [LONG_TOPIC, "x/" + "é" * 127])  # bound to the queue, and unroutable
def test_a_message_the_broker_cannot_deliver_does_not_stall_the_others(mqtt_open_pipeline, topic):
    """Without topic permissions the broker takes a topic longer than a routing key may be, then
    closes the consumer's connection (541) each time it tries to deliver it. server.py takes one
    message at a time until the broker dead-letters it (x-delivery-limit)."""
    pipeline = mqtt_open_pipeline
    assert pipeline.stop(pipeline.start_server()) == 0  # the topology, then a backlog behind the message
    run = uuid.uuid4().hex[:8]
    for index in range(30):
        if index == 10:
            assert mqtt_raw.publish(topic, b'{"status": 6, "message_id": "too-long"}', MQTT_OPEN_USERNAME) == "puback"
        body = json.dumps({"status": 1, "message_id": f"{run}-{index}"}).encode()
        assert mqtt_raw.publish("devices/dev-1/status", body, MQTT_OPEN_USERNAME) == "puback"
    started = time.monotonic()
    server = pipeline.start_server()
    pipeline.wait_stored(30, timeout=120)
    assert time.monotonic() - started < 60
    [(properties, body)] = pipeline.dead_letters(1, timeout=120)  # basic_get: the dead letter can be read
    assert body == b'{"status": 6, "message_id": "too-long"}'
    assert properties.headers["x-first-death-reason"] == "delivery_limit"
    assert properties.headers["x-death"][0]["routing-keys"] == [topic.replace("/", ".")]
    log = pipeline.log(server)
    assert log.count("it cannot deliver a message of") == 1
    wait_until(lambda: "consuming with the whole window again" in pipeline.log(server), 60,
               "server.py to consume with the whole window again")


def test_what_a_device_gets_for_each_qos(mqtt_pipeline):
    """RabbitMQ 3.10 takes QoS 2 as QoS 1: it answers PUBACK, which mosquitto_pub reads as a
    protocol error (exit 2), although the message is stored."""
    pipeline = mqtt_pipeline
    pipeline.start_server()
    assert mosquitto_pub("devices/dev-1/status", '{"status": 0, "message_id": "qos0"}', 0) == (0, "")
    assert mosquitto_pub("devices/dev-1/status", '{"status": 1, "message_id": "qos1"}', 1) == (0, "")
    assert mosquitto_pub("devices/dev-1/status", '{"status": 2, "message_id": "qos2"}', 2, check=False) == (
        2, "Error: A network protocol error occurred when communicating with the broker.")
    pipeline.wait_stored(3)
    assert sorted(d["_id"] for d in pipeline.collection.find()) == ["qos0", "qos1", "qos2"]
