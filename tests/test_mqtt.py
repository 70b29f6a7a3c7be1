"""Devices publishing over MQTT through RabbitMQ's MQTT plugin, into the same pipeline."""

import json
import subprocess
import uuid

import pytest

from conftest import MOSQUITTO_SERVER, MQTT_OPEN_USERNAME, MQTT_PASSWORD, MQTT_USERNAME


def mosquitto_pub(topic, message, qos=1, username=MQTT_USERNAME, check=True, password=MQTT_PASSWORD):
    """An MQTT client that this project did not write: Debian's mosquitto_pub. Returns its exit
    status and what it wrote on stderr."""
    result = subprocess.run(["mosquitto_pub", *MOSQUITTO_SERVER, "-u", username, "-P", password,
                             "-q", str(qos), "-t", topic, "-m", message], check=check, timeout=30,
                            capture_output=True, text=True)
    return result.returncode, result.stderr.strip()


def test_client_over_mqtt_counts_exactly(mqtt_pipeline, app_for):
    pipeline = mqtt_pipeline
    pipeline.start_server()
    device = f"sensor-{uuid.uuid4().hex[:6]}"
    client = pipeline.run_client("--transport", "mqtt", "--device-id", device, "--count", 400, "--interval", 0)
    assert client.returncode == 0, pipeline.log(client)
    assert len(pipeline.confirmed_ids(client)) == 400
    pipeline.wait_stored(400)
    assert pipeline.collection.count_documents({"device_id": device}) == 400
    answer = app_for(pipeline).test_client().get("/status-count?start=2000-01-01&end=2100-01-01").get_json()
    assert answer["counts"] == pipeline.confirmed_counts(client) and answer["total"] == 400


@pytest.mark.parametrize("qos", [0, 1])
def test_mosquitto_pub_on_both_topic_forms_counts_exactly(mqtt_pipeline, app_for, qos):
    pipeline = mqtt_pipeline
    pipeline.start_server()
    device = f"dev-{uuid.uuid4().hex[:6]}"
    for index in range(5):
        mosquitto_pub(pipeline.routing_key, json.dumps({"status": 3, "message_id": f"classic-{index}"}), qos)
        mosquitto_pub(f"devices/{device}/status", json.dumps({"status": 5, "message_id": f"device-{index}"}), qos)
    mosquitto_pub(f"devices/{device}/status", json.dumps({"status": 6, "device_id": device}), qos)
    pipeline.wait_stored(11)
    assert pipeline.collection.count_documents({"device_id": device}) == 6
    answer = app_for(pipeline).test_client().get("/status-count?start=2000-01-01&end=2100-01-01").get_json()
    assert answer["counts"] == {"0": 0, "1": 0, "2": 0, "3": 5, "4": 0, "5": 5, "6": 1}


def test_amqp_and_mqtt_publishers_at_once_into_one_server(mqtt_pipeline):
    pipeline = mqtt_pipeline
    pipeline.start_server()
    amqp = pipeline.start("client.py", "--count", 3000, "--interval", 0)
    mqtt = pipeline.start("client.py", "--transport", "mqtt", "--count", 3000, "--interval", 0)
    assert amqp.wait(120) == 0 and mqtt.wait(120) == 0
    confirmed = pipeline.confirmed_ids(amqp) + pipeline.confirmed_ids(mqtt)
    assert len(set(confirmed)) == 6000
    pipeline.wait_stored(6000)


def test_bad_device_topics_are_dead_lettered_with_their_reason(mqtt_open_pipeline):
    """As a device whose user has no topic permissions (the broker takes every topic)."""
    pipeline = mqtt_open_pipeline
    pipeline.start_server()
    for index, device in enumerate(["d" * 129, "", "dev 1", "dév", "dev*1"]):
        mosquitto_pub(f"devices/{device}/status", json.dumps({"status": 1, "message_id": f"bad-{index}"}),
                      username=MQTT_OPEN_USERNAME)
    mosquitto_pub("devices/dev-a/status", json.dumps({"status": 1, "device_id": "dev-b", "message_id": "mismatch"}),
                  username=MQTT_OPEN_USERNAME)
    mosquitto_pub("devices/dev-a/status", json.dumps({"status": 2, "message_id": "good"}), username=MQTT_OPEN_USERNAME)
    mosquitto_pub("devices/" + "d" * 128 + "/status", json.dumps({"status": 2}), username=MQTT_OPEN_USERNAME)
    pipeline.wait_stored(2)
    reasons = sorted(properties.headers["x-rejected-reason"] for properties, _ in pipeline.dead_letters(6))
    assert "does not match the topic" in reasons[0]
    assert all("topic device id must be 1..128 ASCII letters, digits, '-', '_' or ':'" in r for r in reasons[1:])
