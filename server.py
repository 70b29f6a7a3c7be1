"""Consume status messages from RabbitMQ and store each one in MongoDB, once.

    python server.py                  # one process per core (SERVER_PROCESSES)
    python server.py --processes 1

The queue is durable and named, so nothing published while the server is down
is lost, and several servers share its work: its own processes, and others.
Messages are written in batches by writer threads and acknowledged (one
`multiple` ack per batch) only after the write, so a crash anywhere means
redelivery, never loss; a redelivered message is stored once because its
message_id is the document's _id. An invalid message goes to the dead-letter
queue with its reason and is never retried.
"""

import argparse
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import bson
import pika
import pymongo
from bson.errors import InvalidDocument
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker, ConnectionClosedByBroker, ProbableAuthenticationError
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

import config
import rollups
from messages import InvalidMessage, to_document

LOG = logging.getLogger("server")

DEVICE_ROUTING_KEY = "devices.*.status"  # MQTT topic devices/<id>/status
DEAD_LETTER_EXCHANGE = f"{config.QUEUE}.dlx"
DEAD_LETTER_QUEUE = f"{config.QUEUE}.dead"
REASON_HEADER = "x-rejected-reason"
# A message that kills the server before it is acknowledged comes back with a growing
# delivery count; after this many deliveries the broker dead-letters it.
DELIVERY_LIMIT = 20
BATCH_SIZE = 2000
FLUSH_SECONDS = 0.05
# A write spends most of its time waiting for MongoDB, so batches are written by several
# threads at once; they are still acknowledged in the order they were received.
WRITERS = 3
# The broker sends only while the window has room: besides the batches being written and
# waiting, it holds one that keeps filling (past BATCH_SIZE while the writers are busy,
# so a backlog is written in fewer, bigger batches) and the deliveries on their way.
PREFETCH = 10 * BATCH_SIZE
DUPLICATE_KEY = 11000
MAX_BSON_BYTES = 16 * 1024 * 1024  # MongoDB's limit on one document
NAMESPACE_NOT_FOUND, INDEX_NOT_FOUND = 26, 27
SHUTDOWN_SECONDS = 5


class StatusServer:
    def __init__(self, collection, amqp_url=config.RABBITMQ_URL, fault_hook=None):
        self._collection = collection
        self._parameters = pika.URLParameters(amqp_url)
        self._parameters.heartbeat = 30
        self._parameters.blocked_connection_timeout = 60
        self._fault_hook = fault_hook or (lambda point, detail=None: None)
        self._stopping = False
        self._down_since = None  # when RabbitMQ went away, to log the outage once
        self._connection = None
        self._channel = None
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
        self._stored = 0
        self._dead = 0

    # -- lifecycle -------------------------------------------------------------

    def run(self):
        """Consume until stop(); reconnect to RabbitMQ whenever it goes away."""
        self._create_indexes()
        writers = [threading.Thread(target=self._write_batches, name=f"writer-{n}", daemon=True) for n in range(WRITERS)]
        for writer in writers:
            writer.start()
        delay = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._connect()
                self._consume()
            except (ConnectionClosedByBroker, AMQPConnectionError, ConnectionError) as error:
                if self._stopping:
                    break
                self._went_down(f"RabbitMQ connection lost ({error!r})")
            except ChannelClosedByBroker as error:
                if error.reply_code in (403, 404, 406):
                    LOG.error("RabbitMQ refused the topology: %s", error)
                    raise SystemExit(1) from None
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
        LOG.info("stopped: %d stored, %d dead-lettered", self._stored, self._dead)

    def _went_down(self, why):
        if self._down_since is None:
            self._down_since = time.monotonic()
            LOG.warning("%s; reconnecting", why)
        else:
            LOG.debug("%s; still reconnecting", why)

    def stop(self, *_):
        if not self._stopping:
            LOG.info("stopping: finishing the messages in hand")
        self._stopping = True

    def _sleep(self, seconds):
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _connect(self):
        try:
            self._connection = pika.BlockingConnection(self._parameters)
        except ProbableAuthenticationError as error:
            LOG.error("RabbitMQ refused the credentials in RABBITMQ_URL: %s", error)
            raise SystemExit(1) from None
        self._channel = self._connection.channel()
        self._declare_topology(self._channel)
        self._channel.confirm_delivery()  # dead-letter publishes are confirmed before the ack
        self._channel.basic_qos(prefetch_count=PREFETCH)
        if self._down_since is not None:
            LOG.info("RabbitMQ is back after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
        LOG.info("connected to RabbitMQ, consuming %s", config.QUEUE)

    @staticmethod
    def _declare_topology(channel):
        channel.exchange_declare(config.EXCHANGE, exchange_type="topic", durable=True)
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True)
        channel.queue_declare(DEAD_LETTER_QUEUE, durable=True)
        channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
        channel.queue_declare(config.QUEUE, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        })
        channel.queue_bind(config.QUEUE, config.EXCHANGE, routing_key=config.ROUTING_KEY)
        channel.queue_bind(config.QUEUE, config.EXCHANGE, routing_key=DEVICE_ROUTING_KEY)

    def _create_indexes(self):
        delay = 1.0
        while not self._stopping:
            try:
                create_indexes(self._collection)
                return
            except PyMongoError as error:
                LOG.warning("MongoDB unavailable (%s); retrying in %.1fs", error, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- consuming (main thread: the only one that touches pika) ---------------

    def _consume(self):
        tag = self._channel.basic_consume(config.QUEUE, self._on_message)
        cancelled = False
        shutdown_deadline = None
        while True:
            self._connection.process_data_events(time_limit=0.01 if self._unacknowledged() or self._batch else 0.25)
            self._acknowledge_written()
            if self._stopping and not cancelled:
                self._channel.basic_cancel(tag)
                cancelled = True
                shutdown_deadline = time.monotonic() + SHUTDOWN_SECONDS
            if self._batch and (cancelled or len(self._batch) >= BATCH_SIZE
                                or time.monotonic() - self._batch_started >= FLUSH_SECONDS):
                self._hand_to_writer()
            if cancelled and not self._batch and not self._unacknowledged():
                self._connection.close()
                return
            if cancelled and time.monotonic() > shutdown_deadline:
                LOG.warning("MongoDB did not take the last messages in time; they stay in the queue")
                self._connection.close()
                return

    def _on_message(self, channel, method, properties, body):
        self._fault_hook("message", properties.message_id)
        topic_device_id = None
        parts = method.routing_key.split(".")
        if len(parts) == 3 and parts[0] == "devices" and parts[2] == "status":
            topic_device_id = parts[1]
        try:
            document = to_document(body, message_id=properties.message_id, amqp_timestamp=properties.timestamp,
                                   topic_device_id=topic_device_id)
        except InvalidMessage as error:
            self._dead_letter(method, properties, body, str(error))
            return
        except Exception as error:  # a bug must not stop the pipeline: keep the message, with the reason
            LOG.exception("unexpected error on a message")
            self._dead_letter(method, properties, body, f"server error: {error!r}"[:200])
            return
        if not self._batch:
            self._batch_started = time.monotonic()
        self._batch.append((method, properties, body, document))

    def _dead_letter(self, method, properties, body, reason):
        LOG.warning("rejected message %s from %r: %s", properties.message_id or "-", method.routing_key, reason)
        headers = dict(properties.headers or {})
        headers[REASON_HEADER] = reason
        headers["x-original-routing-key"] = method.routing_key
        properties.headers = headers
        self._channel.basic_publish(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, body, properties)
        self._channel.basic_ack(method.delivery_tag)
        self._dead += 1

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
                generation, sequence, batch, failures = self._written.get_nowait()
            except queue.Empty:
                return
            if generation != self._generation:
                continue
            self._written_early[sequence] = (batch, failures)
            # One multiple ack covers every earlier delivery: never ack past a batch still being written.
            while self._next_to_acknowledge in self._written_early:
                self._acknowledge(*self._written_early.pop(self._next_to_acknowledge))
                self._next_to_acknowledge += 1

    def _acknowledge(self, batch, failures):
        self._fault_hook("before-ack")
        for index, reason in sorted(failures.items()):
            method, properties, body, _ = batch[index]
            self._dead_letter(method, properties, body, reason)
        last_tag = next((batch[index][0].delivery_tag for index in reversed(range(len(batch))) if index not in failures),
                        None)  # without looking at every message of the batch when nothing failed
        if last_tag is not None:
            self._channel.basic_ack(last_tag, multiple=True)
        self._stored += len(batch) - len(failures)
        LOG.debug("stored %d messages (%d in all)", len(batch) - len(failures), self._stored)

    def _unacknowledged(self):
        """Batches of this connection handed to the writers and not acknowledged yet."""
        return self._handed - self._next_to_acknowledge

    def _forget_unacknowledged(self):
        """After a lost connection the broker redelivers everything unacknowledged."""
        self._generation += 1
        self._batch = []
        self._handed = self._next_to_acknowledge = 0
        self._written_early = {}
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
            failures = self._insert([document for *_, document in batch])
            self._fault_hook("after-write")
            self._written.put((generation, sequence, batch, failures))

    def _insert(self, documents):
        """Write until MongoDB takes the documents; return {index: reason} for those it never will."""
        delay, failing = 0.5, False
        while True:
            attempt_started = time.monotonic()
            try:
                failures = self._insert_many(documents)
                if failures is not None:
                    # After the insert and before the ack: see the argument in rollups.py.
                    rollups.touch(self._collection, [d for i, d in enumerate(documents) if i not in failures])
            except PyMongoError as error:
                failures = None
                if not failing and attempt_started > self._recovered_at:  # else: the outage that just ended
                    failing = True
                    self._outage_started(error)
            if failures is not None:
                if failing:
                    self._outage_ended()
                return failures
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)

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

    def _insert_many(self, documents):
        """{index: reason} for the documents MongoDB refused; None when the whole write must be retried.

        The driver encodes the whole batch before sending it, so one document BSON cannot
        encode fails them all: those are refused alone, and the others written without them."""
        try:
            self._collection.insert_many(documents, ordered=False)
            return {}
        except BulkWriteError as error:
            if error.details.get("writeConcernErrors"):
                return None
            return {e["index"]: f"MongoDB refused the document: {e.get('errmsg', e['code'])}"
                    for e in error.details["writeErrors"] if e["code"] != DUPLICATE_KEY}
        except (InvalidDocument, UnicodeEncodeError, OverflowError):
            unencodable = _unencodable(documents, self._collection.codec_options)
            if not unencodable:
                raise
        others = [index for index in range(len(documents)) if index not in unencodable]
        failures = self._insert_many([documents[index] for index in others]) if others else {}
        if failures is None:
            return None
        return {**unencodable, **{others[index]: reason for index, reason in failures.items()}}


def _unencodable(documents, codec_options):
    """{index: reason} for the documents that BSON cannot encode or that exceed its 16 MiB."""
    refused = {}
    for index, document in enumerate(documents):
        try:
            size = len(bson.encode(document, codec_options=codec_options))
        except (InvalidDocument, UnicodeEncodeError, OverflowError) as error:
            reason = f"{error.__class__.__name__}: {error}"
        else:
            if size <= MAX_BSON_BYTES:
                continue
            reason = f"it is {size} bytes as BSON, more than {MAX_BSON_BYTES}"
        # The reason becomes an AMQP header, which must be UTF-8: escape whatever is not ASCII.
        refused[index] = f"the document cannot be stored: {reason}"[:200].encode("ascii", "backslashreplace").decode()
    return refused


def create_indexes(collection):
    """The API's range queries use a timestamp index on MongoDB. FerretDB 1.x reads the whole
    collection for any range filter (it hands only equality down to its SQL backend), so
    there the index would be one more structure to update on every insert, never read:
    one that an earlier version created is dropped."""
    if not collection.database.client.server_info().get("ferretdbVersion", "").startswith("v1."):
        collection.create_index("timestamp")
        return
    try:
        collection.drop_index([("timestamp", 1)])
    except OperationFailure as error:
        if error.code not in (NAMESPACE_NOT_FOUND, INDEX_NOT_FOUND):
            raise


def _fault_hook_from_environment():
    """For the fault tests: SERVER_CRASH_AT=after-write|before-ack|message:<message_id>
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
    parser.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)  # given to the children
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    logging.basicConfig(format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")  # libraries: warnings only
    LOG.setLevel(args.log_level)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the server logs each transition itself
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True, serverSelectionTimeoutMS=5000)
    server = StatusServer(mongo[config.MONGO_DB][config.MONGO_COLLECTION], fault_hook=_fault_hook_from_environment())
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
    return code


if __name__ == "__main__":
    sys.exit(main())
