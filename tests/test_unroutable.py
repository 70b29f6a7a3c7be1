"""Nothing published to the exchange vanishes: what no binding matches is kept by the exchange's
alternate exchange (a policy, rabbitmq/definitions.json), and server.py moves it to the
dead-letter queue with the reason `unroutable: <routing key>`."""

import json
import re
import subprocess
import uuid

import pika

import mqtt_raw
import config
from conftest import MOSQUITTO_SERVER, MQTT_OPEN_USERNAME, MQTT_PASSWORD, MQTT_USER, MQTT_VHOST

# AMQP typos and near misses of status_topic and devices.<id>.status. Each is at most 255
# bytes, the longest routing key AMQP can carry.
UNROUTABLE_AMQP_KEYS = [
    "status_topik", "Status_topic", "status_topic.", ".status_topic", "status", "status_topic ",
    "devices.dev-1", "devices.dev-1.Status", "devices.dev-1.status.extra", "devices.a.b.status",
    "devices.status", "devices..", "devices.dev-1.status.", ".devices.dev-1.status",
    "", ".", "#", "*", "devices.#", "x" * 255, "é" * 127,
]
# Keys that devices.*.status matches ('*' is any one word, even an empty one or a literal '*'
# or '#'), whose device id breaks the rule: they reach server.py, which says why.
INVALID_DEVICE_KEYS = [
    "devices.sensor/7.status", "devices.dev 1.status", "devices..status", "devices.*.status", "devices.#.status",
    "devices.é.status", "devices.dev+1.status", "devices." + "d" * 129 + ".status",
]
DEVICE_ID_RULE = "topic device id must be 1..128 ASCII letters, digits, '-', '_' or ':', got "

# MQTT topics: extra or empty levels, dots in device ids (RabbitMQ 3.10 turns '/' into '.' and
# leaves '.' as it is), and wildcards, which no publish topic may hold but a device can still send.
UNROUTABLE_MQTT_TOPICS = {
    "devices/sensor.7/status": "devices.sensor.7.status",
    "devices/a/b/status": "devices.a.b.status",
    "devices/dev-1/status/extra": "devices.dev-1.status.extra",
    "devices/dev-1/status/": "devices.dev-1.status.",
    "/devices/dev-1/status": ".devices.dev-1.status",
    "devices/dev-1": "devices.dev-1",
    "Devices/dev-1/status": "Devices.dev-1.status",
    "status/topic": "status.topic",
    "devices/#": "devices.#",
    "#": "#",
    "+": "*",
}


def test_every_unroutable_amqp_key_is_dead_lettered_with_its_reason(pipeline):
    server = pipeline.start_server()
    keys = UNROUTABLE_AMQP_KEYS + INVALID_DEVICE_KEYS
    for index, key in enumerate(keys):
        pipeline.publish({"status": 1, "message_id": f"good-{index}"})
        # A mandatory publish is not returned: the alternate exchange took it.
        pipeline.publish(json.dumps({"status": 2}).encode(), routing_key=key, properties=pika.BasicProperties(
            delivery_mode=2, message_id=f"lost-{index}", content_type="application/json", headers={"origin": key}))
        pipeline.publish({"status": 3, "message_id": f"device-{index}"}, routing_key="devices.dev-1.status")
    pipeline.wait_stored(2 * len(keys))
    dead = pipeline.dead_letters(len(keys))
    assert len(dead) == len(keys)
    for properties, body in dead:
        key = keys[int(properties.message_id.removeprefix("lost-"))]
        if key in UNROUTABLE_AMQP_KEYS:
            assert properties.headers["x-rejected-reason"] == f"unroutable: {key}"
        else:
            assert properties.headers["x-rejected-reason"].startswith(DEVICE_ID_RULE)
        assert properties.headers["x-original-routing-key"] == key
        assert properties.headers["origin"] == key and properties.content_type == "application/json"
        assert json.loads(body) == {"status": 2}
    assert pipeline.stop(server) == 0
    count = len(UNROUTABLE_AMQP_KEYS)
    assert (f"stopped: {2 * len(keys)} stored, {len(keys)} dead-lettered ({count} of them unroutable)"
            in pipeline.log(server))


def test_every_unroutable_mqtt_topic_is_dead_lettered_with_its_reason(mqtt_open_pipeline):
    """As a device whose user has no topic permissions: the broker acknowledges each message
    (QoS 1), so each must be found again."""
    pipeline = mqtt_open_pipeline
    pipeline.start_server()
    run = uuid.uuid4().hex[:8]
    for index, topic in enumerate(UNROUTABLE_MQTT_TOPICS):
        good = json.dumps({"status": 4, "message_id": f"{run}-good-{index}"}).encode()
        assert mqtt_raw.publish("devices/dev-1/status", good, MQTT_OPEN_USERNAME) == "puback"
        lost = json.dumps({"status": 5, "message_id": f"{run}-lost-{index}"}).encode()
        assert mqtt_raw.publish(topic, lost, MQTT_OPEN_USERNAME) == "puback", topic
    pipeline.wait_stored(len(UNROUTABLE_MQTT_TOPICS))
    reasons = {}
    for properties, body in pipeline.dead_letters(len(UNROUTABLE_MQTT_TOPICS)):
        reasons[json.loads(body)["message_id"]] = properties.headers["x-rejected-reason"]
    assert reasons == {f"{run}-lost-{index}": f"unroutable: {key}"
                       for index, key in enumerate(UNROUTABLE_MQTT_TOPICS.values())}


def test_a_dot_in_an_mqtt_device_id_is_dead_lettered_with_its_reason(mqtt_open_pipeline):
    """devices/sensor.7/status arrives as devices.sensor.7.status, which no binding matches."""
    pipeline = mqtt_open_pipeline
    pipeline.start_server()
    subprocess.run(["mosquitto_pub", *MOSQUITTO_SERVER, "-u", MQTT_OPEN_USERNAME, "-P", MQTT_PASSWORD, "-q", "1", "-t", "devices/sensor.7/status",
                    "-m", '{"status":2,"message_id":"d1"}'], check=True, timeout=30)
    [(properties, body)] = pipeline.dead_letters(1)
    assert properties.headers["x-rejected-reason"] == "unroutable: devices.sensor.7.status"
    assert body == b'{"status":2,"message_id":"d1"}'


def test_client_with_a_routing_key_no_binding_matches_is_confirmed_and_dead_lettered(pipeline):
    """Without topic permissions the broker takes the message (the alternate exchange routes it),
    so client.py cannot know: the dead-letter queue says why."""
    pipeline.start_server()
    client = pipeline.start("client.py", "--count", 5, "--interval", 0, env={"ROUTING_KEY": "status_topik"})
    assert client.wait(60) == 0, pipeline.log(client)
    dead = pipeline.dead_letters(5)
    assert sorted(p.message_id for p, _ in dead) == sorted(pipeline.confirmed_ids(client))
    assert {p.headers["x-rejected-reason"] for p, _ in dead} == {"unroutable: status_topik"}
    assert pipeline.stored_count() == 0


def test_client_with_a_routing_key_a_topic_permission_refuses_exits_1(mqtt_pipeline):
    """As a user with the rules of `publisher` in rabbitmq/definitions.json, whose topic permission
    the broker refuses the key by, at publish."""
    pipeline = mqtt_pipeline
    pipeline.start_server()
    publisher = config.local_amqp_url(MQTT_USER, MQTT_PASSWORD, MQTT_VHOST)
    client = pipeline.start("client.py", "--count", 5, "--interval", 0,
                            env={"ROUTING_KEY": "status_topik", "RABBITMQ_URL": publisher})
    assert client.wait(60) == 1, pipeline.log(client)
    log = pipeline.log(client)
    assert re.search(r"RabbitMQ refused to publish to status_exchange with key status_topik: ACCESS_REFUSED", log)
    assert "5 published, 0 confirmed, 5 refused" in log
    assert pipeline.dead_letters(0) == [] and pipeline.stored_count() == 0
