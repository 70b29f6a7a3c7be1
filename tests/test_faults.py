"""Crashes and outages: every confirmed message is stored exactly once.

Each test names its fault and ends with the same check as RabbitMQ's Jepsen
suite: lost (confirmed but not stored) = 0 and duplicated (stored more than
once) = 0, against the message ids that publishers saw confirmed; and the
counts /status-count gives equal the raw aggregation.
"""

import re
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pika
import pytest

import counts
from conftest import ROOT, wait_until
from server import PREFETCH


def assert_each_stored_once(pipeline, confirmed, timeout=120):
    confirmed = set(confirmed)
    assert confirmed, "the test confirmed no message"

    def stored_ids():
        return [document["_id"] for document in pipeline.collection.find({}, {"_id": 1})]

    def nothing_lost():
        return confirmed <= set(stored_ids())

    wait_until(nothing_lost, timeout, f"all {len(confirmed)} confirmed messages to be stored", interval=0.5)
    wait_until(lambda: pipeline.queue_depth() == 0, timeout, "the queue to drain", interval=0.5)
    stored = stored_ids()
    lost = confirmed - set(stored)
    duplicated = len(stored) - len(set(stored))
    assert (len(lost), duplicated) == (0, 0)
    assert_counts_exact(pipeline.collection)


def assert_counts_exact(collection):
    """Everything, and the last two minutes minute by minute (where the fault happened). A count
    may lag only while a batch sits between its raw insert and its counts record."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    ranges = [(datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2100, 1, 1, tzinfo=timezone.utc))]
    ranges += [(now - timedelta(minutes=back + 1), now - timedelta(minutes=back)) for back in range(2)]

    def counts_exact():
        return all(counts.count(collection, start, end) == counts.raw_counts(collection, start, end)
                   for start, end in ranges)

    wait_until(counts_exact, timeout=30, what="rollup counts equal to the raw aggregation", interval=0.5)


def services(*args):
    subprocess.run([str(ROOT / "scripts/services"), *args], check=True, capture_output=True, timeout=180)


def test_server_killed_mid_stream_and_restarted(pipeline):
    """Fault: kill -9 of the server while 20,000 messages stream in, then a restart."""
    server = pipeline.start_server()
    client = pipeline.start("client.py", "--count", 20000, "--interval", 0, "--log-level", "INFO")
    wait_until(lambda: pipeline.stored_count() >= 3000, timeout=60, what="3,000 stored")
    server.kill()
    server.wait()
    pipeline.start_server()
    assert client.wait(120) == 0, pipeline.log(client)[-2000:]
    confirmed = pipeline.confirmed_ids(client)
    assert len(confirmed) == 20000
    assert_each_stored_once(pipeline, confirmed)


@pytest.mark.parametrize("crash_at", ["after-raw-insert", "after-write", "before-ack"])
def test_server_killed_between_write_and_ack(pipeline, crash_at):
    """Fault: the server dies after a batch is written and before it is acknowledged."""
    server = pipeline.start_server(env={"SERVER_CRASH_AT": crash_at})
    client = pipeline.run_client("--count", 2000, "--interval", 0)
    assert server.wait(30) == 70, pipeline.log(server)
    written_before_crash = pipeline.stored_count()
    assert written_before_crash > 0
    pipeline.start_server()
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert pipeline.stored_count() == 2000


def test_slow_batch_holds_back_the_acknowledgement_of_later_ones(pipeline):
    """Fault: one batch's write hangs while the other writers store the batches after it,
    then the server dies. A `multiple` ack of a later batch would have acknowledged the
    hung one too, and its messages would be lost."""
    server = pipeline.start_server(env={"SERVER_SLOW_FIRST_WRITE": "120"})
    client = pipeline.run_client("--count", 3000, "--interval", 0)
    wait_until(lambda: "holding the first batch" in pipeline.log(server), timeout=30, what="the first batch to hang")
    first_batch = int(re.search(r"holding the first batch of (\d+) messages", pipeline.log(server)).group(1))
    wait_until(lambda: pipeline.stored_count() >= 3000 - first_batch, timeout=60, what="the later batches stored")
    assert pipeline.stored_count() < 3000, "the hung batch was written"
    server.kill()
    server.wait()
    pipeline.start_server()
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))


def test_rabbitmq_restarted_while_client_and_server_run(pipeline):
    """Fault: RabbitMQ stopped and started again in the middle of a stream."""
    server = pipeline.start_server()
    client = pipeline.start("client.py", "--count", 4000, "--interval", 0.002)
    wait_until(lambda: len(pipeline.confirmed_ids(client)) >= 500, timeout=60, what="500 confirms")
    services("down", "rabbitmq")
    services("up", "rabbitmq")
    assert client.wait(180) == 0, pipeline.log(client)[-2000:]
    assert "republished" in pipeline.log(client)
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert server.poll() is None
    log = pipeline.log(server)
    assert log.count("RabbitMQ connection lost") == 1 and log.count("RabbitMQ is back") == 1, log[-3000:]


def test_mongodb_down_for_20_seconds_while_messages_arrive(pipeline):
    """Fault: the MongoDB-wire server stopped for 20 seconds while the client keeps publishing."""
    server = pipeline.start_server()
    # Paced over 24 s or more: during the outage more arrive than the server's prefetch window holds.
    client = pipeline.start("client.py", "--count", 3 * PREFETCH, "--interval", 24 / (3 * PREFETCH))
    wait_until(lambda: pipeline.stored_count() >= 300, timeout=60, what="300 stored")
    services("down", "mongo")
    try:
        outage_ends = time.monotonic() + 20
        wait_until(lambda: "MongoDB unavailable" in pipeline.log(server), timeout=30, what="the server to notice")
        # The server holds at most its prefetch window; the rest waits in the queue. On a slow
        # machine the client needs longer than the 20 seconds to publish past the window.
        wait_until(lambda: pipeline.queue_depth() > 0, timeout=90, what="messages to wait in the queue")
        time.sleep(max(0.0, outage_ends - time.monotonic()))  # the outage lasts its 20 seconds at least
    finally:
        services("up", "mongo")
    assert client.wait(120) == 0
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    # Each change of state is logged once, not once per writer or retry. A stopping server
    # may still answer on open connections for a moment, so the outage can start twice.
    log = pipeline.log(server)
    changes = re.findall(r"MongoDB (unavailable|is back)", log)
    assert changes and changes == ["unavailable", "is back"] * (len(changes) // 2), log[-3000:]
    assert server.poll() is None


def test_two_servers_share_the_queue_and_one_is_killed(pipeline):
    """Fault: two competing servers, one killed with kill -9 halfway through."""
    doomed = pipeline.start_server(name="server-doomed")
    survivor = pipeline.start_server(name="server-survivor")
    client = pipeline.start("client.py", "--count", 20000, "--interval", 0)
    wait_until(lambda: pipeline.stored_count() >= 8000, timeout=60, what="8,000 stored")
    doomed.kill()
    doomed.wait()
    assert client.wait(120) == 0
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert pipeline.stop(survivor) == 0
    stored_by_survivor = int(pipeline.log(survivor).split("stopped: ")[1].split()[0])
    assert 0 < stored_by_survivor < 20000


def test_client_killed_and_restarted_while_publishing(pipeline):
    """Fault: kill -9 of the client mid-stream, then a new client run."""
    pipeline.start_server()
    first = pipeline.start("client.py", "--count", 20000, "--interval", 0)
    wait_until(lambda: len(pipeline.confirmed_ids(first)) >= 3000, timeout=60, what="3,000 confirms")
    first.kill()
    first.wait()
    second = pipeline.run_client("--count", 2000, "--interval", 0)
    assert second.returncode == 0
    confirmed = pipeline.confirmed_ids(first) + pipeline.confirmed_ids(second)
    assert_each_stored_once(pipeline, confirmed)


def test_message_that_kills_the_server_every_time_is_dead_lettered(pipeline):
    """Fault: a message that crashes the server on every delivery; the broker's delivery limit ends it."""
    poison = "poison-1"
    env = {"SERVER_CRASH_AT": f"message:{poison}"}
    pipeline.start_server(env=env)
    pipeline.publish({"status": 1}, pika.BasicProperties(delivery_mode=2, message_id=poison))
    deaths = 0

    def poison_dead_lettered():
        nonlocal deaths
        if pipeline.queue_depth(pipeline.dead_letter_queue):
            return True
        server = pipeline.processes[-1]
        if server.poll() is not None:
            deaths += 1
            pipeline.start("server.py", env=env)
        return False

    wait_until(poison_dead_lettered, timeout=240, what="the poison message in the dead-letter queue", interval=0.2)
    assert deaths >= 2
    (properties, _), = pipeline.dead_letters(1)
    assert properties.message_id == poison
    assert properties.headers["x-death"][0]["reason"] == "delivery_limit"
    if pipeline.processes[-1].poll() is not None:
        pipeline.start_server(env=env)
    pipeline.publish({"status": 2, "message_id": "after-poison"})
    wait_until(lambda: pipeline.collection.find_one({"_id": "after-poison"}), what="the next message to be stored")
