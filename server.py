"""Consume status messages from RabbitMQ and store each one in MongoDB, once.

    python server.py                  # one process per core (SERVER_PROCESSES)
    python server.py --processes 1

The queue is durable and named, so nothing published while the server is down
is lost, and several servers share its work: its own processes, and others.
Messages are written in batches by writer threads and acknowledged (one
`multiple` ack per batch) only after the write, so a crash anywhere means
redelivery, never loss; a redelivered message is stored once because its
message_id is the document's _id. Each batch also records the counts of the
documents it created, and one process folds those records into the counts the
API reads (counts.py). An invalid message goes to the dead-letter queue with
its reason and is never retried, and so does a message that no binding
matched, which the exchange's alternate exchange (set by a policy) kept.
With METRICS_PORT, the first process serves Prometheus metrics for all of them.
"""

import argparse
import logging
import os
import queue
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import pika
import pymongo
from pika.adapters.utils import io_services_utils
from pika.exceptions import (AMQPConnectionError, ChannelClosedByBroker, ConnectionBlockedTimeout, ConnectionClosedByBroker,
                             ProbableAccessDeniedError, ProbableAuthenticationError)
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

import config
import counts
from messages import INVALID_KINDS, InvalidMessage, routing_key_device_id, to_document

LOG = logging.getLogger("server")

DEVICE_ROUTING_KEY = "devices.*.status"  # MQTT topic devices/<id>/status
DEAD_LETTER_EXCHANGE = f"{config.QUEUE}.dlx"
DEAD_LETTER_QUEUE = f"{config.QUEUE}.dead"
# A message that no binding of EXCHANGE matches goes to its alternate exchange, named by the
# policy of rabbitmq/definitions.json, and from there to a queue of this server's.
UNROUTABLE_EXCHANGE = f"{config.EXCHANGE}.unroutable"
UNROUTABLE_QUEUE = f"{config.QUEUE}.unroutable"
REASON_HEADER = "x-rejected-reason"
# RabbitMQ closes the connection with 541 when it cannot send a delivery: one whose routing
# key is longer than the 255 bytes of an AMQP short string (an MQTT topic may be longer).
INTERNAL_ERROR = 541
# After a 541, messages are taken one at a time so that only the one that cannot be sent is
# returned (and counted towards its delivery limit), until no delivery has failed for this long.
ONE_AT_A_TIME_SECONDS = 10
# A message that kills the server before it is acknowledged comes back with a growing
# delivery count; after this many deliveries the broker dead-letters it.
DELIVERY_LIMIT = 20
# On a cluster every queue of this server is a quorum queue with a member on three nodes (on fewer,
# one on each): a message survives the loss of any one node, and the queue stays available while
# a majority of its members runs. The dead-letter queue too, since its messages are the ones that
# need a person: an earlier version's classic one is moved over (_migrate_classic_dead_letter_queue).
QUORUM_GROUP_SIZE = 3
QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-quorum-initial-group-size": QUORUM_GROUP_SIZE,
    "x-delivery-limit": DELIVERY_LIMIT,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
}
DEAD_LETTER_QUEUE_ARGUMENTS = {"x-queue-type": "quorum", "x-quorum-initial-group-size": QUORUM_GROUP_SIZE}
BATCH_SIZE = 2000
# A batch is written once it is full or this old. Each batch costs the store three writes (its
# intent, its documents, its record) and leaves two documents in the counts log that every count
# reads until they are folded: at 1,000 msg/s, 200 ms batches make that log a quarter of what 50 ms
# ones did (a count's read of it went from 19 to 8 ms), for 150 ms more before a message is stored.
FLUSH_SECONDS = 0.2
# A write spends most of its time waiting for MongoDB, so batches are written by several
# threads at once; they are still acknowledged in the order they were received.
WRITERS = 3
# The broker sends only while the window has room: besides the batches being written and
# waiting, it holds one that keeps filling (past BATCH_SIZE while the writers are busy,
# so a backlog is written in fewer, bigger batches) and the deliveries on their way.
PREFETCH = 10 * BATCH_SIZE
# pika reads at most _MAX_RECV_BYTES (4,096) from its socket at a time, about 16 deliveries of a
# status message, and no connection parameter sets it. 16 KiB reads cut server.py's CPU per
# message by a quarter when draining a backlog (bench/ingest.py); larger ones save less, since
# pika copies what is left of its buffer after every frame it decodes.
RECV_BYTES = 16384
NAMESPACE_NOT_FOUND, INDEX_NOT_FOUND, AUTHENTICATION_FAILED = 26, 27, 18
SHUTDOWN_SECONDS = 5
# The `reason` label of the dead-letter metric: the rule a message broke, never the reason's text.
DEAD_LETTER_KINDS = INVALID_KINDS + ("unroutable", "store_refused", "server_error")
# prometheus_client reads it on import: where every process of one server.py keeps its metrics.
MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"


io_services_utils._AsyncTransportBase._MAX_RECV_BYTES = RECV_BYTES


class ConsumerCancelled(Exception):
    """RabbitMQ cancelled the consumer (consumer_cancel_notify): its queue was deleted, or moved."""


class DeadLetterNotTaken(Exception):
    """RabbitMQ did not take a dead letter: returned (DEAD_LETTER_QUEUE or its binding is gone) or
    nacked (on a cluster, the queue without a leader for a moment). The connection is opened again."""


class Metrics:
    """What a server.py process measures, for Prometheus (README "Metrics"). With METRICS_PORT,
    every process of one server.py keeps its values in files of MULTIPROCESS_DIRECTORY and the
    first one serves their sums (prometheus_client's multiprocess mode); without, each keeps
    them in memory, unread."""

    def __init__(self):
        # Imported here, not at the top: prometheus_client chooses on import between memory and
        # files, from MULTIPROCESS_DIRECTORY, which main() sets first. No registry: the files are
        # read by MultiProcessCollector, and one process may build several servers (bench/).
        from prometheus_client import Counter, Gauge, Histogram

        self.received = Counter("status_server_messages_received_total", "Deliveries taken from the queue and "
                                "its .unroutable queue, redeliveries included", registry=None)
        self.stored = Counter("status_server_messages_stored_total", "Messages written to MongoDB and acknowledged",
                              registry=None)
        self.duplicates = Counter("status_server_messages_duplicate_total", "Valid messages whose message_id was "
                                  "stored already: acknowledged, not stored again", registry=None)
        self.dead_lettered = Counter("status_server_messages_dead_lettered_total", "Messages moved to the "
                                     "dead-letter queue, by the kind of their reason", ["reason"], registry=None)
        for kind in DEAD_LETTER_KINDS:
            self.dead_lettered.labels(kind)  # every series from the start, so that rate() sees the first one
        self.batch_write_seconds = Histogram("status_server_batch_write_duration_seconds", "Time MongoDB took "
                                             "to take one batch and its counts record", registry=None)
        self.last_stored = Gauge("status_server_last_stored_timestamp_seconds", "Unix time of the last "
                                 "acknowledged write of a new message (0: none yet)", multiprocess_mode="max",
                                 registry=None)
        # Reachable only if every live process reaches it.
        self.rabbitmq_up = Gauge("status_server_rabbitmq_up", "1 while connected to RabbitMQ",
                                 multiprocess_mode="livemin", registry=None)
        self.mongodb_up = Gauge("status_server_mongodb_up", "1 while the last write to MongoDB (or the start-up "
                                "check) succeeded", multiprocess_mode="livemin", registry=None)

    @staticmethod
    def serve(host, port):
        """GET /metrics on host:port, from a thread: the sums over every process's files.
        Raises OSError when the port is taken."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        start_http_server(port, addr=host, registry=registry)

    @staticmethod
    def process_gone(pid):
        """Drops the gauges of a process that exited; its counters stay in the sums."""
        if MULTIPROCESS_DIRECTORY in os.environ:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid)


class StatusServer:
    def __init__(self, collection, amqp_url=None, fault_hook=None, fold=True, metrics=None):
        self._collection = collection
        self._metrics = metrics or Metrics()
        self._fold = fold  # one process of a server.py folds the counts; its children do not
        # Unless RABBITMQ_URL says otherwise, as the user `pipeline` (rabbitmq/definitions.json).
        # Several URLs: the nodes of a cluster, tried in turn from the first.
        self._nodes = config.amqp_parameters(amqp_url or config.rabbitmq_url("pipeline"))
        self._node = 0  # index of the node connected to, or tried first next time
        for parameters in self._nodes:
            # pika answers heartbeats only inside process_data_events: the main thread never
            # blocks outside it for more than a fraction of this (one delivery burst).
            parameters.heartbeat = config.RABBITMQ_HEARTBEAT_SECONDS
            # A memory or disk alarm blocks a connection that publishes (a dead letter) and stops
            # reading from it, acknowledgements included: past this pika gives up on it.
            parameters.blocked_connection_timeout = config.RABBITMQ_BLOCKED_SECONDS
        self._fault_hook = fault_hook or (lambda point, detail=None: None)
        self._batch_writer = counts.BatchWriter(collection, fault_hook=self._fault_hook,
                                                timeout_seconds=config.MONGO_WRITE_TIMEOUT_SECONDS)
        self._stopping = False
        self._down_since = None  # when RabbitMQ went away, to log the outage once
        self._ever_connected = False
        self._connection = None
        self._channel = None
        self._cancelled_by_broker = False
        self._told_of_classic_queue = False
        self._batch = []  # [(method, properties, body, document)] not yet handed to the writers
        self._batch_started = 0.0
        # Delivery tags belong to one connection: a batch written after its connection was
        # lost must not be acknowledged on the next one.
        self._generation = 0
        self._to_write = queue.Queue(maxsize=WRITERS)
        self._written = queue.Queue()
        self._handed = 0  # batches of this generation handed to the writers (the next one's sequence number)
        self._next_to_acknowledge = 0
        self._written_early = {}  # sequence -> (batch, failures): written, waiting for every earlier batch
        self._failing_writers = 0  # writers retrying a failed write, to log an outage once
        self._recovered_at = float("-inf")  # when the last outage ended
        self._outage_lock = threading.Lock()
        self._one_at_a_time = False  # after a 541, until ONE_AT_A_TIME_SECONDS pass without one
        self._failed_deliveries = 0  # 541s since the last healthy connection
        self._stored = 0
        self._dead = 0
        self._unroutable = 0
        self._received = 0  # deliveries not yet added to the metric (once per burst: cheaper)

    # -- lifecycle -------------------------------------------------------------

    def run(self):
        """Consume until stop(); reconnect to RabbitMQ whenever it goes away."""
        self._create_indexes()
        writers = [threading.Thread(target=self._write_batches, name=f"writer-{n}", daemon=True) for n in range(WRITERS)]
        for writer in writers:
            writer.start()
        folding = threading.Event()  # set: stop folding
        if self._fold:
            threading.Thread(target=counts.Folder(self._collection).run, args=(folding,), name="folder", daemon=True).start()
        delay = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._connect()
                if self._consume():
                    continue  # back to the whole prefetch window, at once
            except ConnectionBlockedTimeout:
                self._went_down(f"RabbitMQ blocked the connection for more than {config.RABBITMQ_BLOCKED_SECONDS:g}s "
                                "(a memory or disk alarm)")
            except (ConnectionClosedByBroker, AMQPConnectionError, OSError) as error:  # OSError: a name that does not resolve
                if self._stopping:
                    break
                if getattr(error, "reply_code", None) == INTERNAL_ERROR:
                    self._delivery_failed(error)
                    continue  # the broker is up: at once, one message at a time
                node = config.node_name(self._nodes[self._node])  # the last one tried
                self._went_down(f"RabbitMQ connection lost at {node} ({error!r})" if self._ever_connected
                                else f"cannot connect to RabbitMQ at {node} ({error!r})")
            except ConsumerCancelled:
                self._went_down(f"RabbitMQ cancelled the consumer of {config.QUEUE} (its queue deleted?)")
            except DeadLetterNotTaken as error:
                self._went_down(str(error))
            except ChannelClosedByBroker as error:
                if error.reply_code == INTERNAL_ERROR:
                    self._delivery_failed(error)
                    continue
                if _is_consumer_timeout(error):
                    # Our acknowledgement came too late; the broker requeued what we held.
                    self._went_down(f"RabbitMQ closed the channel: a delivery stayed unacknowledged "
                                    f"past its consumer_timeout ({error.reply_text})")
                elif error.reply_code in (403, 404, 406):
                    LOG.error("RabbitMQ refused the topology: %s%s", error, " (rabbitmq/definitions.json declares "
                              "status_exchange: scripts/services up)" if error.reply_code == 404 else "")
                    raise SystemExit(1) from None
                else:
                    self._went_down(f"RabbitMQ closed the channel ({error})")
            finally:
                self._forget_unacknowledged()
            if time.monotonic() - started > 30:
                delay = 1.0  # a healthy run resets the backoff
            self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 30.0)
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        while not self._to_write.empty():  # unacknowledged anyway: they will be redelivered
            self._to_write.get_nowait()
        for _ in writers:
            self._to_write.put_nowait(None)
        for writer in writers:
            writer.join(timeout=max(0.0, deadline - time.monotonic()))
        folding.set()
        LOG.info("stopped: %d stored, %d dead-lettered (%d of them unroutable)", self._stored, self._dead,
                 self._unroutable)

    def _went_down(self, why):
        self._metrics.rabbitmq_up.set(0)
        self._node = (self._node + 1) % len(self._nodes)  # a lost node is tried last
        if self._down_since is None:
            self._down_since = time.monotonic()
            LOG.warning("%s; reconnecting", why)
        else:
            LOG.debug("%s; still reconnecting", why)

    def _delivery_failed(self, error):
        self._failed_deliveries += 1
        if self._one_at_a_time:
            LOG.debug("RabbitMQ could not deliver a message again (%s); %d failures", error, self._failed_deliveries)
        else:
            self._one_at_a_time = True
            LOG.error("RabbitMQ closed the connection with %d %s: it cannot deliver a message of %s or %s, most "
                      "likely one whose routing key is longer than the 255 bytes AMQP allows (an MQTT topic that no "
                      "topic permission refused); taking one message at a time so that only it is returned, until "
                      "the broker dead-letters it to %s after %d deliveries", error.reply_code, error.reply_text,
                      config.QUEUE, UNROUTABLE_QUEUE, DEAD_LETTER_QUEUE, DELIVERY_LIMIT)
        self._sleep(0.1)  # not a busy loop, should the cause be another

    def stop(self, *_):
        if not self._stopping:
            LOG.info("stopping: finishing the messages in hand")
        self._stopping = True

    def _sleep(self, seconds):
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _connect(self):
        """Connects to the first node that answers, from self._node on; raises what the last one did."""
        for attempt in range(len(self._nodes)):
            try:
                self._connect_to(self._nodes[self._node])
                return
            except (AMQPConnectionError, OSError) as error:
                if attempt == len(self._nodes) - 1:
                    raise
                LOG.debug("cannot connect to RabbitMQ at %s (%r); trying the next node",
                          config.node_name(self._nodes[self._node]), error)
                self._node = (self._node + 1) % len(self._nodes)

    def _connect_to(self, parameters):
        try:
            self._connection = pika.BlockingConnection(parameters)
        except ProbableAuthenticationError as error:
            if "ACCESS_REFUSED" not in str(error):  # a node that went down while the connection opened
                raise
            LOG.error("RabbitMQ refused the credentials in RABBITMQ_URL: %s", error)
            raise SystemExit(1) from None
        except ProbableAccessDeniedError as error:
            # pika says so of any connection closed while it is opened; only these two are for good.
            if "not found" not in str(error) and "refused for user" not in str(error):
                raise
            LOG.error("RabbitMQ refused access to the vhost of RABBITMQ_URL: %s", error)
            raise SystemExit(1) from None
        except ssl.SSLCertVerificationError as error:  # retrying with the same CA cannot help either
            LOG.error("RabbitMQ's certificate failed verification against the CA of RABBITMQ_URL: %s", error)
            raise SystemExit(1) from None
        self._channel = self._connection.channel()
        self._cancelled_by_broker = False
        self._channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        if self._declare_topology(self._channel) and self._fold:  # one process of a server.py, not each child
            self._migrate_classic_dead_letter_queue(self._connection)
        self._channel.confirm_delivery()  # dead-letter publishes are confirmed before the ack
        self._channel.basic_qos(prefetch_count=1 if self._one_at_a_time else PREFETCH)
        self._metrics.rabbitmq_up.set(1)
        self._ever_connected = True
        if self._down_since is not None:
            LOG.info("RabbitMQ is back after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
        LOG.log(logging.DEBUG if self._failed_deliveries > 1 else logging.INFO,  # once per 541 streak
                "connected to RabbitMQ at %s, consuming %s and %s%s", config.node_name(parameters), config.QUEUE,
                UNROUTABLE_QUEUE, " one message at a time" if self._one_at_a_time else "")

    @staticmethod
    def _declare_topology(channel):
        """The exchanges, queues and bindings this server reads and writes. The shipped ones are
        rabbitmq/definitions.json's (the same arguments as below): the user `pipeline` may consume
        and dead-letter, but neither declare nor bind, since a binding of its own could route its
        dead letters into QUEUE, as any device. So the queues and exchanges are only checked
        (passive declares) when they all exist, and declared when one is missing (a QUEUE of your
        own), which needs a user allowed to; the bindings are made again by a user who may (a
        ROUTING_KEY of your own, or one lost), and left to the definitions by one who may not.
        EXCHANGE is always only checked; its alternate exchange comes from a policy. Returns
        whether DEAD_LETTER_QUEUE is the classic queue of an earlier version."""
        channel.exchange_declare(config.EXCHANGE, passive=True)
        if not StatusServer._topology_exists(channel.connection):
            channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True)
            channel.queue_declare(config.QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
            channel.exchange_declare(UNROUTABLE_EXCHANGE, exchange_type="fanout", durable=True)
            channel.queue_declare(UNROUTABLE_QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
        classic = StatusServer._declare_dead_letter_queue(channel.connection)
        StatusServer._bind(channel.connection)
        return classic

    @staticmethod
    def _declare_dead_letter_queue(connection):
        """Declares DEAD_LETTER_QUEUE, on a channel of its own: the user `pipeline` may, this queue alone,
        so one deleted halfway through a migration comes back. True when it is an earlier version's
        classic queue, whose type RabbitMQ refuses to change (406 "inequivalent arg 'x-queue-type'");
        a user of an earlier version's permissions (403) leaves it to the definitions."""
        channel = connection.channel()
        try:
            channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
        except ChannelClosedByBroker as error:
            if error.reply_code == 406 and "x-queue-type" in error.reply_text:
                return True
            if error.reply_code != 403:
                raise
            return False
        channel.close()
        return False

    def _migrate_classic_dead_letter_queue(self, connection):
        """Versions before clusters kept DEAD_LETTER_QUEUE as a classic queue, on one node only. An empty
        one is replaced by the quorum queue (deleted only if still empty, then declared and bound);
        one that holds messages is kept and used, and the log says once how to move them. The user
        `pipeline` may configure this queue alone, which also lets it delete one that holds messages:
        `if_empty` is this server's own care."""
        channel = connection.channel()
        try:
            waiting = channel.queue_declare(DEAD_LETTER_QUEUE, passive=True).method.message_count
            if waiting == 0:
                channel.queue_delete(DEAD_LETTER_QUEUE, if_empty=True)  # 406 if one arrived meanwhile
                channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
                channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="")
                channel.close()
                LOG.warning("replaced the empty classic queue %s of an earlier version by a quorum queue, "
                            "replicated on a cluster", DEAD_LETTER_QUEUE)
                return
        except ChannelClosedByBroker as error:
            waiting = "some"
            LOG.debug("migrating %s: %s", DEAD_LETTER_QUEUE, error)
        else:
            channel.close()
        if self._told_of_classic_queue:
            return
        self._told_of_classic_queue = True
        LOG.warning("%s is a classic queue of an earlier version, holding %s messages: on a cluster they live on "
                    "one node only. To move to the quorum queue this version declares, read or move them (the "
                    "management UI's Move messages, or a shovel), delete the queue (rabbitmqctl delete_queue %s) "
                    "and start server.py again; it declares the new one", DEAD_LETTER_QUEUE, waiting,
                    DEAD_LETTER_QUEUE)

    @staticmethod
    def _bind(connection):
        """The bindings of _declare_topology, on a channel of their own, which a user who may not
        bind (403) ends: the definitions have made them."""
        channel = connection.channel()
        try:
            # The fanout ones with the key "" as rabbitmq/definitions.json makes them (pika's default is
            # the queue's name: a second binding, which apply_definitions.py would delete).
            channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="")
            channel.queue_bind(config.QUEUE, config.EXCHANGE, routing_key=config.ROUTING_KEY)
            channel.queue_bind(config.QUEUE, config.EXCHANGE, routing_key=DEVICE_ROUTING_KEY)
            channel.queue_bind(UNROUTABLE_QUEUE, UNROUTABLE_EXCHANGE, routing_key="")
        except ChannelClosedByBroker as error:
            if error.reply_code != 403:
                raise
            return
        channel.close()

    @staticmethod
    def _topology_exists(connection):
        """Whether every queue and exchange of _declare_topology exists; on a channel of its own,
        which the broker closes at the first one missing (404)."""
        channel = connection.channel()
        try:
            for exchange in (DEAD_LETTER_EXCHANGE, UNROUTABLE_EXCHANGE):
                channel.exchange_declare(exchange, passive=True)
            for name in (config.QUEUE, UNROUTABLE_QUEUE):  # DEAD_LETTER_QUEUE: _declare_dead_letter_queue
                channel.queue_declare(name, passive=True)
        except ChannelClosedByBroker as error:
            if error.reply_code != 404:
                raise
            return False
        channel.close()
        return True

    def _create_indexes(self):
        delay, failing_since = 1.0, None
        while not self._stopping:
            attempt_started = time.monotonic()
            try:
                # pymongo waits for server selection as long as the deadline: a store that is down
                # or hung is noticed within the short one, an index build may take the long one.
                with pymongo.timeout(config.MONGO_WRITE_TIMEOUT_SECONDS):
                    self._collection.database.command("ping")
                with pymongo.timeout(config.MONGO_STARTUP_TIMEOUT_SECONDS):
                    create_indexes(self._collection)
                    self._batch_writer.mark_layout()
                self._metrics.mongodb_up.set(1)
                return
            except counts.OldLayout as error:  # its batches would be counted twice by the rebuild
                LOG.error("not consuming: %s", error)
                sys.exit(1)
            except PyMongoError as error:
                if isinstance(error, OperationFailure) and error.code == AUTHENTICATION_FAILED:
                    LOG.error("MongoDB refused the credentials in MONGO_URI: %s", (error.details or {}).get("errmsg", error))
                    sys.exit(1)  # retrying cannot help
                if "CERTIFICATE_VERIFY_FAILED" in str(error):  # pymongo tells it in its message only
                    LOG.error("MongoDB's certificate failed verification against tlsCAFile of MONGO_URI: %s", error)
                    sys.exit(1)
                self._metrics.mongodb_up.set(0)
                failing_since = failing_since or attempt_started
                if time.monotonic() - failing_since >= config.MONGO_OUTAGE_EXIT_SECONDS:
                    self._give_up_on_mongodb(failing_since, error)
                LOG.warning("MongoDB unavailable (%s); retrying in %.1fs", error, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- consuming (main thread: the only one that touches pika) ---------------

    def _consume(self):
        """Consume until stopped; True when it closed the connection to consume with the whole window."""
        tags = [self._channel.basic_consume(config.QUEUE, self._on_message),
                self._channel.basic_consume(UNROUTABLE_QUEUE, self._on_unroutable)]
        cancelled = False
        shutdown_deadline = None
        connected_at = time.monotonic()
        while True:
            self._connection.process_data_events(time_limit=0.01 if self._unacknowledged() or self._batch else 0.25)
            if self._received:
                self._metrics.received.inc(self._received)
                self._received = 0
            self._raise_if_consumer_gone()
            self._acknowledge_written()
            if self._stopping and not cancelled:
                for tag in tags:
                    self._channel.basic_cancel(tag)
                cancelled = True
                shutdown_deadline = time.monotonic() + SHUTDOWN_SECONDS
            if (self._one_at_a_time and not cancelled and not self._batch and not self._unacknowledged()
                    and time.monotonic() - connected_at > ONE_AT_A_TIME_SECONDS):
                LOG.info("no delivery failed for %ds (%d failed before): consuming with the whole window again",
                         ONE_AT_A_TIME_SECONDS, self._failed_deliveries)
                self._one_at_a_time, self._failed_deliveries = False, 0
                self._connection.close()
                return True
            if self._batch and (cancelled or self._one_at_a_time or len(self._batch) >= BATCH_SIZE
                                or time.monotonic() - self._batch_started >= FLUSH_SECONDS):
                self._hand_to_writer()
            if cancelled and not self._batch and not self._unacknowledged():
                self._connection.close()
                return False
            if cancelled and time.monotonic() > shutdown_deadline:
                LOG.warning("MongoDB did not take the last messages in time; they stay in the queue")
                self._connection.close()
                return False

    def _on_cancelled_by_broker(self, _method_frame):
        self._cancelled_by_broker = True

    def _raise_if_consumer_gone(self):
        """The connection's process_data_events raises neither for a consumer the broker
        cancelled nor for a channel it closed (only BlockingChannel's own loops do): without
        this check the server would consume nothing, forever, and look alive."""
        if self._cancelled_by_broker:
            raise ConsumerCancelled()
        if self._channel.is_closed:
            raise getattr(self._channel, "_closing_reason", None) or ChannelClosedByBroker(0, "channel closed")

    def _on_message(self, channel, method, properties, body):
        self._received += 1
        self._fault_hook("message", properties.message_id)
        try:
            document = to_document(body, message_id=properties.message_id, amqp_timestamp=properties.timestamp,
                                   topic_device_id=routing_key_device_id(method.routing_key))
        except InvalidMessage as error:
            self._dead_letter(method, properties, body, str(error), error.kind)
            return
        except Exception as error:  # a bug must not stop the pipeline: keep the message, with the reason
            LOG.exception("unexpected error on a message")
            self._dead_letter(method, properties, body, f"server error: {error!r}"[:200], "server_error")
            return
        if not self._batch:
            self._batch_started = time.monotonic()
        self._batch.append((method, properties, body, document))

    def _on_unroutable(self, channel, method, properties, body):
        """A message that no binding of EXCHANGE matched, kept by its alternate exchange."""
        self._received += 1
        self._unroutable += 1
        self._dead_letter(method, properties, body, f"unroutable: {method.routing_key}", "unroutable")

    def _dead_letter(self, method, properties, body, reason, kind):
        """Moves the message to DEAD_LETTER_QUEUE with its reason; `kind`, one of DEAD_LETTER_KINDS, labels the metric."""
        LOG.warning("rejected message %s from %r: %s", properties.message_id or "-", method.routing_key, reason)
        headers = dict(properties.headers or {})
        headers[REASON_HEADER] = reason
        headers["x-original-routing-key"] = method.routing_key
        properties.headers = headers
        try:  # mandatory: a dead-letter queue that went missing returns it, where it would be dropped
            self._channel.basic_publish(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, body, properties, mandatory=True)
        except pika.exceptions.UnroutableError:
            raise DeadLetterNotTaken(f"no queue is bound to {DEAD_LETTER_EXCHANGE}: the messages in hand go back "
                                     f"to the queue, and the topology is checked again") from None
        except pika.exceptions.NackError:
            raise DeadLetterNotTaken(f"RabbitMQ refused a dead letter for now (nack: {DEAD_LETTER_QUEUE} without a "
                                     f"leader?): the messages in hand go back to the queue") from None
        self._channel.basic_ack(method.delivery_tag)
        self._dead += 1
        self._metrics.dead_lettered.labels(kind).inc()

    def _hand_to_writer(self):
        try:
            self._to_write.put_nowait((self._generation, self._handed, self._batch))
        except queue.Full:
            return  # the writers are busy; the batch keeps growing, bounded by the prefetch window
        self._handed += 1
        self._batch = []

    def _acknowledge_written(self):
        while True:
            try:
                generation, sequence, batch, failures, duplicates = self._written.get_nowait()
            except queue.Empty:
                return
            if generation != self._generation:
                continue
            self._written_early[sequence] = (batch, failures, duplicates)
            # One multiple ack covers every earlier delivery: never ack past a batch still being written.
            while self._next_to_acknowledge in self._written_early:
                self._acknowledge(*self._written_early.pop(self._next_to_acknowledge))
                self._next_to_acknowledge += 1

    def _acknowledge(self, batch, failures, duplicates):
        self._fault_hook("before-ack")
        for index, reason in sorted(failures.items()):
            method, properties, body, _ = batch[index]
            self._dead_letter(method, properties, body, reason, "store_refused")
        last_tag = next((batch[index][0].delivery_tag for index in reversed(range(len(batch))) if index not in failures),
                        None)  # without looking at every message of the batch when nothing failed
        if last_tag is not None:
            self._channel.basic_ack(last_tag, multiple=True)
        self._stored += len(batch) - len(failures)
        LOG.debug("stored %d messages (%d in all)", len(batch) - len(failures), self._stored)
        new = len(batch) - len(failures) - duplicates
        self._metrics.stored.inc(new)
        self._metrics.duplicates.inc(duplicates)
        if new:
            self._metrics.last_stored.set_to_current_time()

    def _unacknowledged(self):
        """Batches of this connection handed to the writers and not acknowledged yet."""
        return self._handed - self._next_to_acknowledge

    def _forget_unacknowledged(self):
        """After a lost connection the broker redelivers everything unacknowledged."""
        self._generation += 1
        self._batch = []
        self._handed = self._next_to_acknowledge = 0
        self._written_early = {}
        if self._connection is not None and self._connection.is_open:
            try:  # a channel closed by the broker leaves its connection open
                self._connection.close()
            except pika.exceptions.AMQPError:
                pass
        self._connection = self._channel = None

    # -- writing (writer threads: the only ones that touch MongoDB) -----------

    def _write_batches(self):
        try:
            self._write_batches_until_stopped()
        except BaseException:
            # Nothing written by a broken writer is acknowledged: dying hands every message back.
            LOG.critical("writer thread failed; exiting so the messages are redelivered", exc_info=True)
            os._exit(1)

    def _write_batches_until_stopped(self):
        while True:
            item = self._to_write.get()
            if item is None:
                return
            generation, sequence, batch = item
            if generation != self._generation:
                continue  # its messages are on their way back from the broker
            self._fault_hook("before-write", (sequence, len(batch)))
            failures, duplicates = self._insert([document for *_, document in batch])
            self._fault_hook("after-write")
            self._written.put((generation, sequence, batch, failures, duplicates))

    def _insert(self, documents):
        """Write until MongoDB takes the documents; return ({index: reason} for those it never
        will, how many were stored already). Each attempt has a deadline
        (MONGO_WRITE_TIMEOUT_SECONDS), so a store that accepts connections and never answers is
        an outage like any other; after MONGO_OUTAGE_EXIT_SECONDS of failed attempts the process exits."""
        delay, failing, failing_since = 0.5, False, None
        while True:
            attempt_started = time.monotonic()
            try:
                failures, duplicates = self._batch_writer.write(documents)  # the raw insert and its counts record
                self._metrics.batch_write_seconds.observe(time.monotonic() - attempt_started)
                self._metrics.mongodb_up.set(1)
            except PyMongoError as error:
                failures = None
                self._metrics.mongodb_up.set(0)
                failing_since = failing_since or attempt_started
                if not failing and attempt_started > self._recovered_at:  # else: the outage that just ended
                    failing = True
                    self._outage_started(error)
                if time.monotonic() - failing_since >= config.MONGO_OUTAGE_EXIT_SECONDS:
                    self._give_up_on_mongodb(failing_since, error)
            if failures is not None:
                if failing:
                    self._outage_ended()
                return failures, duplicates
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)

    def _give_up_on_mongodb(self, failing_since, error):
        """Past the bound a supervisor must act (an operator, a restart elsewhere); nothing held is
        acknowledged, so exiting hands every message back to RabbitMQ."""
        with self._outage_lock:  # one line, however many writers reach the bound at once
            LOG.critical("MongoDB has taken no write for %.0fs (MONGO_OUTAGE_EXIT_SECONDS=%g; last error: %s); "
                         "exiting with status 1, the unacknowledged messages go back to the queue",
                         time.monotonic() - failing_since, config.MONGO_OUTAGE_EXIT_SECONDS, error)
            os._exit(1)

    # An outage is logged once when the first writer fails and once when the last recovers.

    def _outage_started(self, error):
        with self._outage_lock:
            self._failing_writers += 1
            if self._failing_writers == 1:
                LOG.warning("MongoDB unavailable (%s); holding messages and retrying", error)

    def _outage_ended(self):
        with self._outage_lock:
            self._failing_writers -= 1
            if self._failing_writers == 0:
                self._recovered_at = time.monotonic()
                LOG.info("MongoDB is back")


def _is_consumer_timeout(error):
    """RabbitMQ closes the channel with 406 PRECONDITION_FAILED "delivery acknowledgement on
    channel N timed out" when a delivery stays unacknowledged past consumer_timeout (30 min by
    default); 406 otherwise means a declaration that contradicts the existing topology."""
    return error.reply_code == 406 and "acknowledgement" in error.reply_text and "timed out" in error.reply_text


def create_indexes(collection):
    """On MongoDB, an index on `batch`, so that recovering an interrupted batch's counts reads
    only its documents. FerretDB 1.x reads the whole collection for any filter but a string
    _id, so there an index would only slow every insert: none is created, and the
    `timestamp` index an earlier version created is dropped."""
    if not collection.database.client.server_info().get("ferretdbVersion", "").startswith("v1."):
        collection.create_index("batch")
        return
    try:
        collection.drop_index([("timestamp", 1)])
    except OperationFailure as error:
        if error.code not in (NAMESPACE_NOT_FOUND, INDEX_NOT_FOUND):
            raise


def _fault_hook_from_environment():
    """For the fault tests: SERVER_CRASH_AT=after-raw-insert|after-write|before-ack|message:<message_id>
    kills the process at that point, as a power cut or a fatal bug would;
    SERVER_SLOW_FIRST_WRITE=<seconds> holds each connection's first batch that long before its write,
    as one slow answer from MongoDB would, while the other writers go on."""
    crash_at = os.environ.get("SERVER_CRASH_AT")
    slow_first_write = float(os.environ.get("SERVER_SLOW_FIRST_WRITE") or 0)
    if not crash_at and not slow_first_write:
        return None

    def fault(point, detail=None):
        if crash_at and (point == crash_at or f"{point}:{detail}" == crash_at):
            LOG.error("crashing at %s (SERVER_CRASH_AT)", point)
            os._exit(70)
        if point == "before-write" and detail[0] == 0 and slow_first_write:
            LOG.error("holding the first batch of %d messages for %.0fs (SERVER_SLOW_FIRST_WRITE)",
                      detail[1], slow_first_write)
            time.sleep(slow_first_write)

    return fault


class _OtherProcesses:
    """With --processes N, this server.py starts N - 1 more as its children, on the same queue:
    one Python process keeps about one core busy. They go down together, so that whatever
    restarts the server restarts all of it: a child stops at once when this process is gone,
    even after kill -9 (the pipe it inherited closes), and when a child exits unasked this
    process stops the others and exits with the child's code (1 for a clean exit or a signal)."""

    def __init__(self, count, log_level, server):
        self._server = server
        self._stopping = False
        self.exit_code = 0
        read_end, self._write_end = os.pipe()  # this end is never written, only held until exit
        self._processes = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--processes", "1",
                                             "--log-level", log_level, "--parent-fd", str(read_end)],
                                            pass_fds=(read_end,)) for _ in range(count)]
        os.close(read_end)
        LOG.info("running %d processes: this one and %s", count + 1, ", ".join(str(p.pid) for p in self._processes))
        for process in self._processes:
            threading.Thread(target=self._watch, args=(process,), name=f"watch-{process.pid}", daemon=True).start()

    def _watch(self, process):
        code = process.wait()
        Metrics.process_gone(process.pid)
        if self._stopping:
            return
        # Even a clean exit was not asked for by this process: the whole must be restarted.
        LOG.error("server process %d exited with code %d; stopping the others", process.pid, code)
        self.exit_code = self.exit_code or (code if code > 0 else 1)
        self._server.stop()
        self.stop()

    def stop(self):
        self._stopping = True
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def wait(self):
        """Once this process has stopped: stop the others, wait for them; the exit code of the whole."""
        self.stop()
        for process in self._processes:
            try:
                process.wait(SHUTDOWN_SECONDS + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return self.exit_code


def _stop_with_parent(fd, server):
    """In a child: stop as soon as the server.py that started it is gone, however it went.
    It finishes the messages in hand as on SIGTERM rather than handing them back: on RabbitMQ
    3.x every return counts towards a message's delivery limit."""
    def watch():
        os.read(fd, 1)  # returns only at end of file: the parent never writes
        LOG.error("the server.py that started this process is gone; stopping")
        server.stop()
        time.sleep(SHUTDOWN_SECONDS + 5)
        os._exit(1)  # stopping hung

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--processes", type=int, default=config.SERVER_PROCESSES,
                        help="server processes sharing the queue, this one included "
                             "(default: SERVER_PROCESSES, one per core up to 4)")
    parser.add_argument("--rebuild-counts", action="store_true",
                        help="keep the counts again from the stored messages, then exit (after an upgrade that "
                             "changed their layout; stop every server.py first)")
    parser.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)  # given to the children
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    logging.basicConfig(format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")  # libraries: warnings only
    LOG.setLevel(args.log_level)
    counts.LOG.setLevel(args.log_level)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the server logs each transition itself
    if args.rebuild_counts:
        collection = pymongo.MongoClient(config.MONGO_URI, tz_aware=True)[config.MONGO_DB][config.MONGO_COLLECTION]
        LOG.info("rebuilding the counts of %s from the stored messages", collection.full_name)
        try:
            LOG.info("counted %d stored messages", counts.rebuild(collection))
        except counts.OldLayout as error:  # a server.py still folds
            LOG.error("%s", error)
            return 1
        return 0
    metrics_directory = None
    if args.parent_fd is None:
        # New for each run, so that no stale file adds to the sums; the children inherit it.
        os.environ.pop(MULTIPROCESS_DIRECTORY, None)
        if config.METRICS_PORT:
            metrics_directory = os.environ[MULTIPROCESS_DIRECTORY] = tempfile.mkdtemp(prefix="status-server-metrics-")
    metrics = Metrics()
    if metrics_directory:
        try:
            metrics.serve(config.METRICS_HOST, config.METRICS_PORT)
        except OSError as error:
            LOG.error("cannot serve metrics on %s:%d (METRICS_HOST, METRICS_PORT; 0 serves none): %s",
                      config.METRICS_HOST, config.METRICS_PORT, error)
            shutil.rmtree(metrics_directory, ignore_errors=True)
            return 1
        LOG.info("serving metrics on http://%s:%d/metrics, the sums of the files of every process in %s",
                 config.METRICS_HOST, config.METRICS_PORT, metrics_directory)
    try:
        mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True, serverSelectionTimeoutMS=5000)
    except ConfigurationError as error:  # a mongodb+srv:// name that does not resolve, for one
        LOG.error("MONGO_URI %s: %s", config.redact(config.MONGO_URI), error)
        return 1
    server = StatusServer(mongo[config.MONGO_DB][config.MONGO_COLLECTION], fault_hook=_fault_hook_from_environment(),
                          fold=args.parent_fd is None, metrics=metrics)
    if args.parent_fd is not None:
        _stop_with_parent(args.parent_fd, server)
    others = _OtherProcesses(args.processes - 1, args.log_level, server) if args.processes > 1 else None

    def stop(*_):
        server.stop()
        if others:
            others.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    finally:
        code = others.wait() if others else 0  # also when this one failed
        if metrics_directory:
            shutil.rmtree(metrics_directory, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
