"""Soak: the pipeline as shipped for --minutes under live ingest, queries and kill -9.

    .venv/bin/python bench/soak.py                  # 30 minutes (make soak)
    .venv/bin/python bench/soak.py --minutes 3 --kill-every 40   # quick

server.py (as shipped: one process per core) consumes what client.py's publisher sends at
--rate messages a second, with publisher confirms, timestamped now, one in twenty a backfill
up to a day old; api.py answers a query loop over ranges that end at now. Every --kill-every
seconds one server process gets SIGKILL, the parent and a child in turn (server.py's
processes go down together), and server.py is started again at once, as a service manager
would. At the end, once publishing stopped and every message was confirmed:
- the store must still answer: a ping, an insert and /status-count for the last hour, each
  within a second;
- lost = 0 and dup = 0: the stored documents are exactly the confirmed messages;
- every range checked (ranges that end at now, the whole soak, random millisecond ranges)
  is answered exactly as one pass over the raw documents counts it.
Prints a summary, writes bench/results/soak.json and exits 1 if any of these fails.
"""

import argparse
import base64
import bisect
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ingest import ROOT, connect, store_name  # sets this run's exchange, queue and database names before config is read
from live import KINDS, Publisher, ask, clean_up, iso, percentile, start_api

import pymongo  # noqa: E402

import config  # noqa: E402
import counts  # noqa: E402
from server import StatusServer  # noqa: E402


class RecordingPublisher(Publisher):
    """live.Publisher that remembers the message_id of everything it publishes."""

    def __init__(self, rate, rng):
        self.message_ids = set()
        super().__init__(rate, rng)

    def _messages(self):
        for message in super()._messages():
            self.message_ids.add(message[0])
            yield message


class SupervisedServer(threading.Thread):
    """server.py, started again whenever it exits, as a service manager restarts it."""

    def __init__(self, log_path):
        super().__init__(daemon=True)
        self.log = open(log_path, "ab")
        self.process, self.starts = None, 0
        self.stopping = threading.Event()
        self.started = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.process = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=ROOT,
                                            stdout=self.log, stderr=subprocess.STDOUT)
            self.starts += 1
            self.started.set()
            self.process.wait()

    def pids(self):
        """[parent, *children] of the running server.py."""
        pid = self.process.pid
        try:
            return [pid, *map(int, open(f"/proc/{pid}/task/{pid}/children").read().split())]
        except OSError:
            return [pid]

    def stop(self):
        self.stopping.set()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)
        self.join(60)


class Killer(threading.Thread):
    """SIGKILL to one server.py process every `every` seconds: the parent, then a child."""

    def __init__(self, server, every):
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.kills = []  # (seconds since the soak began, "parent" or "child")
        self.stopping = threading.Event()

    def run(self):
        began = time.monotonic()
        for turn in itertools.count():
            if self.stopping.wait(self.every):
                return
            pids = self.server.pids()
            which = "child" if turn % 2 and len(pids) > 1 else "parent"
            try:
                os.kill(pids[1] if which == "child" else pids[0], signal.SIGKILL)
            except ProcessLookupError:
                continue  # it was being restarted
            self.kills.append((round(time.monotonic() - began), which))


class SoakQueries(threading.Thread):
    """Ranges that end at now, back to back; failures are counted, not fatal."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.latencies, self.errors = port, [], []
        self.stopping = threading.Event()

    def run(self):
        for kind in itertools.cycle(KINDS.values()):
            if self.stopping.is_set():
                return
            end = datetime.now(timezone.utc)
            try:
                self.latencies.append(ask(self.port, end - kind, end)[0])
            except (OSError, ValueError) as error:
                self.errors.append(repr(error))
                time.sleep(0.5)


def wait_for(condition, timeout, what, interval=2.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: {what} not within {timeout:.0f} s")
        time.sleep(interval)


def timed_ms(action):
    began = time.perf_counter()
    action()
    return (time.perf_counter() - began) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=1000, help="messages per second")
    parser.add_argument("--kill-every", type=float, default=180, help="seconds between two kill -9")
    parser.add_argument("--drain-timeout", type=float, default=3600, help="seconds allowed, after publishing, to drain")
    parser.add_argument("--output", default=str(ROOT / "bench/results/soak.json"))
    parser.add_argument("--keep", action="store_true", help="keep the database and the queue afterwards")
    args = parser.parse_args()
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    rng = random.Random(31)
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True)
    database = mongo[config.MONGO_DB]
    collection = database[config.MONGO_COLLECTION]
    connection = connect()
    StatusServer._declare_topology(connection.channel())
    connection.close()
    api = server = None
    failures = []
    try:
        server = SupervisedServer(ROOT / "bench/results/server-soak.log")
        server.start()
        server.started.wait(30)
        api, port = start_api("api-soak.log")
        began = datetime.now(timezone.utc)
        publisher, queries, killer = RecordingPublisher(args.rate, random.Random(32)), SoakQueries(port), Killer(server, args.kill_every)
        for thread in (publisher, queries, killer):
            thread.start()
        time.sleep(args.minutes * 60)
        killer.stopping.set()
        killer.join()
        publisher.stop()
        queries.stopping.set()
        queries.join(120)
        if publisher.is_alive() or publisher.publisher.unconfirmed or publisher.publisher.refused:
            failures.append(f"publishing: {publisher.publisher.unconfirmed} unconfirmed, "
                            f"{publisher.publisher.refused} refused")
        sent = len(publisher.message_ids)

        # Done when the queue holds nothing, delivered or not, and every batch is recorded and folded.
        # (A count of the raw collection would read all of it on FerretDB: minutes at millions.)
        # The management API's figures may be 5 s old: twice in a row, 6 s apart.
        log = database[f"{config.MONGO_COLLECTION}_counts_log"]
        intents = database[f"{config.MONGO_COLLECTION}_counts_intents"]
        readings = []
        wait_for(lambda: readings.append(queue_messages() == 0 and not log.count_documents({"_id": {"$regex": "^c:"}})
                                         and not intents.count_documents({}))
                 or readings[-2:] == [True, True], args.drain_timeout, "the queue drained and the counts folded", 6)

        end = datetime.now(timezone.utc)
        probes = {
            "ping": timed_ms(lambda: database.command("ping")),
            "insert": timed_ms(lambda: database["soak_probe"].insert_one({"at": end})),
            "last hour": timed_ms(lambda: ask(port, end - timedelta(hours=1), end)),
        }
        failures += [f"{name} took {ms:.0f} ms" for name, ms in probes.items() if ms > 1000]

        ranges = [(end - length, end) for length in KINDS.values()] + [(began, end)]
        for _ in range(20):
            start = began - timedelta(days=1) + timedelta(milliseconds=rng.randrange(int((end - began).total_seconds() * 1000) + 86_400_000))
            ranges.append((start, start + timedelta(milliseconds=rng.randrange(3_600_000))))
        stored_ids, times = set(), [[] for _ in range(counts.STATUSES)]
        for document in collection.find({}, {"timestamp": 1, "status": 1}, batch_size=10_000):
            stored_ids.add(document["_id"])
            times[document["status"]].append(counts.epoch_ms(document["timestamp"]))
        stored = sum(map(len, times))
        lost, dup = len(publisher.message_ids - stored_ids), stored - len(publisher.message_ids & stored_ids)
        if lost or dup:
            failures.append(f"lost {lost}, dup {dup}")
        wrong = 0
        for values in times:
            values.sort()
        for start, stop in ranges:
            low, high = counts.epoch_ms(start), counts.epoch_ms(stop)
            want = [bisect.bisect_left(values, high) - bisect.bisect_left(values, low) for values in times]
            _, answer = ask(port, start, stop)
            got = [answer["counts"][str(status)] for status in range(counts.STATUSES)]
            if got != want:
                wrong += 1
                failures.append(f"{iso(start)}..{iso(stop)}: API {got} != raw {want}")
    finally:
        clean_up(api, server, mongo, args.keep)

    result = {
        "machine": {"cores": os.cpu_count(), "store": store_name(mongo)},
        "minutes": args.minutes, "rate": args.rate, "published_and_confirmed": sent, "stored": stored,
        "lost": lost, "dup": dup, "kills": killer.kills, "server_starts": server.starts,
        "queries": len(queries.latencies), "query_errors": len(queries.errors),
        "query_ms": {"p50": round(percentile(queries.latencies, 0.5), 1),
                     "p99": round(percentile(queries.latencies, 0.99), 1)},
        "probes_ms": {name: round(ms, 1) for name, ms in probes.items()},
        "ranges_checked": len(ranges), "ranges_wrong": wrong, "failures": failures,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"soak, {args.minutes:g} minutes at {args.rate:g} msg/s, store {result['machine']['store']}: "
          f"{sent:,} published and confirmed, {stored:,} stored; lost {lost}, dup {dup}")
    print(f"{len(killer.kills)} kill -9 ({', '.join(f'{which} at {at} s' for at, which in killer.kills)}); "
          f"server.py started {server.starts} times")
    print(f"{len(queries.latencies):,} queries ending at now: p50 {result['query_ms']['p50']} ms, "
          f"p99 {result['query_ms']['p99']} ms, {len(queries.errors)} failed")
    print("after: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in probes.items()))
    print(f"{len(ranges)} ranges checked against one pass over the raw documents: {len(ranges) - wrong} equal")
    print(f"written to {args.output}")
    for failure in failures:
        print(f"FAILED: {failure}")
    sys.exit(1 if failures else 0)


def queue_messages():
    """Messages in this run's queue, ready or delivered and not acknowledged (RabbitMQ's
    management API; its figures are at most a few seconds old)."""
    url = urllib.parse.urlparse(config.RABBITMQ_URL)
    request = urllib.request.Request(f"http://{url.hostname}:15672/api/queues/%2F/{config.QUEUE}")
    request.add_header("Authorization", "Basic " + base64.b64encode(
        f"{urllib.parse.unquote(url.username)}:{urllib.parse.unquote(url.password)}".encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response).get("messages", 1)


if __name__ == "__main__":
    main()
