"""A fleet flushing what it buffered during an outage: 100,000 messages whose timestamps
spread over one day, in random order, drained by server.py as shipped (two processes).
Every batch touches hundreds of minutes and most hours of that day; the store must keep
answering, and the counts must equal the raw documents."""

import json
import random
from datetime import datetime, timedelta, timezone

import pika

import counts
from conftest import wait_until

MESSAGES = 100_000


def test_a_day_long_backlog_in_random_order_drains_and_counts_exactly(pipeline):
    pipeline.stop(pipeline.start_server())  # declares the queue, so the backlog waits in it
    rng = random.Random(2026)
    day = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=2)
    channel = pipeline.channel()
    for index in range(MESSAGES):
        moment = day + timedelta(milliseconds=rng.randrange(86_400_000))
        body = {"status": rng.randrange(7), "message_id": f"b{index}",
                "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
        channel.basic_publish(pipeline.exchange, pipeline.routing_key, json.dumps(body).encode(),
                              pika.BasicProperties(delivery_mode=2))
    # Without publisher confirms a message is the broker's only once it is in the queue: a channel
    # closed before that may lose the last ones (seen with quorum queues on RabbitMQ 3.10).
    wait_until(lambda: pipeline.queue_depth() == MESSAGES, timeout=120, what="the backlog in the queue", interval=1)
    channel.close()

    server = pipeline.start_server(env={"SERVER_PROCESSES": "2"})
    wait_until(lambda: pipeline.queue_depth() == 0, timeout=600, what="the backlog to drain", interval=2)
    wait_until(lambda: pipeline.stored_count() == MESSAGES, timeout=120, what="every message stored", interval=2)
    assert server.poll() is None, pipeline.log(server)[-3000:]
    pipeline.database.command("ping")  # the store still answers

    ranges = [(day - timedelta(hours=1), day + timedelta(days=1, hours=1)),
              (day + timedelta(hours=5, milliseconds=123), day + timedelta(hours=17, minutes=3, milliseconds=999))]
    ranges += [(start, start + timedelta(milliseconds=rng.randrange(3_600_000)))
               for start in (day + timedelta(milliseconds=rng.randrange(86_400_000)) for _ in range(6))]
    for start, end in ranges:
        expected = counts.raw_counts(pipeline.collection, start, end)
        wait_until(lambda: counts.count(pipeline.collection, start, end) == expected, timeout=30,
                   what=f"counts for {start}..{end} equal to the raw documents'")
    assert sum(counts.count(pipeline.collection, *ranges[0])) == MESSAGES
