"""Publish device status messages to RabbitMQ, and know that each one arrived.

    python client.py                       # a random status every second until Ctrl-C
    python client.py --interval 0 --count 100000

Every message is persistent, carries a UUID message_id, and is published with
publisher confirms and the mandatory flag. Up to --window messages wait for
their confirm at once, so confirms cost no round trip per message. On a lost
connection the client reconnects with capped, jittered backoff and republishes
every unconfirmed message with its original message_id (the server stores it
once). It exits non-zero only when a message was refused (nacked or
unroutable) or when it gave up with messages still unconfirmed.
"""

import argparse
import json
import logging
import random
import signal
import sys
import time
import uuid
from collections import OrderedDict, deque
from datetime import datetime, timezone

import pika
from pika.exceptions import ProbableAccessDeniedError, ProbableAuthenticationError

import config

LOG = logging.getLogger("client")


def make_message(status, device_id=None):
    """One message in the documented format: (message_id, body)."""
    message_id = str(uuid.uuid4())
    fields = {"status": status, "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
              .replace("+00:00", "Z"), "message_id": message_id}
    if device_id:
        fields["device_id"] = device_id
    return message_id, json.dumps(fields).encode()


class AmqpPublisher:
    """Publishes with a window of unconfirmed messages over pika's asynchronous connection."""

    def __init__(self, amqp_url, count, interval, window, device_id, give_up_seconds):
        self._parameters = pika.URLParameters(amqp_url)
        self._parameters.heartbeat = 30
        self._parameters.blocked_connection_timeout = 60
        self._remaining = count  # None: until stopped
        self._interval = interval
        self._window = window
        self._device_id = device_id
        self._give_up_seconds = give_up_seconds
        self._connection = None
        self._channel = None
        self._next_tag = 1
        self._unconfirmed = OrderedDict()  # delivery tag -> (message_id, status, body)
        self._to_resend = deque()  # (message_id, status, body) from a lost connection
        self._returned = set()
        self._stopping = False
        self._scheduled = False
        self._down_since = None
        self._delay = 1.0
        self.published = self.confirmed = self.refused = 0

    @property
    def unconfirmed(self):
        return len(self._unconfirmed) + len(self._to_resend)

    def run(self):
        while True:
            self._connection = pika.SelectConnection(
                self._parameters, on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_connection_open_error, on_close_callback=self._on_connection_closed)
            self._connection.ioloop.start()
            if self._finished():
                return
            if self._stopping:
                LOG.error("stopped while RabbitMQ is unreachable: %d messages unconfirmed", self.unconfirmed)
                return
            if self._down_since is not None and time.monotonic() - self._down_since > self._give_up_seconds:
                LOG.error("gave up: RabbitMQ unreachable for %ds, %d messages unconfirmed",
                          self._give_up_seconds, self.unconfirmed)
                return
            delay = self._delay * random.uniform(0.5, 1.5)
            LOG.info("reconnecting in %.1fs", delay)
            time.sleep(delay)
            self._delay = min(self._delay * 2, 30.0)

    def stop(self, *_):
        if not self._stopping:
            LOG.info("stopping: waiting for %d confirms", len(self._unconfirmed))
        self._stopping = True
        self._remaining = 0
        if self._connection and self._connection.is_open:
            self._connection.ioloop.add_callback_threadsafe(self._close_when_finished)

    def _finished(self):
        return self._remaining == 0 and not self._unconfirmed and not self._to_resend

    # -- connection and channel -------------------------------------------------

    def _on_connection_open(self, connection):
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection, error):
        if isinstance(error, (ProbableAuthenticationError, ProbableAccessDeniedError)):
            LOG.error("RabbitMQ refused the credentials in RABBITMQ_URL: %s", error)
            self._remaining, self._give_up_seconds = 0, -1
        self._went_down(f"cannot connect to RabbitMQ ({error!r})")
        connection.ioloop.stop()

    def _on_connection_closed(self, connection, reason):
        self._channel = None
        if not self._finished():
            self._went_down(f"connection to RabbitMQ lost ({reason})")
        connection.ioloop.stop()

    def _went_down(self, why):
        if self._down_since is None:
            self._down_since = time.monotonic()
            LOG.warning("%s; %d messages unconfirmed will be republished", why, len(self._unconfirmed))
        self._to_resend.extendleft(reversed(self._unconfirmed.values()))
        self._unconfirmed.clear()
        self._returned.clear()

    def _on_channel_open(self, channel):
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        # Declared here too so the exchange exists whichever side starts first.
        channel.exchange_declare(config.EXCHANGE, exchange_type="topic", durable=True,
                                 callback=lambda _: channel.confirm_delivery(self._on_confirm,
                                                                             callback=self._on_confirm_mode))

    def _on_confirm_mode(self, _):
        if self._down_since is not None:
            LOG.info("connected to RabbitMQ again after %.1fs", time.monotonic() - self._down_since)
        else:
            LOG.info("connected to RabbitMQ, publishing to %s with key %s", config.EXCHANGE, config.ROUTING_KEY)
        self._down_since = None
        self._next_tag = 1
        self._publish_more()

    def _on_channel_closed(self, channel, reason):
        if not self._finished():
            LOG.warning("channel closed: %s", reason)
        if self._connection.is_open:
            self._connection.close()

    # -- publishing ---------------------------------------------------------------

    def _publish_more(self):
        self._scheduled = False
        if self._channel is None or not self._channel.is_open:
            return
        while len(self._unconfirmed) < self._window:
            if self._to_resend:
                message = self._to_resend.popleft()
            elif self._remaining != 0 and not self._stopping:
                status = random.randrange(7)
                message_id, body = make_message(status, self._device_id)
                message = (message_id, status, body)
                if self._remaining is not None:
                    self._remaining -= 1
            else:
                break
            self._publish(message)
            if self._interval > 0 and not self._to_resend:
                break
        if self._interval > 0 and self._remaining != 0 and not self._stopping and not self._scheduled:
            self._scheduled = True
            self._connection.ioloop.call_later(self._interval, self._publish_more)
        self._close_when_finished()

    def _publish(self, message):
        message_id, _, body = message
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                          message_id=message_id, timestamp=int(time.time()))
        self._channel.basic_publish(config.EXCHANGE, config.ROUTING_KEY, body, properties, mandatory=True)
        self._unconfirmed[self._next_tag] = message
        self._next_tag += 1
        self.published += 1

    def _on_return(self, channel, method, properties, body):
        self._returned.add(properties.message_id)

    def _on_confirm(self, frame):
        confirmation = frame.method
        acked = isinstance(confirmation, pika.spec.Basic.Ack)
        if confirmation.multiple:
            tags = [tag for tag in self._unconfirmed if tag <= confirmation.delivery_tag]
        else:
            tags = [confirmation.delivery_tag]
        for tag in tags:
            message_id, status, _ = self._unconfirmed.pop(tag)
            if message_id in self._returned:
                self._returned.discard(message_id)
                self.refused += 1
                LOG.error("unroutable: no queue is bound to %s with key %s (start server.py once to create %s); "
                          "message %s not delivered", config.EXCHANGE, config.ROUTING_KEY, config.QUEUE, message_id)
            elif not acked:
                self.refused += 1
                LOG.error("RabbitMQ refused message %s (nack)", message_id)
            else:
                self.confirmed += 1
                self._delay = 1.0  # a healthy connection resets the backoff
                LOG.info("confirmed status=%d message_id=%s", status, message_id)
        if self._interval == 0 or self._to_resend:
            self._publish_more()
        self._close_when_finished()

    def _close_when_finished(self):
        if self._finished() and self._connection.is_open:
            self._connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Publish device status messages (0..6) to RabbitMQ.")
    parser.add_argument("--count", type=int, default=None, help="publish exactly N messages, then exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages; 0 for as fast as possible")
    parser.add_argument("--device-id", default=None, help="device id put in every message")
    parser.add_argument("--window", type=int, default=1000, help="messages awaiting confirm at once")
    parser.add_argument("--give-up", type=float, default=120.0, help="seconds without RabbitMQ before giving up")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 0 or args.interval < 0 or args.window < 1:
        parser.error("--count, --interval must not be negative and --window must be at least 1")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)

    publisher = AmqpPublisher(config.RABBITMQ_URL, args.count, args.interval, args.window,
                              args.device_id, args.give_up)
    signal.signal(signal.SIGINT, publisher.stop)
    signal.signal(signal.SIGTERM, publisher.stop)
    started = time.monotonic()
    publisher.run()
    elapsed = time.monotonic() - started
    LOG.info("done: %d published, %d confirmed, %d refused, %d unconfirmed in %.1fs (%.0f/s)",
             publisher.published, publisher.confirmed, publisher.refused, publisher.unconfirmed,
             elapsed, publisher.confirmed / elapsed if elapsed else 0)
    return 0 if publisher.refused == 0 and publisher.unconfirmed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
