"""Live benchmark: /status-count for ranges that end at now, while messages arrive.

    .venv/bin/python bench/live.py                       # 1,000,000 messages stored first
    .venv/bin/python bench/live.py --messages 10000000   # 10,000,000
    .venv/bin/python bench/live.py --messages 20000 --seconds 10 --burst 2000 --rounds 1   # quick

Everything goes through the programs as shipped: the stored messages are published to
RabbitMQ (timestamps spread over the last --days, in random order, as a fleet flushing what
it buffered) and drained by server.py; api.py answers over HTTP. Then, for --seconds:
- messages arrive at --rate per second, timestamped now, and one in twenty is a backfill
  (a device that was offline: a timestamp up to a day old);
- a query loop asks for ranges that end at now, with millisecond bounds: the last 5 minutes,
  1 hour, 24 hours, 7 days and 30 days; p50 and p99 per kind, and how many reads began
  again because a folding round rewrote what they were reading (api.py's metric);
- the naive aggregation over the raw documents answers one range, for comparison.
Then the burst ratio: how fast server.py stores a burst of --burst messages while a
dashboard's load runs (two queries a second over the ranges above) against without it,
interleaved for --rounds rounds (median of the ratios). Last, once everything is stored,
every kind of range (and random millisecond ranges) is checked against one pass over the
raw documents. Prints a table and writes bench/results/live.json.
"""

import argparse
import bisect
import itertools
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ingest  # sets this run's exchange, queue and database names before config is read
from ingest import ROOT, ServerProcess, connect, free_port, store_name

import pymongo  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import config  # noqa: E402
from client import AmqpPublisher  # noqa: E402
import counts  # noqa: E402
from server import StatusServer  # noqa: E402

KINDS = {"5 minutes": timedelta(minutes=5), "1 hour": timedelta(hours=1), "24 hours": timedelta(hours=24),
         "7 days": timedelta(days=7), "30 days": timedelta(days=30)}
SERIES = {"series: 24 hours by 1m": (timedelta(hours=24), "1m"), "series: 30 days by 1h": (timedelta(days=30), "1h")}


def iso(moment):
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message(status, moment):
    """(message_id, status, body) as client.py publishes them, timestamped `moment`."""
    message_id = str(uuid.uuid4())
    fields = {"status": status, "message_id": message_id, "timestamp": iso(moment)}
    return message_id, status, json.dumps(fields).encode()


def confirmed_publisher(messages, count=None, interval=0.0):
    """client.py's publisher, with publisher confirms: a message published without them may
    still be lost when its channel closes (seen with quorum queues on RabbitMQ 3.10)."""
    return AmqpPublisher(config.RABBITMQ_URL, count, interval, 1000, None, 60, messages=messages)


def publish(publisher, count=None):
    """Runs `publisher` to the end; the number of messages confirmed."""
    publisher.run()
    if publisher.refused or publisher.unconfirmed or (count is not None and publisher.confirmed != count):
        raise SystemExit(f"publishing failed: {publisher.confirmed} confirmed, {publisher.refused} refused, "
                         f"{publisher.unconfirmed} unconfirmed")
    return publisher.confirmed


def publish_backlog(count, days, rng):
    """`count` messages over the last `days` (ending a minute ago), in random order."""
    connection = connect()
    StatusServer._declare_topology(connection.channel())
    connection.close()
    now = datetime.now(timezone.utc) - timedelta(minutes=1)
    span_ms = int(days * 86400 * 1000)
    messages = (message(index % 7, now - timedelta(milliseconds=rng.randrange(span_ms))) for index in range(count))
    publish(confirmed_publisher(messages, count), count)


FORK = multiprocessing.get_context("fork")  # the child inherits this run's names, set by ingest at import


class Publisher(FORK.Process):
    """Messages at a steady rate, timestamped now; one in twenty a backfill up to a day old.
    A process of its own: in the query loop's, its Python work would hold the interpreter lock
    that the loop's requests wait for, and a dashboard is not in the publisher's process."""

    def __init__(self, rate, seed):
        super().__init__(daemon=True)
        self.rate, self.seed, self._parent = rate, seed, os.getpid()
        self._stopping = FORK.Event()
        self._sent = FORK.Value("q", -1)  # -1 until it has ended well

    def _messages(self, rng):
        for index in itertools.count():
            now = datetime.now(timezone.utc)
            moment = now - timedelta(milliseconds=rng.randrange(86_400_000)) if index % 20 == 19 else now
            yield message(rng.randrange(7), moment)

    def _stop_when_asked_or_orphaned(self, publisher):
        while not self._stopping.wait(1) and os.getppid() == self._parent:  # a killed bench leaves no publisher
            pass
        publisher.stop()

    def run(self):  # in the child
        publisher = confirmed_publisher(self._messages(random.Random(self.seed)), interval=1 / self.rate)
        threading.Thread(target=self._stop_when_asked_or_orphaned, args=(publisher,), daemon=True).start()
        self._sent.value = publish(publisher)

    def check(self):
        """Raises SystemExit if the publisher has ended before it was asked to."""
        if not self.is_alive():
            raise SystemExit(f"the live publisher ended early (exit {self.exitcode}); see its output above")

    def stop(self):
        """Stops publishing; returns once every message published is confirmed. Raises SystemExit
        if it failed or did not stop within 120 s."""
        self._stopping.set()
        self.join(120)
        if self.is_alive():
            self.terminate()
            raise SystemExit("the live publisher did not stop within 120 s")
        if self._sent.value < 0:
            raise SystemExit(f"the live publisher failed (exit {self.exitcode}); see its output above")

    @property
    def sent(self):
        return self._sent.value


def ask(port, start, end, step=None):
    """(ms, answer) of one GET /status-count, or /status-series with `step`."""
    url = f"http://127.0.0.1:{port}/status-count?start={iso(start)}&end={iso(end)}"
    if step:
        url = url.replace("/status-count", "/status-series") + f"&step={step}"
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        answer = json.load(response)
    return (time.perf_counter() - began) * 1000, answer


class QueryLoop(threading.Thread):
    """Ranges that end at now, in turn (and series too, with `series`), `per_second` a
    second (0: back to back)."""

    def __init__(self, port, per_second=0, series=False):
        super().__init__(daemon=True)
        self.port, self.per_second = port, per_second
        self.kinds = {**{kind: (length, None) for kind, length in KINDS.items()}, **(SERIES if series else {})}
        self.latencies = {kind: [] for kind in self.kinds}
        self.stopping = threading.Event()

    def run(self):
        kinds = list(self.kinds)
        started, asked = time.perf_counter(), 0
        while not self.stopping.is_set():
            kind = kinds[asked % len(kinds)]
            end = datetime.now(timezone.utc)
            length, step = self.kinds[kind]
            elapsed, _ = ask(self.port, end - length, end, step)
            self.latencies[kind].append(elapsed)
            asked += 1
            if self.per_second:
                self.stopping.wait(max(0.0, started + asked / self.per_second - time.perf_counter()))


def burst(count, rng, server):
    """msg/s at which server.py stores `count` messages published at once."""
    before = server.stored_at[-1][1]
    now = datetime.now(timezone.utc)
    messages = [message(rng.randrange(7), now) for _ in range(count)]
    began = time.perf_counter()
    publish(confirmed_publisher(iter(messages), count), count)
    return count / (server.wait_stored(before + count, timeout=600) - began)


def reads_started_over(port):
    """api.py's count of reads begun again because a folding round rewrote what they read."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        text = response.read().decode()
    return next(int(sample.value) for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == "status_api_count_reads_started_over_total")


def one_pass(collection, ranges):
    """[count per status] for every range from one read of the raw documents."""
    times = [[] for _ in range(counts.STATUSES)]
    for document in collection.find({}, {"timestamp": 1, "status": 1, "_id": 0}, batch_size=10_000):
        times[document["status"]].append(counts.epoch_ms(document["timestamp"]))
    for values in times:
        values.sort()
    answers = []
    for start, end in ranges:
        low, high = counts.epoch_ms(start), counts.epoch_ms(end)
        answers.append([bisect.bisect_left(values, high) - bisect.bisect_left(values, low) for values in times])
    return sum(map(len, times)), answers


def start_api(log_name):
    """(process, port) of api.py on a free port (another run's api.py may hold any fixed one),
    once it answers /health."""
    port = free_port()
    api = subprocess.Popen([sys.executable, str(ROOT / "api.py")], cwd=ROOT, env=dict(os.environ, API_PORT=str(port)),
                           stdout=open(ROOT / "bench/results" / log_name, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while api.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            return api, port
        except OSError:
            time.sleep(0.2)
    api.kill()
    raise SystemExit(f"api.py did not answer; see bench/results/{log_name}")


def clean_up(api, server, mongo, keep):
    """Stops api.py and server.py; deletes this run's queues, exchanges and database unless `keep`."""
    if api:
        api.terminate()
        api.wait(30)
    if server:
        server.stop()
    if keep:
        print(f"kept: database {config.MONGO_DB}, queue {config.QUEUE}")
    else:
        ingest.remove_run(mongo)


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="stored before the live phase")
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--rate", type=float, default=1000, help="live messages per second")
    parser.add_argument("--seconds", type=float, default=60, help="length of the live phase")
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="burst rounds with and without the dashboard's load")
    parser.add_argument("--naive", type=int, default=1, help="naive aggregations timed (each reads every document)")
    parser.add_argument("--output", default=str(ROOT / "bench/results/live.json"))
    parser.add_argument("--keep", action="store_true", help="keep the database and the queue afterwards")
    args = parser.parse_args()
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True)
    collection = mongo[config.MONGO_DB][config.MONGO_COLLECTION]
    api = server = None
    try:
        began = time.perf_counter()
        publish_backlog(args.messages, args.days, rng)
        published_seconds = time.perf_counter() - began
        server = ServerProcess("server-live.log")
        load_seconds = server.wait_stored(args.messages, timeout=7200) - server.ready_at[0]
        log = mongo[config.MONGO_DB][f"{config.MONGO_COLLECTION}_counts_log"]
        while log.count_documents({"_id": {"$regex": "^c:"}}):  # stored means counted too: the folder catches up
            time.sleep(1)
        fold_seconds = time.perf_counter() - server.stored_at[-1][0]
        api, port = start_api("api-live.log")

        publisher, queries = Publisher(args.rate, 12), QueryLoop(port, series=True)
        publisher.start()
        started_over = reads_started_over(port)
        queries.start()
        time.sleep(args.seconds)
        publisher.check()
        queries.stopping.set()
        queries.join(120)
        started_over = reads_started_over(port) - started_over
        naive_ms = []
        for _ in range(args.naive):  # while messages still arrive
            end = datetime.now(timezone.utc)
            began = time.perf_counter()
            counts.raw_counts(collection, end - timedelta(hours=1), end)
            naive_ms.append((time.perf_counter() - began) * 1000)
        publisher.stop()

        ratios, alone, loaded = [], [], []
        for _ in range(args.rounds):
            alone.append(burst(args.burst, rng, server))
            dashboard = QueryLoop(port, per_second=2)
            dashboard.start()
            loaded.append(burst(args.burst, rng, server))
            dashboard.stopping.set()
            dashboard.join(120)
            ratios.append(loaded[-1] / alone[-1])

        total = args.messages + publisher.sent + 2 * args.rounds * args.burst
        server.wait_stored(total, timeout=600)
        now = datetime.now(timezone.utc)
        ranges = [(now - length, now) for length in KINDS.values()]
        ranges += [(now - timedelta(milliseconds=rng.randrange(40 * 86_400_000)),) for _ in range(20)]
        ranges = [r if len(r) == 2 else (r[0], r[0] + timedelta(milliseconds=rng.randrange(3 * 86_400_000))) for r in ranges]
        _, series = ask(port, now - timedelta(hours=24), now, "1h")  # and each bucket of a series
        buckets = {tuple(datetime.fromisoformat(bucket[edge].replace("Z", "+00:00")) for edge in ("start", "end")): bucket
                   for bucket in series["buckets"]}
        ranges += list(buckets)
        stored, expected = one_pass(collection, ranges)
        if stored != total:
            raise SystemExit(f"the collection holds {stored} documents, not {total}")
        for (start, end), want in zip(ranges, expected):
            _, answer = ask(port, start, end)
            if (start, end) in buckets:
                answer = buckets[start, end]
            got = [answer["counts"][str(status)] for status in range(counts.STATUSES)]
            if got != want:
                raise SystemExit(f"wrong answer for {iso(start)}..{iso(end)}: {got} != {want} (raw documents)")
    finally:
        clean_up(api, server, mongo, args.keep)

    every = [value for kind in KINDS for value in queries.latencies[kind]]
    result = {
        "machine": {"cores": os.cpu_count(), "store": store_name(mongo)},
        "messages": args.messages, "days": args.days, "publish_seconds": round(published_seconds),
        "load_through_server_seconds": round(load_seconds), "load_per_second": round(args.messages / load_seconds),
        "folded_seconds_after_load": round(fold_seconds),
        "live": {"rate": args.rate, "seconds": args.seconds, "sent": publisher.sent, "queries": len(every)},
        "ms_by_kind": {kind: {"p50": round(percentile(values, 0.5), 1), "p99": round(percentile(values, 0.99), 1),
                              "queries": len(values)} for kind, values in queries.latencies.items()},
        "ms_all": {"p50": round(percentile(every, 0.5), 1), "p99": round(percentile(every, 0.99), 1)},
        "reads_started_over": started_over, "requests": sum(map(len, queries.latencies.values())),
        "naive_ms": [round(value) for value in naive_ms],
        "burst": {"messages": args.burst, "alone_per_second": [round(v) for v in alone],
                  "with_dashboard_per_second": [round(v) for v in loaded], "ratios": [round(r, 2) for r in ratios],
                  "median_ratio": round(statistics.median(ratios), 2)},
        "checked_ranges": len(ranges), "all_answers_equal_raw": True,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"live, {args.messages:,} messages over {args.days:g} days loaded through server.py in {load_seconds:.0f} s "
          f"({result['load_per_second']:,}/s; all folded {fold_seconds:.0f} s later), store {result['machine']['store']}")
    print(f"{args.seconds:g} s at {args.rate:g} msg/s ({publisher.sent:,} sent, 1 in 20 a backfill), {len(every)} queries ending at now")
    print(f"{'range ending at now':<24}{'p50 ms':>10}{'p99 ms':>10}{'queries':>10}")
    for kind, values in result["ms_by_kind"].items():
        print(f"{kind:<24}{values['p50']:>10}{values['p99']:>10}{values['queries']:>10}")
    print(f"{'all':<24}{result['ms_all']['p50']:>10}{result['ms_all']['p99']:>10}")
    print(f"reads begun again because a folding round rewrote what they read: {started_over} in "
          f"{result['requests']} requests")
    if naive_ms:
        print(f"naive aggregation (last hour, over the raw documents): {statistics.median(naive_ms):,.0f} ms")
    print(f"burst of {args.burst:,}: alone {statistics.median(alone):,.0f} msg/s, with two queries a second "
          f"{statistics.median(loaded):,.0f} msg/s; ratio per round {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {result['burst']['median_ratio']:.2f})")
    print(f"every answer equal to the raw documents' ({len(ranges)} ranges, one pass over {stored:,} documents)")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
