"""A consumer that goes quiet while its process looks alive: each way gets noticed, logged
once, and ends in a reconnect (or, for a store that stays hung, an exit a supervisor sees).

Broker side: the consumer cancelled by the broker (its queue deleted), the channel closed for
an acknowledgement later than consumer_timeout, the connection blocked by a memory alarm,
heartbeats missed while the process is stopped. Store side: a MongoDB-wire server that
accepts connections and never answers (StoreProxy in conftest.py, in front of the real one).

The broker tests change node-wide settings of the shared node for a few seconds at most,
and restore them in a finally.
"""

import re
import signal
import subprocess
import time
import uuid

import pika
import pytest

from conftest import wait_until
from test_faults import assert_each_stored_once

NODE = "status-pipeline@localhost"
MEMORY_HIGH_WATERMARK = "0.4"  # rabbitmq/rabbitmq.conf


def rabbitmqctl(*args):
    return subprocess.run(["rabbitmqctl", "-n", NODE, *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()


def rabbit_env(key):
    """The value of a `rabbit` application setting on the node, as Erlang text: {ok,V} or undefined."""
    return rabbitmqctl("eval", f"application:get_env(rabbit, {key}).")


def set_rabbit_env(key, erlang_term):
    rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {erlang_term}).")


def restore_rabbit_env(key, previous):
    if previous.startswith("{ok,"):
        set_rabbit_env(key, previous[len("{ok,"):-1])
    else:
        rabbitmqctl("eval", f"application:unset_env(rabbit, {key}).")


def log_count(pipeline, process, text):
    return pipeline.log(process).count(text)


def consumer_count(pipeline):
    channel = pipeline.channel()
    count = channel.queue_declare(pipeline.queue, passive=True).method.consumer_count
    channel.close()
    return count


def publish_valid(pipeline, count, prefix):
    ids = [f"{prefix}-{n}" for n in range(count)]
    for message_id in ids:
        pipeline.publish({"status": 3, "message_id": message_id})
    return ids


# -- broker ------------------------------------------------------------------------

def test_queue_deleted_under_the_server_is_declared_again(pipeline):
    """The broker cancels the consumer when its queue is deleted; the server declares the
    topology again and consumes, each time (here twice), with one line each time."""
    server = pipeline.start_server()
    confirmed = publish_valid(pipeline, 20, "before")
    wait_until(lambda: pipeline.stored_count() == 20, what="the first messages stored")
    for round_ in (1, 2):
        pipeline.channel().queue_delete(pipeline.queue)
        wait_until(lambda: log_count(pipeline, server, "cancelled the consumer") == round_, timeout=15,
                   what="the server to notice the cancel")
        wait_until(lambda: log_count(pipeline, server, "RabbitMQ is back") == round_, timeout=30,
                   what="the server to consume again")
        confirmed += publish_valid(pipeline, 20, f"after-{round_}")
        # Deleting a queue deletes its messages: delete again only once they are stored.
        wait_until(lambda: pipeline.stored_count() == len(confirmed), what="the messages published since stored")
    assert_each_stored_once(pipeline, confirmed)
    assert server.poll() is None
    log = pipeline.log(server)
    assert log.count("cancelled the consumer") == 2 and log.count("RabbitMQ is back") == 2, log[-3000:]


def test_acknowledgement_later_than_consumer_timeout_reconnects(pipeline):
    """The first batch is held longer than the broker's consumer_timeout: the broker closes
    the channel with 406, which is not a refused topology. RabbitMQ 3.10 has no per-queue
    timeout (x-consumer-timeout and the policy key came in 3.11.15/3.12) and reads the node's
    when a channel opens, so it is shortened only while the server opens its channel."""
    previous_timeout, previous_tick = rabbit_env("consumer_timeout"), rabbit_env("channel_tick_interval")
    try:
        # A channel checks its deliveries' age on each tick (60 s by default), re-read at each tick.
        set_rabbit_env("channel_tick_interval", 500)
        set_rabbit_env("consumer_timeout", 1000)
        try:
            server = pipeline.start_server(env={"SERVER_SLOW_FIRST_WRITE": "4"})
        finally:
            restore_rabbit_env("consumer_timeout", previous_timeout)
        client = pipeline.run_client("--count", 300, "--interval", 0)
        assert client.returncode == 0, pipeline.log(client)[-2000:]
        wait_until(lambda: "past its consumer_timeout" in pipeline.log(server), timeout=30,
                   what="the server to notice the consumer timeout")
    finally:
        restore_rabbit_env("channel_tick_interval", previous_tick)
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert server.poll() is None, pipeline.log(server)[-3000:]
    log = pipeline.log(server)
    assert "refused the topology" not in log
    assert log.count("past its consumer_timeout") == 1 and log.count("RabbitMQ is back") == 1, log[-3000:]


def test_connection_blocked_by_a_memory_alarm_reconnects(pipeline):
    """A memory alarm blocks the server's connection when it publishes a dead letter; past
    RABBITMQ_BLOCKED_SECONDS it reconnects with backoff, and resumes once the alarm clears."""
    server = pipeline.start_server(env={"RABBITMQ_BLOCKED_SECONDS": "1"})
    # Deliveries reach the stopped server's socket; it handles them only after SIGCONT, in the alarm.
    server.send_signal(signal.SIGSTOP)
    try:
        pipeline.publish(b"not json", pika.BasicProperties(delivery_mode=2, message_id="invalid-1"))
        confirmed = publish_valid(pipeline, 10, "blocked")
        wait_until(lambda: pipeline.queue_depth() == 0, timeout=15, what="the messages delivered to the server")
        try:
            rabbitmqctl("set_vm_memory_high_watermark", "0")  # the alarm goes off at once
            server.send_signal(signal.SIGCONT)
            wait_until(lambda: "blocked the connection" in pipeline.log(server), timeout=15,
                       what="the server to give up on the blocked connection")
        finally:
            rabbitmqctl("set_vm_memory_high_watermark", MEMORY_HIGH_WATERMARK)
    finally:
        server.send_signal(signal.SIGCONT)
    assert_each_stored_once(pipeline, confirmed)
    (properties, body), *again = pipeline.dead_letters(1)
    assert body == b"not json" and "JSON" in properties.headers["x-rejected-reason"]
    # A publish the blocked broker had not read yet may still arrive once the alarm clears.
    assert all(body == b"not json" for _, body in again)
    assert server.poll() is None
    log = pipeline.log(server)
    assert log.count("blocked the connection") == 1 and log.count("RabbitMQ is back") == 1, log[-3000:]


def test_heartbeats_missed_while_stopped_reconnects(pipeline):
    """The server stopped (SIGSTOP) past its heartbeat timeout: the broker drops the connection;
    on SIGCONT the server notices, logs it once, reconnects, and stores everything once."""
    server = pipeline.start_server(env={"RABBITMQ_HEARTBEAT_SECONDS": "2"})
    client = pipeline.start("client.py", "--count", 3000, "--interval", 0.002)
    wait_until(lambda: pipeline.stored_count() >= 300, timeout=60, what="300 stored")
    server.send_signal(signal.SIGSTOP)
    try:
        # The broker closes a connection silent for about two heartbeat intervals, and its consumer goes.
        wait_until(lambda: consumer_count(pipeline) == 0, timeout=30, what="the broker to drop the silent server",
                   interval=0.2)
    finally:
        server.send_signal(signal.SIGCONT)
    assert client.wait(120) == 0, pipeline.log(client)[-2000:]
    wait_until(lambda: "RabbitMQ is back" in pipeline.log(server), timeout=30, what="the server to reconnect")
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert server.poll() is None
    log = pipeline.log(server)
    assert log.count("RabbitMQ connection lost") == 1 and log.count("RabbitMQ is back") == 1, log[-3000:]


# -- store -------------------------------------------------------------------------

def store_env(proxy, exit_seconds=60):
    return {"MONGO_URI": proxy.uri, "MONGO_WRITE_TIMEOUT_SECONDS": "1",
            "MONGO_OUTAGE_EXIT_SECONDS": str(exit_seconds)}


@pytest.mark.parametrize("hang", ["hang_writes", "hang"])
def test_store_that_stops_answering_is_an_outage(pipeline, store_proxy, hang):
    """The store accepts connections and answers no write (or nothing at all): the server
    notices within its write deadline, logs once, holds the messages, and stores each once
    when the store answers again."""
    server = pipeline.start_server(env=store_env(store_proxy))
    first = pipeline.run_client("--count", 200, "--interval", 0)
    wait_until(lambda: pipeline.stored_count() == 200, what="200 stored")
    getattr(store_proxy, hang)()
    noticed_by = time.monotonic() + 1 + 10  # the deadline, and a loaded machine
    second = pipeline.run_client("--count", 300, "--interval", 0)
    wait_until(lambda: "MongoDB unavailable" in pipeline.log(server), timeout=max(0.1, noticed_by - time.monotonic()),
               what="the server to notice the hung store")
    time.sleep(3)  # several retries, each one past its deadline, while the store stays hung
    assert pipeline.stored_count() < 500
    store_proxy.forward()
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(first) + pipeline.confirmed_ids(second))
    assert server.poll() is None
    log = pipeline.log(server)
    assert re.findall(r"MongoDB (unavailable|is back)", log) == ["unavailable", "is back"], log[-3000:]


@pytest.mark.parametrize("hang", ["hang_writes", "hang"])
def test_store_hung_past_the_bound_exits_non_zero(pipeline, store_proxy, hang):
    """Past MONGO_OUTAGE_EXIT_SECONDS the server exits 1 with one line; its messages were
    never acknowledged and a new server stores each once."""
    server = pipeline.start_server(env=store_env(store_proxy, exit_seconds=3))
    getattr(store_proxy, hang)()
    client = pipeline.run_client("--count", 200, "--interval", 0)
    assert server.wait(30) == 1, pipeline.log(server)[-3000:]
    log = pipeline.log(server)
    assert log.count("MongoDB has taken no write") == 1, log[-3000:]
    assert "exiting with status 1" in log, log[-3000:]
    store_proxy.forward()
    pipeline.start_server()
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))


def test_health_reports_a_store_that_answers_ping_but_not_writes(pipeline, store_proxy):
    from api import create_app

    app = create_app({"TESTING": True, "MONGO_URI": store_proxy.uri, "MONGO_DB": pipeline.env["MONGO_DB"],
                      "MONGO_COLLECTION": pipeline.env["MONGO_COLLECTION"]})
    client = app.test_client()
    try:
        for _ in range(3):
            response = client.get("/health")
            assert (response.status_code, response.get_json()) == (200, {"status": "ok"})
        assert pipeline.database["health"].count_documents({}) == 1  # the probe does not grow its collection

        store_proxy.hang_writes()
        started = time.monotonic()
        response = client.get("/health")
        assert response.status_code == 503
        assert response.get_json()["status"] == "unavailable"
        assert "answers ping but not a write" in response.get_json()["error"]
        assert time.monotonic() - started < 10

        store_proxy.hang()
        response = client.get("/health")
        assert response.status_code == 503 and "does not answer" in response.get_json()["error"]

        store_proxy.forward()
        wait_until(lambda: client.get("/health").status_code == 200, timeout=20, what="/health to answer 200 again")
    finally:
        app.extensions["mongo"].close()


def test_invalid_durations_stop_the_server_with_one_line(pipeline):
    for name, value in [("MONGO_WRITE_TIMEOUT_SECONDS", "0"), ("MONGO_WRITE_TIMEOUT_SECONDS", "0.001"),
                        ("MONGO_OUTAGE_EXIT_SECONDS", "-3"),
                        ("RABBITMQ_BLOCKED_SECONDS", "nan"), ("RABBITMQ_HEARTBEAT_SECONDS", "1.5"),
                        ("MONGO_STARTUP_TIMEOUT_SECONDS", "soon")]:
        process = pipeline.start("server.py", env={name: value}, name=f"server-{uuid.uuid4().hex[:6]}")
        assert process.wait(30) != 0
        assert f"config error: {name}=" in pipeline.log(process)
