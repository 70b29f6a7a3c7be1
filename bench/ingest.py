"""Ingest benchmark: server.py against the broker's and the store's ceilings, in one run.

    .venv/bin/python bench/ingest.py                 # 200,000 messages (make bench)
    .venv/bin/python bench/ingest.py --messages 5000 --baseline-messages 1000   # quick
    .venv/bin/python bench/ingest.py --telegraf      # also (t), built by scripts/telegraf-build

Each consumer drains the same pre-loaded queue (the same message bodies, loaded
again before each run, loading not timed). The machine is shared and its speed drifts,
so (a), (a1), (b), (c) and (t) run in turn for --rounds rounds and each reports its median:
  (a) server.py, as shipped: one process per core (SERVER_PROCESSES), and (a1) one process;
  (b) the broker's ceiling: a consumer that only parses JSON and acknowledges;
  (c) the store's ceiling: plain insert_many of the same documents, 1,000 at a time;
  (d) the baseline: one insert_one and one ack per message, as the original design did;
  (t) with --telegraf, Telegraf: inputs.amqp_consumer (json_v2) into outputs.mongodb, the
      off-the-shelf way to move JSON messages from RabbitMQ into MongoDB (not in CI).
With --spread-seconds the timestamps span that many seconds and the bodies come shuffled
(a backlog that arrives out of order, as after an outage), instead of 10 ms apart in order.
Then the latency from publish to stored at a steady 1,000 msg/s, and server.py's peak
memory while it drains a backlog of --backlog messages (1,000,000 by default). Prints a
table and writes bench/results/ingest.json.
"""

import argparse
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = uuid.uuid4().hex[:8]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A free port for server.py's metrics too: a server.py already running holds the default one.
os.environ.update(EXCHANGE=f"bench_exchange_{RUN}", QUEUE=f"bench_queue_{RUN}", MONGO_DB=f"bench_{RUN}",
                  ROUTING_KEY="status_topic", METRICS_PORT=str(free_port()))
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
import pymongo  # noqa: E402

import config  # noqa: E402

# The users of rabbitmq/definitions.json may touch only the pipeline's own names, not this run's:
# everything here, server.py's processes included, logs in as admin unless RABBITMQ_URL says otherwise.
config.RABBITMQ_URL = os.environ["RABBITMQ_URL"] = config.rabbitmq_url("admin")

from messages import to_document  # noqa: E402
from server import StatusServer  # noqa: E402


def bodies(count, spread_seconds=0.0):
    """The same message bodies for every run: identity, status and time as client.py sends them.

    Times start on 2026-11-01 UTC, 10 ms apart in order; with `spread_seconds`, spread evenly
    over that many seconds and the bodies shuffled (the same order for the same count).
    """
    start = datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()
    step = spread_seconds / count if spread_seconds else 0.01
    messages = [json.dumps({"status": index % 7, "message_id": f"{RUN}-{index}",
                            "timestamp": datetime.fromtimestamp(start + index * step, timezone.utc)
                            .isoformat(timespec="milliseconds").replace("+00:00", "Z")}).encode()
                for index in range(count)]
    if spread_seconds:
        random.Random(count).shuffle(messages)
    return messages


def store_name(mongo):
    info = mongo.server_info()
    return f"FerretDB {info['ferretdbVersion']}" if "ferretdbVersion" in info else f"MongoDB {info['version']}"


def connect():
    """A connection, this run's exchange declared (server.py only checks that it exists, as
    rabbitmq/definitions.json declares status_exchange)."""
    connection = pika.BlockingConnection(pika.URLParameters(config.RABBITMQ_URL))
    channel = connection.channel()
    channel.exchange_declare(config.EXCHANGE, exchange_type="topic", durable=True)
    channel.close()
    return connection


def preload(messages):
    connection = connect()
    channel = connection.channel()
    StatusServer._declare_topology(channel)
    channel.queue_purge(config.QUEUE)
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    for body in messages:
        channel.basic_publish(config.EXCHANGE, config.ROUTING_KEY, body, properties)
    while channel.queue_declare(config.QUEUE, passive=True).method.message_count < len(messages):
        connection.sleep(0.1)
    connection.close()


def remove_run(mongo):
    """Delete this run's queues, exchanges and database."""
    connection = connect()
    channel = connection.channel()
    for queue in (config.QUEUE, config.QUEUE + ".dead", config.QUEUE + ".unroutable"):
        channel.queue_delete(queue)
    for exchange in (config.EXCHANGE, config.EXCHANGE + ".unroutable", config.QUEUE + ".dlx"):
        channel.exchange_delete(exchange)
    connection.close()
    mongo.drop_database(config.MONGO_DB)


def fresh_collection(mongo):
    mongo.drop_database(config.MONGO_DB)
    return mongo[config.MONGO_DB][config.MONGO_COLLECTION]


def busy_cpu_seconds():
    """CPU time the whole machine has spent busy: broker, store and consumer alike."""
    fields = [int(value) for value in open("/proc/stat").readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def timed(run):
    """(seconds, busy CPU seconds of the machine) that run() took."""
    started, cpu = time.perf_counter(), busy_cpu_seconds()
    run()
    return time.perf_counter() - started, busy_cpu_seconds() - cpu


class LoggedConsumer:
    """A consumer process whose progress is read from its log, which tells each batch once it
    is written. Polling the store instead would load it: on FerretDB 1.24 a count reads the
    whole collection. Subclasses give the command, the line that says it consumes (READY) and
    the line of a written batch (STORED)."""

    NAME = READY = STORED = None

    def __init__(self, log_name, command):
        self.stored_at = [(time.perf_counter(), 0)]  # (when the line arrived, stored so far)
        self._ready = threading.Event()
        self._log = open(ROOT / "bench/results" / log_name, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(30):
            raise SystemExit(f"{self.NAME} did not start; see bench/results/{log_name}")

    def _read(self):
        for line in self.process.stdout:
            now = time.perf_counter()
            self._log.write(line)
            if self.READY in line and not self._ready.is_set():
                self.ready_at = (now, busy_cpu_seconds())  # it may store from here on
                self._ready.set()
            found = self.STORED.search(line)
            if found:
                self.stored_at.append((now, self._stored_so_far(found)))

    def wait_stored(self, count, timeout):
        """When its log first reached `count` stored messages."""
        deadline = time.perf_counter() + timeout
        while self.stored_at[-1][1] < count:
            if self.process.poll() is not None or time.perf_counter() > deadline:
                raise SystemExit(f"{self.NAME} stored {self.stored_at[-1][1]} of {count}; see {self._log.name}")
            time.sleep(0.005)
        return self.stored_at[-1][0]

    def stop(self):
        """Peak RSS in MB: the sum of its processes' peaks."""
        if self.process.poll() is not None:  # it failed: the caller reports that
            return 0.0
        pid = self.process.pid
        pids = [pid, *open(f"/proc/{pid}/task/{pid}/children").read().split()]
        peak_kb = sum(int(next(line.split()[1] for line in open(f"/proc/{each}/status") if line.startswith("VmHWM")))
                      for each in pids)
        self.process.terminate()
        self.process.wait(30)
        self._reader.join(5)
        self._log.close()
        return peak_kb / 1024


class ServerProcess(LoggedConsumer):
    """server.py (all its processes): each process logs each batch after the write and the ack."""

    NAME, READY = "server.py", b"consuming"
    STORED = re.compile(rb"server\[(\d+)\] DEBUG stored \d+ messages \((\d+) in all\)")

    def __init__(self, log_name, processes=None):
        self._stored_by = {}  # pid -> stored so far
        options = ["--processes", str(processes)] if processes else []
        super().__init__(log_name, [sys.executable, str(ROOT / "server.py"), "--log-level", "DEBUG", *options])

    def _stored_so_far(self, found):
        self._stored_by[found.group(1)] = int(found.group(2))
        return sum(self._stored_by.values())


TELEGRAF_VERSION = "1.40.1"  # scripts/telegraf-build builds this one
# Settled to match server.py's: batches of 2,000 and a window of 20,000 unacknowledged messages.
TELEGRAF_CONFIG = """\
[agent]
  omit_hostname = true
  metric_batch_size = 2000
  metric_buffer_limit = 100000
  flush_interval = "1s"
  debug = true

[[inputs.amqp_consumer]]
  brokers = [{broker}]
  tls_ca = {tls_ca}
  queue = {queue}
  queue_passive = true  # server.py's topology: a quorum queue, already bound
  prefetch_count = 20000
  max_undelivered_messages = 20000
  data_format = "json_v2"
  [[inputs.amqp_consumer.json_v2]]
    measurement_name = {collection}
    timestamp_path = "timestamp"
    timestamp_format = "rfc3339"
    timestamp_timezone = "UTC"
    [[inputs.amqp_consumer.json_v2.field]]
      path = "status"
      type = "int"
    [[inputs.amqp_consumer.json_v2.field]]
      path = "message_id"
      type = "string"

[[outputs.mongodb]]
  dsn = {mongo_uri}
  tls_ca = {tls_ca}
  database = {database}
  write_batch = true  # one insert_many per batch, instead of one insert_one per message
"""


def telegraf_binary():
    """The path of Telegraf TELEGRAF_VERSION, built by scripts/telegraf-build on first use (minutes)."""
    built = subprocess.run([str(ROOT / "scripts/telegraf-build")], env={**os.environ, "TELEGRAF_VERSION": TELEGRAF_VERSION},
                           stdout=subprocess.PIPE, text=True)
    if built.returncode != 0:
        raise SystemExit(f"scripts/telegraf-build failed (exit {built.returncode}); see its output above")
    return built.stdout.strip().splitlines()[-1]


class TelegrafProcess(LoggedConsumer):
    """Telegraf at debug level: outputs.mongodb logs each batch after its write; the acks follow
    it (tracking metrics), as server.py's follow its writes."""

    NAME, READY = "Telegraf", b"[inputs.amqp_consumer] Connected to"
    STORED = re.compile(rb"\[outputs\.mongodb\] Wrote batch of (\d+) metrics")

    def __init__(self, binary):
        self._stored = 0
        # Over TLS as server.py: Telegraf takes the CA as tls_ca, not in pika's ssl_options.
        settings = {"broker": config.RABBITMQ_URL.partition("?")[0], "tls_ca": config.TLS_CA_FILE or "",
                    "queue": config.QUEUE, "collection": config.MONGO_COLLECTION,
                    "mongo_uri": config.MONGO_URI, "database": config.MONGO_DB}
        path = ROOT / "bench/results/telegraf.conf"
        path.unlink(missing_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:  # it holds passwords
            file.write(TELEGRAF_CONFIG.format(**{name: json.dumps(value) for name, value in settings.items()}))
        super().__init__("telegraf.log", [binary, "--config", str(path)])

    def _stored_so_far(self, found):
        self._stored += int(found.group(1))
        return self._stored


def drain(mongo, consumer, count):
    """Start `consumer` on a fresh collection and time it from when it is ready until its log says
    `count` are stored: (seconds, busy CPU seconds, peak RSS in MB)."""
    collection = mongo[config.MONGO_DB][config.MONGO_COLLECTION]
    process = consumer()
    try:  # from when its first process was ready: server.py consumes while its others start
        started, cpu = process.ready_at
        seconds = process.wait_stored(count, timeout=3600) - started
        cpu = busy_cpu_seconds() - cpu
    finally:
        peak_mb = process.stop()
    if collection.estimated_document_count() != count:  # once, after the clock stopped
        raise SystemExit(f"{process.NAME} reported {count} stored, the collection disagrees")
    return seconds, cpu, peak_mb


def run_server(mongo, count, processes=None):
    """(a) server.py (with --processes, if given); returns (seconds, busy CPU seconds, peak RSS in MB)."""
    fresh_collection(mongo)
    return drain(mongo, lambda: ServerProcess(f"server-{processes}.log" if processes else "server.log", processes), count)


def run_telegraf(mongo, count, binary):
    """(t) Telegraf; returns (seconds, busy CPU seconds, peak RSS in MB)."""
    fresh_collection(mongo)
    # outputs.mongodb creates a time-series collection for each measurement that it did not
    # find listed when it connected; FerretDB refuses those, and a plain one is what server.py has.
    mongo[config.MONGO_DB].create_collection(config.MONGO_COLLECTION)
    return drain(mongo, lambda: TelegrafProcess(binary), count)


def drain_parse_only(count):
    """(b) parse JSON and acknowledge (one multiple ack per 500), nothing else."""
    connection = connect()
    channel = connection.channel()
    channel.basic_qos(prefetch_count=2000)
    seen = 0
    for method, _, body in channel.consume(config.QUEUE):
        json.loads(body)
        seen += 1
        if seen % 500 == 0 or seen == count:
            channel.basic_ack(method.delivery_tag, multiple=True)
        if seen == count:
            break
    channel.cancel()
    connection.close()


def insert_only(collection, documents):
    """(c) plain insert_many, batches of 1,000, unordered."""
    for first in range(0, len(documents), 1000):
        collection.insert_many(documents[first:first + 1000], ordered=False)


def drain_one_at_a_time(collection, count):
    """(d) the original design: insert_one, then ack, for every message."""
    connection = connect()
    channel = connection.channel()
    seen = 0
    for method, properties, body in channel.consume(config.QUEUE):
        collection.insert_one(to_document(body, properties.message_id, properties.timestamp))
        channel.basic_ack(method.delivery_tag)
        seen += 1
        if seen == count:
            break
    channel.cancel()
    connection.close()


def latency(mongo, rate, seconds):
    """Publish to stored at a steady rate: p50 and p99 in ms, from server.py's log of stored batches."""
    fresh_collection(mongo)
    connection = connect()
    channel = connection.channel()
    StatusServer._declare_topology(channel)
    # One process, so that the store's order is the queue's (see below); start-up is not measured.
    server = ServerProcess("server-latency.log", processes=1)
    total = int(rate * seconds)
    published_at = []
    try:
        started = time.perf_counter()
        for index, body in enumerate(bodies(total)):
            due = started + index / rate
            while time.perf_counter() < due:
                connection.sleep(min(0.001, max(0.0, due - time.perf_counter())))
            channel.basic_publish(config.EXCHANGE, config.ROUTING_KEY, body, pika.BasicProperties(delivery_mode=2))
            published_at.append(time.perf_counter())
        server.wait_stored(total, timeout=60)
    finally:
        server.stop()
        connection.close()
    # One queue and one server keep publish order, so message k is stored once the count passes k.
    stored_at, delays, position = server.stored_at, [], 0
    for index, sent in enumerate(published_at):
        while stored_at[position][1] <= index:
            position += 1
        delays.append((stored_at[position][0] - sent) * 1000)
    delays.sort()
    return delays[len(delays) // 2], delays[int(len(delays) * 0.99)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--baseline-messages", type=int, default=20_000,
                        help="the one-at-a-time baseline is slow: it drains this many")
    parser.add_argument("--rounds", type=int, default=5, help="(a), (a1), (b), (c) and (t) run in turn this many times")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=1_000_000, help="drained once for server.py's peak memory")
    parser.add_argument("--spread-seconds", type=float, default=0.0,
                        help="spread the timestamps over this many seconds, bodies shuffled (of --messages and --backlog)")
    parser.add_argument("--telegraf", action="store_true",
                        help=f"add (t), Telegraf {TELEGRAF_VERSION}, built by scripts/telegraf-build (minutes, once)")
    parser.add_argument("--output", default=str(ROOT / "bench/results/ingest.json"))
    args = parser.parse_args()
    latest = datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp() + args.spread_seconds
    if not 0 <= args.spread_seconds or latest > time.time():
        parser.error("--spread-seconds must be 0 or more and keep every timestamp in the past (from 2026-11-01)")
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    telegraf = telegraf_binary() if args.telegraf else None
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True)
    count, baseline_count = args.messages, min(args.baseline_messages, args.messages)
    messages = bodies(count, args.spread_seconds)
    documents = [to_document(body) for body in messages]

    runs = {}  # name -> [(msg/s, busy CPU microseconds of the whole machine per message)], one per round

    def record(name, messages_done, seconds, cpu_seconds):
        runs.setdefault(name, []).append((messages_done / seconds, cpu_seconds / messages_done * 1e6))

    peak_mb = telegraf_peak_mb = 0.0
    try:
        for _ in range(args.rounds):
            preload(messages)
            seconds, cpu_seconds, round_peak_mb = run_server(mongo, count)
            record("a_server", count, seconds, cpu_seconds)
            peak_mb = max(peak_mb, round_peak_mb)
            if telegraf:
                preload(messages)
                seconds, cpu_seconds, round_telegraf_mb = run_telegraf(mongo, count, telegraf)
                record("t_telegraf", count, seconds, cpu_seconds)
                telegraf_peak_mb = max(telegraf_peak_mb, round_telegraf_mb)
            preload(messages)
            record("a1_one_process", count, *run_server(mongo, count, processes=1)[:2])
            preload(messages)
            record("b_broker_ceiling", count, *timed(lambda: drain_parse_only(count)))
            collection = fresh_collection(mongo)
            record("c_store_ceiling", count, *timed(lambda: insert_only(collection, [dict(d) for d in documents])))
        preload(messages[:baseline_count])
        collection = fresh_collection(mongo)
        record("d_one_at_a_time", baseline_count, *timed(lambda: drain_one_at_a_time(collection, baseline_count)))
        p50, p99 = latency(mongo, 1000, args.latency_seconds)
        preload(bodies(args.backlog, args.spread_seconds))
        backlog_seconds, _, backlog_peak_mb = run_server(mongo, args.backlog)
    finally:
        remove_run(mongo)

    rates = {name: statistics.median(rate for rate, _ in done) for name, done in runs.items()}
    cpu_us = {name: statistics.median(cpu for _, cpu in done) for name, done in runs.items()}
    ceiling = min(rates["b_broker_ceiling"], rates["c_store_ceiling"])
    # (b) and (c) each ran alone; (a) does both jobs on the same cores, so it cannot beat
    # the rate at which the machine's CPU pays for (b) and (c) per message together.
    both_jobs = os.cpu_count() * 1e6 / (cpu_us["b_broker_ceiling"] + cpu_us["c_store_ceiling"])
    result = {
        "machine": {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
                    "python": platform.python_version(), "store": store_name(mongo)},
        "messages": count, "baseline_messages": baseline_count, "rounds": args.rounds,
        "spread_seconds": args.spread_seconds,
        "rates_per_second": {name: round(rate) for name, rate in rates.items()},
        "rates_per_second_by_round": {name: [round(rate) for rate, _ in done] for name, done in runs.items()},
        "server_vs_smaller_ceiling": round(rates["a_server"] / ceiling, 2),
        "server_vs_one_at_a_time": round(rates["a_server"] / rates["d_one_at_a_time"], 1),
        "server_processes": config.SERVER_PROCESSES,
        "one_process_vs_smaller_ceiling": round(rates["a1_one_process"] / ceiling, 2),
        "machine_cpu_us_per_message": {name: round(value, 1) for name, value in cpu_us.items()},
        "cpu_bound_for_both_jobs_per_second": round(both_jobs),
        "server_vs_cpu_bound_for_both_jobs": round(rates["a_server"] / both_jobs, 2),
        "server_peak_rss_mb": round(peak_mb, 1),
        "backlog": {"messages": args.backlog, "server_per_second": round(args.backlog / backlog_seconds),
                    "server_peak_rss_mb": round(backlog_peak_mb, 1)},
        "latency_at_1000_per_second_ms": {"p50": round(p50, 1), "p99": round(p99, 1)},
    }
    if telegraf:
        result["telegraf"] = {"version": TELEGRAF_VERSION, "peak_rss_mb": round(telegraf_peak_mb, 1),
                              "server_vs_telegraf": round(rates["a_server"] / rates["t_telegraf"], 2)}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    order = f"timestamps over {args.spread_seconds:,.0f} s, shuffled" if args.spread_seconds else "timestamps in order"
    print(f"ingest, {count:,} messages ({baseline_count:,} for the baseline, {order}), median of {args.rounds} rounds, "
          f"{result['machine']}")
    print(f"{'consumer':<44}{'msg/s':>10}{'CPU us/msg':>12}  each round")
    labels = {"a_server": f"(a) server.py ({config.SERVER_PROCESSES} processes)", "a1_one_process": "(a1) server.py --processes 1", "b_broker_ceiling": "(b) parse + ack only (broker ceiling)",
              "c_store_ceiling": "(c) insert_many x1000 (store ceiling)", "d_one_at_a_time": "(d) insert_one + ack (baseline)",
              "t_telegraf": f"(t) Telegraf {TELEGRAF_VERSION} amqp -> mongodb"}
    for name, label in labels.items():
        if name not in runs:
            continue
        print(f"{label:<44}{rates[name]:>10,.0f}{cpu_us[name]:>12.0f}  {' '.join(f'{rate:,.0f}' for rate, _ in runs[name])}")
    print(f"(a) / min(b, c) = {result['server_vs_smaller_ceiling']:.2f}   (a) / (d) = {result['server_vs_one_at_a_time']:.1f}x   "
          f"(a1) / min(b, c) = {result['one_process_vs_smaller_ceiling']:.2f}")
    if telegraf:
        print(f"(a) / (t) = {result['telegraf']['server_vs_telegraf']:.2f}   (t) / min(b, c) = {rates['t_telegraf'] / ceiling:.2f}   "
              f"Telegraf peak RSS {telegraf_peak_mb:.0f} MB")
    print(f"CPU us/msg counts every process on the machine. (b) + (c) together cost {cpu_us['b_broker_ceiling'] + cpu_us['c_store_ceiling']:.0f} us/msg: "
          f"{os.cpu_count()} cores pay for both jobs at {both_jobs:,.0f} msg/s at most; (a) = {result['server_vs_cpu_bound_for_both_jobs']:.2f} of that")
    print(f"publish-to-stored at 1,000 msg/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(f"server.py peak RSS, its processes' peaks added up: {peak_mb:.0f} MB ({count:,}); draining a backlog of {args.backlog:,}: "
          f"{backlog_peak_mb:.0f} MB, {args.backlog / backlog_seconds:,.0f} msg/s")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
