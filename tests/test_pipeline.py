"""client.py -> RabbitMQ -> server.py -> MongoDB -> api.py, on the real services."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pika
import pytest

import counts
from conftest import ROOT, free_port, wait_until


def http_get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.load(response)


def test_client_server_api_end_to_end_counts_exactly(pipeline):
    pipeline.start_server()
    client = pipeline.run_client("--count", 500, "--interval", 0)
    assert client.returncode == 0, pipeline.log(client)
    assert len(pipeline.confirmed_ids(client)) == 500
    pipeline.wait_stored(500)

    port = free_port()
    pipeline.start("api.py", env={"API_PORT": str(port)})
    url = f"http://127.0.0.1:{port}/status-count?start=2000-01-01T00:00:00Z&end=2100-01-01T00:00:00Z"
    wait_until(lambda: _answers(url), timeout=30, what="api.py to answer")
    status, answer = http_get_json(url)
    assert status == 200
    assert answer == {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z",
                      "counts": pipeline.confirmed_counts(client), "total": 500}
    assert http_get_json(f"http://127.0.0.1:{port}/health") == (200, {"status": "ok"})


def test_batch_index_exists_where_the_store_can_use_it(pipeline):
    """MongoDB finds an interrupted batch's documents from it; FerretDB 1.x reads the whole
    collection for such a filter, so there it would only slow every insert, and the
    timestamp index an earlier version created goes."""
    pipeline.collection.create_index("timestamp")
    pipeline.start_server()  # indexes are settled before it consumes
    ferretdb_1 = pipeline.database.client.server_info().get("ferretdbVersion", "").startswith("v1.")
    keys = [index["key"] for index in pipeline.collection.list_indexes()]
    assert ({"batch": 1} in keys) != ferretdb_1
    assert ({"timestamp": 1} in keys) != ferretdb_1


def _answers(url):
    try:
        return http_get_json(url)[0] == 200
    except OSError:
        return False


def test_client_with_interval_publishes_until_stopped(pipeline):
    pipeline.start_server()
    client = pipeline.start("client.py", "--interval", "0.05")
    wait_until(lambda: len(pipeline.confirmed_ids(client)) >= 5, timeout=30, what="5 confirms")
    assert pipeline.stop(client, timeout=15) == 0
    confirmed = pipeline.confirmed_ids(client)
    assert "done:" in pipeline.log(client)
    pipeline.wait_stored(len(confirmed))
    assert sorted(doc["_id"] for doc in pipeline.collection.find({}, {"_id": 1})) == sorted(confirmed)


def test_message_from_another_publisher_is_counted(pipeline, app_for):
    pipeline.start_server()
    pipeline.publish({"status": 4, "timestamp": "2026-11-27T11:15:00.250+01:00", "device_id": "sensor-7"},
                     pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id="m-1"))
    pipeline.publish({"status": 6, "message_id": "m-2"})  # identity in the body, time from the server
    pipeline.wait_stored(2)

    stored = pipeline.collection.find_one({"_id": "m-1"})
    assert stored["status"] == 4 and stored["device_id"] == "sensor-7"
    assert stored["timestamp"] == datetime(2026, 11, 27, 10, 15, 0, 250000, tzinfo=timezone.utc)
    assert abs(pipeline.collection.find_one({"_id": "m-2"})["timestamp"] - datetime.now(timezone.utc)) < timedelta(minutes=1)

    client = app_for(pipeline).test_client()
    answer = client.get("/status-count?start=2026-11-27T10:15:00.250Z&end=2026-11-27T10:15:00.251Z").get_json()
    assert answer["counts"]["4"] == 1 and answer["total"] == 1


def test_amqp_timestamp_property_is_used_when_body_has_none(pipeline):
    pipeline.start_server()
    sent_at = int(time.time()) - 3600
    pipeline.publish({"status": 1}, pika.BasicProperties(delivery_mode=2, message_id="m-ts", timestamp=sent_at))
    pipeline.wait_stored(1)
    assert pipeline.collection.find_one({"_id": "m-ts"})["timestamp"] == datetime.fromtimestamp(sent_at, timezone.utc)


def test_redelivered_message_is_stored_once(pipeline):
    pipeline.start_server()
    properties = pika.BasicProperties(delivery_mode=2, message_id="same-id")
    for _ in range(3):
        pipeline.publish({"status": 2, "timestamp": "2026-11-27T10:00:00Z"}, properties)
    pipeline.publish({"status": 3, "message_id": "marker"})
    wait_until(lambda: pipeline.collection.find_one({"_id": "marker"}), what="the marker message")
    assert pipeline.stored_count() == 2
    assert pipeline.collection.count_documents({"_id": "same-id"}) == 1


def test_messages_published_while_server_is_down_are_kept(pipeline):
    server = pipeline.start_server()  # declares the durable queue
    assert pipeline.stop(server) == 0
    client = pipeline.run_client("--count", 50, "--interval", 0)
    assert client.returncode == 0, pipeline.log(client)
    assert pipeline.queue_depth() == 50
    pipeline.start_server()
    pipeline.wait_stored(50)


def test_unroutable_message_is_an_error_not_a_silent_loss(pipeline):
    """Before server.py has declared its topology, neither the queue nor the alternate exchange
    named by the policy exists: the broker returns the mandatory publish. Afterwards the
    alternate exchange keeps such a message (tests/test_unroutable.py)."""
    client = pipeline.run_client("--count", 3, "--interval", 0)  # no server ever declared the queue
    assert client.returncode == 1
    log = pipeline.log(client)
    assert log.count("nor to its alternate exchange") == 3 and "3 refused" in log


def test_sigterm_stops_the_server_cleanly(pipeline):
    server = pipeline.start_server()
    client = pipeline.run_client("--count", 200, "--interval", 0)
    pipeline.wait_stored(200)
    started = time.monotonic()
    assert pipeline.stop(server, timeout=10) == 0
    assert time.monotonic() - started < 5
    assert "stopped: 200 stored" in pipeline.log(server)
    assert client.returncode == 0


@pytest.mark.parametrize("variable, value", [
    ("API_PORT", "abc"),
    ("API_PORT", "70000"),
    ("API_PORT", "²"),  # a digit to str.isdigit, not to int()
    ("RABBITMQ_URL", "localhost:5672"),
    ("RABBITMQ_URL", "amqp://a:b@node1:5672/,amqp://a:b@node2:port/"),  # one bad node of several
    ("RABBITMQ_URL", ",amqp://a:b@node1:5672/"),  # an empty one
    ("RABBITMQ_URL", "amqp://a:b@node1:5672/%2F,"),  # a trailing comma
    ("MQTT_HOST", "mqtt://node1:1883"),
    ("MQTT_HOST", "node1:1883,node2:"),
    ("MQTT_HOST", "node1:1883,node2:70000"),
    ("MQTT_HOST", "node1 node2"),
    ("MONGO_URI", "localhost:27017"),
    ("MONGO_URI", "mongodb://localhost:port/"),
    ("QUEUE", ""),
    ("MONGO_DB", "a/b"),  # MongoDB's naming restrictions
    ("MONGO_DB", "iot.2026"),
    ("MONGO_DB", "d" * 64),
    ("MONGO_COLLECTION", "$status"),
    ("SERVER_PROCESSES", "0"),
    ("METRICS_PORT", "70000"),
    ("METRICS_PORT", ""),
])
@pytest.mark.parametrize("script", ["server.py", "client.py", "api.py"])
def test_bad_setting_stops_the_program_with_one_line_naming_it(script, variable, value):
    result = subprocess.run([sys.executable, str(ROOT / script)], env={"PATH": "/usr/bin:/bin", variable: value},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"config error: {variable}=")


def test_an_upgrade_over_messages_stored_without_counts_is_refused_until_rebuilt(pipeline, app_for):
    """server.py refuses to consume into counts it cannot fold, naming the command; the
    command keeps them again from the stored messages; then everything answers exactly."""
    server = pipeline.start_server()
    pipeline.run_client("--count", 300, "--interval", 0)
    pipeline.wait_stored(300)
    pipeline.stop(server)
    for name in pipeline.database.list_collection_names():  # as a version that kept no counts left them
        if name.startswith("status_counts"):
            pipeline.database.drop_collection(name)
    refused = pipeline.start("server.py")
    assert refused.wait(60) == 1
    assert "python server.py --rebuild-counts" in pipeline.log(refused)
    rebuild = pipeline.start("server.py", "--rebuild-counts")
    assert rebuild.wait(120) == 0, pipeline.log(rebuild)
    assert "counted 300 stored messages" in pipeline.log(rebuild)
    pipeline.start_server()
    pipeline.run_client("--count", 50, "--interval", 0)
    pipeline.wait_stored(350)
    expected = {str(status): count for status, count in enumerate(counts.raw_counts(
        pipeline.collection, datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2100, 1, 1, tzinfo=timezone.utc)))}
    client_app = app_for(pipeline).test_client()
    wait_until(lambda: client_app.get("/status-count?start=2000-01-01T00:00:00Z&end=2100-01-01T00:00:00Z")
               .get_json().get("counts") == expected, what="the API to count all 350")
    assert sum(expected.values()) == 350


def test_api_on_a_taken_port_stops_with_one_line(pipeline):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        api = pipeline.start("api.py", env={"API_PORT": str(taken.getsockname()[1])})
        assert api.wait(30) == 1
    log = pipeline.log(api)
    assert "cannot serve on 127.0.0.1" in log and "API_PORT" in log and "Traceback" not in log, log


@pytest.mark.parametrize("value, nodes", [
    ("localhost", [("localhost", 1883)]),
    ("node1:1884, node2,node3:1886", [("node1", 1884), ("node2", 1883), ("node3", 1886)]),
    ("[::1]:1884,::1,[fe80::1]", [("::1", 1884), ("::1", 1883), ("fe80::1", 1883)]),
])
def test_mqtt_host_lists_the_nodes_of_a_cluster(value, nodes):
    code = "import config; print(config.MQTT_HOSTS, config.MQTT_HOST, config.MQTT_PORT)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "MQTT_HOST": value, "MQTT_TLS_CA": "", "TLS_CA_FILE": ""})
    assert result.stdout.split() and result.stdout.strip() == f"{nodes} {nodes[0][0]} {nodes[0][1]}", result.stderr


def test_rabbitmq_url_lists_the_nodes_of_a_cluster():
    code = ("import config; print([config.node_name(parameters) for parameters in "
            "config.amqp_parameters(config.rabbitmq_url('pipeline'))])")
    urls = "amqp://a:b@node1:5681/%2F, amqp://a:b@node2:5682/%2F,amqps://a:b,c@node3/%2F?heartbeat=5,amqp://[::1]:5683/"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "RABBITMQ_URL": urls})
    assert result.stdout.strip() == "['node1:5681', 'node2:5682', 'node3:5671', '[::1]:5683']", result.stderr
