"""Publish device status messages to RabbitMQ, and know that each one arrived.

    python client.py                       # a random status every second until Ctrl-C
    python client.py --interval 0 --count 100000

With --count on a terminal, a progress bar of confirmed messages shows on stderr in place
of the line per confirmed message (--no-progress turns it off); into a file or a pipe the
client logs exactly as without it.

Every message is persistent, carries a UUID message_id, and is published with
publisher confirms and the mandatory flag. Up to --window messages wait for
their confirm at once, so confirms cost no round trip per message. On a lost
connection the client reconnects with capped, jittered backoff (several
RABBITMQ_URL, the nodes of a cluster: the next node at once, the pause once all
were tried) and republishes every unconfirmed message with its original
message_id (the server stores it once); a nacked message is republished too.
It exits non-zero only when a message was refused (by a topic permission,
unroutable, or nacked for longer than --give-up) or when it gave up with
messages still unconfirmed. Once server.py has declared its topology, the exchange's
alternate exchange keeps whatever no binding matches: such a message is
confirmed, and server.py moves it to the dead-letter queue with its reason.
"""

import argparse
import json
import logging
import random
import signal
import ssl
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
import pika
from pika.exceptions import ChannelClosedByBroker, ProbableAccessDeniedError, ProbableAuthenticationError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import config
from messages import DEVICE_ID, DEVICE_ID_RULE

LOG = logging.getLogger("client")
# MqttPublisher: connections in a row that the broker closed within a few seconds of the CONNACK,
# without a PUBACK, that mean "refused" (a broker restarting or a network flapping lasts longer).
TOPIC_REFUSED_CONNECTIONS = 3
TOPIC_REFUSED_SECONDS = 5
KEEPALIVE_SECONDS = 30  # MQTT keep-alive: paho pings a quiet connection, the broker drops one silent for 1.5 times this
# A nack says the broker could not take the message for now: on a cluster, a quorum queue whose
# leader is being elected again after its node died. Nacked messages are republished after this
# pause, doubling up to NACK_RETRY_MOST_SECONDS, for as long as --give-up allows, on a new
# connection: RabbitMQ 3.10 nacks every later publish of a channel that met the queue without a
# leader, long after the new one is elected, where a new channel's are confirmed.
NACK_RETRY_SECONDS = 0.25
NACK_RETRY_MOST_SECONDS = 8.0


def make_message(status, device_id=None):
    """One message in the documented format: (message_id, body)."""
    message_id = str(uuid.uuid4())
    fields = {"status": status, "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
              .replace("+00:00", "Z"), "message_id": message_id}
    if device_id:
        fields["device_id"] = device_id
    return message_id, json.dumps(fields).encode()


class ConfirmProgress:
    """A progress bar on stderr: confirmed messages out of `total`, their rate (messages/s),
    and the unconfirmed (and refused, if any) count.

    update() is called from the thread that sees confirms, once per confirm batch; between
    redraws, at most every `interval` seconds, it costs one clock reading, so the bar does
    not slow publishing. Calls from two threads at once are safe: the one that finds the
    bar busy skips its redraw, as the next one shows its confirms too.
    """

    def __init__(self, total, interval=0.2):
        # miniters=0: redraw when update() asks, even with no new confirm (unconfirmed changed).
        self._bar = tqdm(total=total, desc="confirmed", unit="msg", file=sys.stderr, dynamic_ncols=True,
                         mininterval=0, miniters=0)
        self._interval = interval
        self._next_redraw = 0.0
        self._lock = threading.Lock()

    def update(self, publisher, final=False):
        now = time.monotonic()
        if (now < self._next_redraw and not final) or not self._lock.acquire(blocking=final):
            return
        try:
            self._next_redraw = now + self._interval
            postfix = {"unconfirmed": publisher.unconfirmed}
            if publisher.refused:
                postfix["refused"] = publisher.refused
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(publisher.confirmed - self._bar.n)
        finally:
            self._lock.release()

    def close(self, publisher):
        self.update(publisher, final=True)
        self._bar.close()


class AmqpPublisher:
    """Publishes with a window of unconfirmed messages over pika's asynchronous connection.

    `messages` is an iterator of (message_id, status, body) to publish instead of random
    statuses timestamped now (a replay of buffered readings, for one); publishing ends when
    it runs out or `count` messages were taken from it, whichever comes first. `progress`, a
    ConfirmProgress or None, is told of each confirm batch; each confirmed message is logged
    at `confirm_log_level`.
    """

    progress = None
    confirm_log_level = logging.INFO

    def __init__(self, amqp_url, count, interval, window, device_id, give_up_seconds, messages=None):
        # Several URLs (comma-separated): the nodes of a cluster, from the first that answers on.
        self._nodes = config.amqp_parameters(amqp_url)
        for parameters in self._nodes:
            parameters.heartbeat = config.RABBITMQ_HEARTBEAT_SECONDS
            parameters.blocked_connection_timeout = 60
        self._node = 0  # index of the node connected to, or tried next
        self._attempts = 0  # connections tried since the last confirm (a node that opens and closes at once gets none)
        self._remaining = count  # None: until stopped
        self._interval = interval
        self._window = window
        self._messages = messages if messages is not None else self._random_messages(device_id)
        self._give_up_seconds = give_up_seconds
        self._connection = None
        self._channel = None
        self._next_tag = 1
        self._unconfirmed = OrderedDict()  # delivery tag -> (message_id, status, body)
        self._to_resend = deque()  # (message_id, status, body) from a lost connection
        self._returned = set()
        self._nacked = deque()  # (message_id, status, body) to republish after a pause
        self._nacked_since = None  # first nack since the last ack
        self._nack_delay = NACK_RETRY_SECONDS
        self._retry_scheduled = False
        self._stopping = False
        self._scheduled = False
        self._next_due = 0.0  # monotonic time at which the next message is due (--interval)
        self._down_since = None
        self._delay = 1.0
        self.published = self.confirmed = self.refused = 0
        self.connection_refused = False

    @property
    def unconfirmed(self):
        return len(self._unconfirmed) + len(self._to_resend) + len(self._nacked)

    def run(self):
        while True:
            self._connection = pika.SelectConnection(
                self._nodes[self._node], on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_connection_open_error, on_close_callback=self._on_connection_closed)
            self._connection.ioloop.start()
            if self._finished() or self.connection_refused:
                return
            if self._stopping:
                LOG.error("stopped while RabbitMQ is unreachable: %d messages unconfirmed", self.unconfirmed)
                return
            if self._down_since is not None and time.monotonic() - self._down_since > self._give_up_seconds:
                LOG.error("gave up: RabbitMQ unreachable for %ds, %d messages unconfirmed",
                          self._give_up_seconds, self.unconfirmed)
                return
            # The next node at once; a pause only once every node has been tried since the last
            # confirm (with one node, before each attempt).
            self._attempts += 1
            self._node = (self._node + 1) % len(self._nodes)
            if self._attempts % len(self._nodes):
                continue
            delay = self._delay * random.uniform(0.5, 1.5)
            LOG.info("reconnecting in %.1fs", delay)
            deadline = time.monotonic() + delay
            while not self._stopping and time.monotonic() < deadline:  # Ctrl-C ends the wait
                time.sleep(0.1)
            self._delay = min(self._delay * 2, 30.0)

    def stop(self, *_):
        """Publish nothing more; finish once every message published is confirmed. Safe from a
        signal handler or another thread: it only sets a flag and wakes the ioloop."""
        if not self._stopping:
            LOG.info("stopping: waiting for %d confirms", len(self._unconfirmed))
        self._stopping = True
        if self._connection and self._connection.is_open:
            self._connection.ioloop.add_callback_threadsafe(self._close_when_finished)

    def _finished(self):
        return (self._remaining == 0 or self._stopping) and not self._unconfirmed and not self._to_resend \
            and not self._nacked

    @staticmethod
    def _random_messages(device_id):
        while True:
            status = random.randrange(7)
            message_id, body = make_message(status, device_id)
            yield message_id, status, body

    # -- connection and channel -------------------------------------------------

    def _on_connection_open(self, connection):
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection, error):
        certificate_error = next((attempt.exception for attempt in getattr(error, "exceptions", ())
                                  if isinstance(getattr(attempt, "exception", None), ssl.SSLCertVerificationError)), None)
        # pika says "probably" of any connection closed while it opens, a node going down included:
        # only the broker's refusals (403 ACCESS_REFUSED, a vhost not found or not allowed) are for good.
        if isinstance(error, (ProbableAuthenticationError, ProbableAccessDeniedError)) and any(
                refusal in str(error) for refusal in ("ACCESS_REFUSED", "not found", "refused for user")):
            LOG.error("RabbitMQ refused the credentials in RABBITMQ_URL: %s", error)
            self.connection_refused = True  # retrying cannot help: stop, and exit 1
        elif certificate_error:
            LOG.error("RabbitMQ's certificate failed verification against the CA of RABBITMQ_URL: %s", certificate_error)
            self.connection_refused = True  # nor with the same CA
        else:
            self._went_down(f"cannot connect to RabbitMQ at {config.node_name(self._nodes[self._node])} ({error!r})")
        connection.ioloop.stop()

    def _on_connection_closed(self, connection, reason):
        self._channel = None
        if not self._finished():
            self._went_down(f"connection to RabbitMQ at {config.node_name(self._nodes[self._node])} lost ({reason})")
        connection.ioloop.stop()

    def _went_down(self, why):
        if self._down_since is None:
            self._down_since = time.monotonic()
            LOG.warning("%s; %d messages unconfirmed will be republished", why, len(self._unconfirmed))
        self._to_resend.extendleft(reversed(self._unconfirmed.values()))
        self._to_resend.extend(self._nacked)  # their timer died with the connection's ioloop
        self._nacked.clear()
        self._retry_scheduled = False
        self._unconfirmed.clear()
        self._returned.clear()

    def _on_channel_open(self, channel):
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        # Passive: the user `publisher` may publish, not declare (rabbitmq/definitions.json declares
        # the exchange). A broker without it closes the channel with 404, and this publisher retries.
        channel.exchange_declare(config.EXCHANGE, passive=True,
                                 callback=lambda _: channel.confirm_delivery(self._on_confirm,
                                                                             callback=self._on_confirm_mode))

    def _on_confirm_mode(self, _):
        node = config.node_name(self._nodes[self._node])
        if self._down_since is not None:
            LOG.info("connected to RabbitMQ at %s again after %.1fs", node, time.monotonic() - self._down_since)
        else:
            LOG.info("connected to RabbitMQ at %s, publishing to %s with key %s", node, config.EXCHANGE,
                     config.ROUTING_KEY)
        self._down_since = None
        self._next_tag = 1
        self._next_due = time.monotonic()
        self._scheduled = False  # a timer of the connection before died with its ioloop
        self._publish_more()

    def _on_channel_closed(self, channel, reason):
        if isinstance(reason, ChannelClosedByBroker) and reason.reply_code == 403 and not self._finished():
            # A topic permission refuses this routing key: every message would be refused again.
            refused = self.unconfirmed
            LOG.error("RabbitMQ refused to publish to %s with key %s: %s; %d messages refused",
                      config.EXCHANGE, config.ROUTING_KEY, reason.reply_text, refused)
            self.refused += refused
            self._unconfirmed.clear()
            self._to_resend.clear()
            self._nacked.clear()
            self._remaining = 0
        elif isinstance(reason, ChannelClosedByBroker) and reason.reply_code == 404 and self._down_since is None:
            LOG.warning("exchange %s does not exist (rabbitmq/definitions.json declares it: scripts/services up, "
                        "or server.py); retrying", config.EXCHANGE)
        elif not self._finished() and not isinstance(reason, pika.exceptions.ChannelClosedByClient):
            LOG.warning("channel closed: %s", reason)
        if self._connection.is_open:
            self._connection.close()

    # -- publishing ---------------------------------------------------------------

    def _publish_more(self, from_timer=False):
        if from_timer:
            self._scheduled = False
        if self._channel is None or not self._channel.is_open:
            return
        # Nacked messages waiting to be published again hold their place: a channel that nacks
        # everything must not be fed the whole stream meanwhile.
        while len(self._unconfirmed) + len(self._nacked) < self._window:
            if self._to_resend:
                message = self._to_resend.popleft()
            elif self._remaining != 0 and not self._stopping and time.monotonic() >= self._next_due:
                message = next(self._messages, None)
                if message is None:
                    self._remaining = 0
                    break
                if self._remaining is not None:
                    self._remaining -= 1
                # Due times, not sleeps between messages: a late timer publishes all that fell due.
                self._next_due += self._interval
            else:
                break
            self._publish(message)
        # A full window waits for confirms (which call this again), not for a timer.
        if (self._interval > 0 and self._remaining != 0 and not self._stopping and not self._scheduled
                and len(self._unconfirmed) + len(self._nacked) < self._window):
            self._scheduled = True
            self._connection.ioloop.call_later(max(0.0, self._next_due - time.monotonic()),
                                               lambda: self._publish_more(from_timer=True))
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
            message = message_id, status, _ = self._unconfirmed.pop(tag)
            if message_id in self._returned:
                self._returned.discard(message_id)
                self.refused += 1
                LOG.error("unroutable: no queue is bound to %s with key %s, nor to its alternate exchange (start "
                          "server.py once to create %s); message %s not delivered", config.EXCHANGE,
                          config.ROUTING_KEY, config.QUEUE, message_id)
            elif not acked:
                self._nacked.append(message)
            else:
                self.confirmed += 1
                self._delay = 1.0  # a healthy connection resets the backoff
                self._attempts = 0
                self._nacked_since = None
                self._nack_delay = NACK_RETRY_SECONDS
                LOG.log(self.confirm_log_level, "confirmed status=%d message_id=%s", status, message_id)
        if self._nacked and not self._retry_scheduled:
            if self._nacked_since is None:
                self._nacked_since = time.monotonic()
                LOG.warning("RabbitMQ refused messages for now (nack: on a cluster, a queue electing a new "
                            "leader); republishing them")
            self._retry_scheduled = True
            self._connection.ioloop.call_later(self._nack_delay, self._republish_nacked)
            self._nack_delay = min(self._nack_delay * 2, NACK_RETRY_MOST_SECONDS)
        if self.progress:
            self.progress.update(self)
        self._publish_more()

    def _republish_nacked(self):
        self._retry_scheduled = False
        if self._nacked_since is not None and time.monotonic() - self._nacked_since > self._give_up_seconds:
            LOG.error("RabbitMQ has refused every message (nack) for %ds: %d messages refused",
                      self._give_up_seconds, len(self._nacked))
            self.refused += len(self._nacked)
            self._remaining = 0
            self._nacked.clear()
            self._publish_more()
        elif self._connection.is_open:
            LOG.info("republishing %d nacked messages on a new connection", len(self._nacked))
            self._down_since = time.monotonic()  # a reconnection asked for, not an outage to report
            self._connection.close()  # _went_down() hands them to the next connection

    def _close_when_finished(self):
        if self._finished() and self._connection.is_open:
            self._connection.close()


class MqttPublisher:
    """Publishes the same JSON over MQTT (QoS 1 by default) through RabbitMQ's MQTT plugin.

    MQTT 3.1.1 has no message properties, so the message_id travels in the body. paho keeps
    up to --window messages in flight and resends unacknowledged ones after a reconnect.
    `progress` and `confirm_log_level` as for AmqpPublisher; PUBACKs arrive one by one.
    """

    progress = None
    confirm_log_level = logging.INFO

    def __init__(self, count, interval, window, device_id, qos, give_up_seconds):
        self._remaining = count
        self._interval = interval
        self._device_id = device_id
        self._qos = qos
        self._window = window
        self._give_up_seconds = give_up_seconds
        # devices/<id>/status arrives as routing key devices.<id>.status; without an id, the classic topic.
        self._topic = f"devices/{device_id}/status" if device_id else config.ROUTING_KEY
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"client-py-{uuid.uuid4().hex[:12]}",
                                   protocol=mqtt.MQTTv311, clean_session=True)
        self._client.username_pw_set(config.MQTT_USERNAME, config.MQTT_PASSWORD)
        if config.MQTT_TLS_CA:  # the broker's certificate verified against it, its name against MQTT_HOST
            self._client.tls_set(ca_certs=config.MQTT_TLS_CA)
        self._client.max_inflight_messages_set(window)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._next_node
        self._client.on_publish = self._on_publish
        self._lock = threading.Lock()
        self._in_flight = {}  # paho mid -> (message_id, status)
        self._early_acks = set()
        self._down_since = None
        self._stopping = False
        self.published = self.confirmed = self.refused = 0
        self.connection_refused = False
        self._confirmed_at_connect = 0
        self._connected_at = 0.0
        self._closed_at_publish = 0  # connections in a row that the broker closed before any PUBACK

    @property
    def unconfirmed(self):
        return len(self._in_flight)

    @property
    def _topic_refused(self):
        # MQTT 3.1.1 cannot refuse one PUBLISH: RabbitMQ closes the connection when a topic permission
        # refuses it (a device publishing to another device's topic). Past a few such connections in a
        # row, resending would only repeat it.
        return self._closed_at_publish >= TOPIC_REFUSED_CONNECTIONS

    def run(self):
        for host, port in config.MQTT_HOSTS:  # the first that answers
            try:
                self._client.connect(host, port, keepalive=KEEPALIVE_SECONDS)
                break
            except OSError as error:
                last = (host, port) == config.MQTT_HOSTS[-1]
                LOG.log(logging.ERROR if last else logging.WARNING, "cannot connect to MQTT at %s:%d: %s%s",
                        host, port, error, "" if last else "; trying the next node")
        else:
            self.refused = max(self._remaining or 0, 1)
            return
        self._client.loop_start()
        try:
            while self._remaining != 0 and not self._stopping and not self._gave_up():
                status = random.randrange(7)
                message_id, body = make_message(status, self._device_id)
                info = self._client.publish(self._topic, body, qos=self._qos)
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    LOG.error("paho refused message %s: %s", message_id, mqtt.error_string(info.rc))
                    self.refused += 1
                else:
                    self.published += 1
                    self._track(info.mid, (message_id, status))
                if self._remaining is not None:
                    self._remaining -= 1
                if self._interval:
                    time.sleep(self._interval)
                else:
                    self._wait(lambda: len(self._in_flight) < 10 * self._window)
            self._wait(lambda: not self._in_flight or self._gave_up())
            if self._topic_refused:
                LOG.error("RabbitMQ closed the connection at each publish to %s, %d times without a PUBACK: a topic "
                          "permission refuses it (a device may publish to devices/<its user name>/status only); "
                          "%d messages refused", self._topic, self._closed_at_publish, len(self._in_flight))
                self.refused += len(self._in_flight)
                self._in_flight.clear()
            elif self._in_flight:
                LOG.error("gave up: %d messages unconfirmed", len(self._in_flight))
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def stop(self, *_):
        if not self._stopping:
            LOG.info("stopping: waiting for %d PUBACKs", len(self._in_flight))
        self._stopping = True

    def _wait(self, condition):
        while not condition():
            time.sleep(0.005)

    def _gave_up(self):
        return self.connection_refused or self._topic_refused or (self._down_since is not None
                                      and time.monotonic() - self._down_since > self._give_up_seconds)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            LOG.error("MQTT broker refused the connection: %s (check MQTT_USERNAME/MQTT_PASSWORD)", reason_code)
            self._down_since = self._down_since or time.monotonic()
            # CONNACK 4 and 5 of MQTT 3.1.1: retrying with the same credentials cannot help.
            self.connection_refused = reason_code in ("Bad user name or password", "Not authorized")
            if self.connection_refused:
                client.disconnect()  # no reconnecting
            return
        if self._down_since is not None:
            LOG.info("connected to MQTT at %s:%d again after %.1fs", client.host, client.port,
                     time.monotonic() - self._down_since)
        else:
            LOG.info("connected to MQTT%s at %s:%d, publishing to topic %s (QoS %d)", " over TLS" if config.MQTT_TLS_CA
                     else "", client.host, client.port, self._topic, self._qos)
        self._down_since = None
        self._confirmed_at_connect = self.confirmed
        self._connected_at = time.monotonic()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        # Closed soon after a CONNACK, messages in flight and not one PUBACK: refused at publish.
        if (self._in_flight and self.confirmed == self._confirmed_at_connect
                and time.monotonic() - self._connected_at < TOPIC_REFUSED_SECONDS):
            self._closed_at_publish += 1
        else:
            self._closed_at_publish = 0
        if self._topic_refused:
            client.disconnect()  # no reconnecting
            return
        if self._in_flight or self._remaining != 0:
            if self._down_since is None:
                LOG.warning("MQTT connection to %s:%d lost (%s); %d messages in flight will be resent",
                            client.host, client.port, reason_code, len(self._in_flight))
            self._down_since = self._down_since or time.monotonic()

    def _next_node(self, client, userdata=None):
        """paho reconnects to client.host: after a failed attempt, with several MQTT_HOST, the next one.
        connect_async() is paho's way to change it between attempts (its host setter refuses to while
        it is reconnecting); the messages in flight are resent as after any reconnection."""
        if len(config.MQTT_HOSTS) > 1:
            here = (client.host, client.port)
            index = config.MQTT_HOSTS.index(here) if here in config.MQTT_HOSTS else -1
            host, port = config.MQTT_HOSTS[(index + 1) % len(config.MQTT_HOSTS)]
            LOG.debug("cannot connect to MQTT at %s:%d; trying %s:%d", *here, host, port)
            client.connect_async(host, port, keepalive=KEEPALIVE_SECONDS)

    def _track(self, mid, message):
        # The PUBACK can arrive (on paho's thread) before publish() has returned the mid.
        with self._lock:
            if mid in self._early_acks:
                self._early_acks.discard(mid)
            else:
                self._in_flight[mid] = message
                return
        self._confirmed(message)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._lock:
            message = self._in_flight.pop(mid, None)
            if message is None:
                self._early_acks.add(mid)
                return
        self._confirmed(message)

    def _confirmed(self, message):
        self.confirmed += 1
        LOG.log(self.confirm_log_level, "confirmed status=%d message_id=%s", message[1], message[0])
        if self.progress:
            self.progress.update(self)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Publish device status messages (0..6) to RabbitMQ.")
    parser.add_argument("--count", type=int, default=None, help="publish exactly N messages, then exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages; 0 for as fast as possible")
    parser.add_argument("--device-id", default=None, help="device id put in every message (and MQTT topic)")
    parser.add_argument("--transport", choices=("amqp", "mqtt"), default="amqp")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="MQTT QoS (1 is acknowledged)")
    parser.add_argument("--window", type=int, default=1000, help="messages awaiting confirm at once")
    parser.add_argument("--give-up", type=float, default=120.0, help="seconds without RabbitMQ before giving up")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: otherwise, with --count on a terminal (stderr), a bar of confirmed "
                             "messages, their rate and the unconfirmed count stands for the line per confirmed "
                             "message (--log-level DEBUG shows those too); logs and pipes never get a bar")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 0 or args.interval < 0 or args.window < 1:
        parser.error("--count, --interval must not be negative and --window must be at least 1")
    if args.device_id is not None and not DEVICE_ID.fullmatch(args.device_id):
        parser.error(f"--device-id must be {DEVICE_ID_RULE}")
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")  # libraries: warnings only
    LOG.setLevel(args.log_level)
    logging.getLogger("pika").setLevel(logging.CRITICAL)

    if args.transport == "mqtt":
        if not config.MQTT_USERNAME:
            parser.error("MQTT logs in as a device: set MQTT_USERNAME and MQTT_PASSWORD to a device's "
                         "(scripts/services add-device NAME)")
        if config.REQUIRE_TLS and not config.MQTT_TLS_CA:
            parser.error("REQUIRE_TLS=1 asks for MQTT over TLS: set MQTT_TLS_CA (or TLS_CA_FILE) to the broker's CA")
        # A device may publish to devices/<its user name>/status only (its topic permission); the
        # user name may start with "<vhost>:", RabbitMQ's way of naming a vhost over MQTT.
        device_id = args.device_id or config.MQTT_USERNAME.rpartition(":")[2]
        publisher = MqttPublisher(args.count, args.interval, args.window, device_id, args.qos, args.give_up)
    else:
        publisher = AmqpPublisher(config.rabbitmq_url("publisher"), args.count, args.interval, args.window,
                                  args.device_id, args.give_up)
    signal.signal(signal.SIGINT, publisher.stop)
    signal.signal(signal.SIGTERM, publisher.stop)
    started = time.monotonic()
    # Logs and pipes (what tests and benchmarks read) get every line and no bar, as without one.
    if args.count and not args.no_progress and sys.stderr.isatty():
        publisher.confirm_log_level = logging.DEBUG  # thousands of lines a second would bury the bar
        with logging_redirect_tqdm():  # other lines print above the bar, not through it
            publisher.progress = ConfirmProgress(args.count)
            try:
                publisher.run()
            finally:
                publisher.progress.close(publisher)
    else:
        publisher.run()
    elapsed = time.monotonic() - started
    LOG.info("done: %d published, %d confirmed, %d refused, %d unconfirmed in %.1fs (%.0f/s)",
             publisher.published, publisher.confirmed, publisher.refused, publisher.unconfirmed,
             elapsed, publisher.confirmed / elapsed if elapsed else 0)
    return 0 if publisher.refused == 0 and publisher.unconfirmed == 0 and not publisher.connection_refused else 1


if __name__ == "__main__":
    sys.exit(main())
