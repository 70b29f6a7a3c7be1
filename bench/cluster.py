"""Cluster benchmark: draining a backlog on three RabbitMQ nodes against one, and failover time.

    .venv/bin/python bench/cluster.py                                            # defaults, ~4 minutes
    .venv/bin/python bench/cluster.py --messages 5000 --rounds 1 --failovers 2   # quick

Needs `scripts/services up` (the single node, FerretDB) and `scripts/services cluster up` (three
nodes, driven through tests/cluster.py's Cluster). Every run has names of its own, bench_cluster_<run>
(its exchange, queue and database, set through EXCHANGE, QUEUE and MONGO_DB), declared as server.py
declares them (quorum queues, x-quorum-initial-group-size 3: a member on each node of the cluster,
the one member on the single node), and deleted, database and all, after the run. Everything logs
in as admin; the logs go to bench/results/cluster-*.log.

1. Drain rate. A backlog of --messages status messages is loaded into the queue (not timed), then
   three `server.py --processes 1` drain it, timed from when the first consumes until their logs
   add up to every message stored (the collection is counted once, after):
     (cluster) one process on each node: their RABBITMQ_URL lists the three nodes, rotated so that
               each one's first node differs;
     (single)  the same three processes on the single node of `scripts/services up`.
   The machine's speed drifts, so the two alternate for --rounds rounds (the first of each round
   alternating too); each reports its median in msg/s, and the ratio is cluster / single.
2. Failover time, --failovers runs: two `server.py --processes 1` on the cluster (one with the
   node of the queue's leader first in its list, one with another node first) and client.py
   publishing steadily (--interval 0.01, a node that survives first in its list). After
   --steady-seconds of storing, kill -9 of the node that holds the quorum queue's leader; the
   failover time is from the kill until the collection holds a first document whose `timestamp`
   (client.py stamps each message when it makes it) is later than the kill: until messages are
   stored again. Then the node is restarted and rejoins (Cluster.up, wait_complete) while the
   programs run on, the client is stopped, and every message it saw confirmed must be stored
   once: lost and duplicated are reported, with the counts (counts.py) against the stored ones.
Prints a table and writes bench/results/cluster.json.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.error import HTTPError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUN = uuid.uuid4().hex[:8]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pika  # noqa: E402
import pymongo  # noqa: E402

import config  # noqa: E402
import counts  # noqa: E402
from cluster import Cluster, ClusterError  # noqa: E402

STORED = re.compile(r"DEBUG stored \d+ messages \((\d+) in all\)")  # server.py, after each batch's write and ack
CONFIRMED = re.compile(r"confirmed status=\d message_id=(\S+)")  # client.py, each confirm
CONNECTED = re.compile(r"connected to RabbitMQ at \S+:(\d+)")  # both, each connection
# server.py's own topology (server.StatusServer._declare_topology), declared in a child with the run's
# names: the module reads them from the environment when it is imported. The exchange is the
# benchmark's, as rabbitmq/definitions.json's status_exchange is the pipeline's.
DECLARE = """
import pika, config
from server import StatusServer
connection = pika.BlockingConnection(config.amqp_parameters(config.RABBITMQ_URL))
channel = connection.channel()
channel.exchange_declare(config.EXCHANGE, exchange_type="topic", durable=True)
StatusServer._declare_topology(channel)
connection.close()
"""
PROGRAMS = []  # every program started, stopped in main()'s finally whatever happened


def order_from(node):
    """The three nodes, `node` first."""
    return tuple((node - 1 + step) % 3 + 1 for step in range(3))


def single_node_url(tls):
    """The admin URL of `scripts/services up`'s node (config.rabbitmq_url). Without `tls`, its default
    amqps on localhost:5671 becomes plain amqp on 5672, as the cluster's nodes are reached."""
    url = config.rabbitmq_url("admin")
    if not tls and url.startswith("amqps://") and "@localhost:5671/" in url:
        url = url.replace("amqps://", "amqp://", 1).replace("@localhost:5671/", "@localhost:5672/", 1).partition("?")[0]
    return url


class Run:
    """The names of one drain or failover run, bench_cluster_<RUN>_<label>, and their clean-up."""

    def __init__(self, label, url, mongo):
        self.name = f"bench_cluster_{RUN}_{label}"
        self.url, self.mongo = url, mongo  # url: the admin URL(s) of the broker, comma-separated
        self.env = dict(os.environ, EXCHANGE=self.name, QUEUE=self.name, MONGO_DB=self.name, ROUTING_KEY="status_topic",
                        RABBITMQ_URL=url, METRICS_PORT="0", PYTHONUNBUFFERED="1")
        self.collection = mongo[self.name][config.MONGO_COLLECTION]

    def connect(self):
        return pika.BlockingConnection(config.amqp_parameters(self.url))  # the first node that answers

    def declare(self):
        subprocess.run([sys.executable, "-c", DECLARE], cwd=ROOT, env=self.env, check=True, timeout=60)

    def preload(self, bodies):
        """The backlog, published without confirms: the queue's depth tells when it is all there."""
        connection = self.connect()
        channel = connection.channel()
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for body in bodies:
            channel.basic_publish(self.name, "status_topic", body, properties)
        deadline = time.monotonic() + 300
        while self.depth(channel) < len(bodies):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: {self.depth(channel)} of {len(bodies)} messages queued after 300 s")
            connection.sleep(0.1)
        connection.close()

    def depth(self, channel=None):
        if channel is not None:
            return channel.queue_declare(self.name, passive=True).method.message_count
        connection = self.connect()
        try:
            return self.depth(connection.channel())
        finally:
            connection.close()

    def stored_ids(self):
        return [document["_id"] for document in self.collection.find({}, {"_id": 1})]

    def remove(self):
        """Its queues, exchanges and database; a failure is reported, not raised (this runs in finally)."""
        try:
            connection = self.connect()
            channel = connection.channel()
            for queue in (self.name, self.name + ".dead", self.name + ".unroutable"):
                channel.queue_delete(queue)
            for exchange in (self.name, self.name + ".unroutable", self.name + ".dlx"):
                channel.exchange_delete(exchange)
            connection.close()
            self.mongo.drop_database(self.name)
        except (pika.exceptions.AMQPError, pymongo.errors.PyMongoError) as error:
            print(f"warning: could not remove {self.name}: {error!r}", file=sys.stderr)


class Program:
    """server.py or client.py, its output in bench/results/cluster-<name>.log, read as it comes: when a
    server stored how many (its log, not a count of the store, which FerretDB answers by reading
    the whole collection), what the client saw confirmed, which nodes each connected to."""

    def __init__(self, name, script, args, env):
        self.name = name
        self.stored = 0  # server.py: stored so far, by its log
        self.stored_at = None  # when that line came
        self.ready_at = None  # when it first said it consumes (server.py) or publishes (client.py)
        self.confirmed = []  # client.py: message ids
        self.nodes = []  # the ports it connected to, in order
        self.warnings = []  # its WARNING and ERROR lines
        self._log = open(RESULTS / f"cluster-{name}.log", "w")
        self.process = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        PROGRAMS.append(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            now = time.monotonic()
            self._log.write(line)
            if found := STORED.search(line):
                self.stored, self.stored_at = int(found.group(1)), now
            elif found := CONFIRMED.search(line):
                self.confirmed.append(found.group(1))
            elif found := CONNECTED.search(line):
                self.nodes.append(int(found.group(1)))
                self.ready_at = self.ready_at or now
            elif " WARNING " in line or " ERROR " in line:
                self.warnings.append(line.strip())

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while self.ready_at is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start; see {self._log.name}")
            time.sleep(0.01)

    def check_running(self):
        if self.process.poll() is not None:
            raise SystemExit(f"{self.name} exited with {self.process.returncode}; see {self._log.name}")

    def stop(self, timeout=60):
        """SIGTERM (client.py: publish no more, wait for the confirms), then kill -9 after `timeout`;
        its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        self._log.close()
        return self.process.returncode


def server(run, name, url):
    return Program(name, "server.py", ["--processes", "1", "--log-level", "DEBUG"], dict(run.env, RABBITMQ_URL=url))


class TimedOut(Exception):
    pass


def wait_until(condition, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimedOut(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return result


def make_bodies(count):
    """Status messages as client.py makes them, 10 ms apart up to a few seconds ago, the same for every drain."""
    start = datetime.now(timezone.utc) - timedelta(seconds=count * 0.01 + 5)
    return [json.dumps({"status": index % 7, "message_id": f"{RUN}-{index}",
                        "timestamp": (start + timedelta(seconds=index * 0.01)).isoformat(timespec="milliseconds")
                        .replace("+00:00", "Z")}).encode() for index in range(count)]


def drain(label, broker_url, server_urls, bodies, mongo):
    """Three server.py --processes 1 (one per URL of `server_urls`) drain a backlog of `bodies`:
    {msg/s, seconds, messages per process, the nodes they connected to}."""
    run = Run(label, broker_url, mongo)
    servers = []
    try:
        run.declare()
        run.preload(bodies)
        servers = [server(run, f"{label}-server-{index}", url) for index, url in enumerate(server_urls, 1)]
        for each in servers:
            each.wait_ready()
        started = min(each.ready_at for each in servers)  # from the first that consumes, as bench/ingest.py

        def drained():
            for each in servers:
                each.check_running()
            return sum(each.stored for each in servers) >= len(bodies)

        wait_until(drained, 3600, f"{label}: {len(bodies)} stored", interval=0.005)
        seconds = max(each.stored_at for each in servers if each.stored_at) - started
        for each in servers:
            each.stop()
        stored = run.collection.count_documents({})  # once, after the clock stopped
        if stored != len(bodies):
            raise SystemExit(f"{label}: the logs say {len(bodies)} stored, the collection holds {stored}")
        return {"per_second": len(bodies) / seconds, "seconds": seconds,
                "per_process": [each.stored for each in servers], "nodes": [each.nodes for each in servers]}
    finally:
        for each in servers:
            each.stop(timeout=10)
        run.remove()


def leader_of(cluster, queue, timeout=60):
    def known():
        with contextlib.suppress(ClusterError, HTTPError, KeyError, StopIteration):  # not known yet
            return cluster.leader(queue)

    return wait_until(known, timeout, f"a leader for {queue}", interval=0.25)


def watch_leader(cluster, queue, doomed, started, stop):
    """In a thread: seconds after `started` at which the management API first names another leader."""
    seen = {}

    def watch():
        while not stop.is_set():
            with contextlib.suppress(ClusterError, HTTPError, KeyError, StopIteration):
                if cluster.leader(queue) != doomed:
                    seen["seconds"] = time.monotonic() - started
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def failover(cluster, index, mongo, steady_seconds, timeout):
    """One failover run: the leader's node killed under steady traffic; the seconds until messages
    are stored again, then whether every confirmed message was stored once."""
    # Declared through node 1, 2, 3 in turn, where its leader starts (client-local): each run kills another node.
    run = Run(f"failover{index}", cluster.url("admin", order_from((index - 1) % 3 + 1)), mongo)
    programs, result = [], {}
    try:
        run.declare()
        doomed = leader_of(cluster, run.name)
        survivor = doomed % 3 + 1
        programs += [server(run, f"failover{index}-server-a", cluster.url("admin", order_from(doomed))),
                     server(run, f"failover{index}-server-b", cluster.url("admin", order_from(survivor)))]
        for each in programs:
            each.wait_ready()
        client = Program(f"failover{index}-client", "client.py", ["--interval", "0.01", "--count", "1000000"],
                         dict(run.env, RABBITMQ_URL=cluster.url("admin", order_from(survivor))))
        programs.append(client)
        servers = programs[:2]
        wait_until(lambda: sum(each.stored for each in servers) > 0, 60, "the first messages stored")
        time.sleep(steady_seconds)
        for each in programs:
            each.check_running()
        doomed = leader_of(cluster, run.name)  # it may have moved meanwhile
        stored_before = run.collection.count_documents({})

        killed_at, started = datetime.now(timezone.utc), time.monotonic()
        cluster.kill(doomed)
        stop_watching = threading.Event()
        watcher, elected = watch_leader(cluster, run.name, doomed, started, stop_watching)
        newer = {"timestamp": {"$gt": killed_at}}
        deadline = started + timeout
        while run.collection.find_one(newer, {"_id": 1}) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds = time.monotonic() - started if time.monotonic() < deadline else None
        stop_watching.set()
        watcher.join(5)
        first = next(iter(run.collection.find(newer, {"received_at": 1}).sort("received_at", 1).limit(1)), None)
        result.update(node_killed=doomed, stored_before_kill=stored_before, seconds=seconds,
                      leader_elected_seconds=elected.get("seconds"),
                      first_received_seconds=(first["received_at"] - killed_at).total_seconds() if first else None)

        rejoin_started = time.monotonic()
        cluster.up()
        cluster.wait_complete([run.name])
        result["rejoin_seconds"] = time.monotonic() - rejoin_started
        for each in programs:
            each.check_running()
        result["client_exit"] = client.stop(timeout=120)
        confirmed = set(client.confirmed)
        wait_until(lambda: confirmed <= set(run.stored_ids()), 120, "every confirmed message stored", interval=0.5)
        wait_until(lambda: run.depth() == 0, 120, "the queue drained", interval=0.5)
        stored = run.stored_ids()
        everything = (datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2100, 1, 1, tzinfo=timezone.utc))
        with contextlib.suppress(TimedOut):  # the servers fold the counts: give them up to 30 s
            wait_until(lambda: sum(counts.count(run.collection, *everything)) == len(stored), 30, "the counts", 0.5)
        counted = sum(counts.count(run.collection, *everything))
        result.update(confirmed=len(confirmed), confirms_logged=len(client.confirmed), stored=len(stored),
                      lost=len(confirmed - set(stored)), duplicated=len(stored) - len(set(stored)),
                      counted_minus_stored=counted - len(stored),
                      nacks=sum("nack" in line for line in client.warnings),
                      warnings={each.name.rpartition("-")[2]: len(each.warnings) for each in programs},
                      nodes={each.name.rpartition("-")[2]: each.nodes for each in programs},
                      server_exit=[each.stop() for each in servers])
        return result
    finally:
        for each in programs:
            each.stop(timeout=10)
        with contextlib.suppress(ClusterError):
            cluster.up()  # a node this run killed comes back before its queues are deleted
        run.remove()


def store_name(mongo):
    info = mongo.server_info()
    return f"FerretDB {info['ferretdbVersion']}" if "ferretdbVersion" in info else f"MongoDB {info['version']}"


def show(value, width, digits=2):
    """A number right-aligned in `width`, or "-" for None."""
    return f"{'-' if value is None else f'{value:.{digits}f}':>{width}}"


def spread(values):
    """median, min and max, or None for each when `values` is empty."""
    return (statistics.median(values), min(values), max(values)) if values else (None, None, None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000, help="the backlog each drain run drains")
    parser.add_argument("--rounds", type=int, default=2, help="(cluster) and (single) drain in turn this many times")
    parser.add_argument("--failovers", type=int, default=5, help="failover runs, each with a kill -9 of the leader's node")
    parser.add_argument("--steady-seconds", type=float, default=5.0, help="of steady storing before each kill")
    parser.add_argument("--failover-timeout", type=float, default=120.0,
                        help="seconds after the kill before a run counts as not recovered")
    parser.add_argument("--single-tls", action="store_true",
                        help="reach the single node over TLS (amqps 5671), as config.rabbitmq_url gives it; by "
                             "default plain amqp on 5672, as the cluster's nodes are reached")
    parser.add_argument("--output", default=str(RESULTS / "cluster.json"))
    args = parser.parse_args()
    if args.messages < 1 or args.rounds < 0 or args.failovers < 0:
        parser.error("--messages must be at least 1, --rounds and --failovers not negative")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks stop every program
    RESULTS.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True)
    cluster = Cluster()
    cluster.up()
    cluster.wait_complete()
    single = single_node_url(args.single_tls)
    bodies = make_bodies(args.messages)

    drains, failovers = {"cluster": [], "single": []}, []
    try:
        for round_ in range(1, args.rounds + 1):
            for kind in ("cluster", "single") if round_ % 2 else ("single", "cluster"):
                if kind == "cluster":
                    done = drain(f"drain{round_}_cluster", cluster.url("admin"),
                                 [cluster.url("admin", order_from(node)) for node in (1, 2, 3)], bodies, mongo)
                else:
                    done = drain(f"drain{round_}_single", single, [single] * 3, bodies, mongo)
                drains[kind].append(done)
                print(f"drain round {round_} {kind}: {done['per_second']:,.0f} msg/s ({done['seconds']:.1f} s), "
                      f"per process {done['per_process']}", flush=True)
        for index in range(1, args.failovers + 1):
            done = failover(cluster, index, mongo, args.steady_seconds, args.failover_timeout)
            failovers.append(done)
            print(f"failover {index}: node {done['node_killed']} killed, stored again after "
                  f"{done['seconds'] if done['seconds'] is None else round(done['seconds'], 2)} s, "
                  f"lost {done['lost']}, duplicated {done['duplicated']}, nacks {done['nacks']}", flush=True)
    finally:
        for program in PROGRAMS:
            if program.process.poll() is None:
                program.process.kill()
                program.process.wait()

    rates = {kind: statistics.median(done["per_second"] for done in runs) if runs else None
             for kind, runs in drains.items()}
    ratio = rates["cluster"] / rates["single"] if rates["cluster"] and rates["single"] else None
    recovered = [done["seconds"] for done in failovers if done["seconds"] is not None]
    failover_median, failover_min, failover_max = spread(recovered)
    elected = [done["leader_elected_seconds"] for done in failovers if done["leader_elected_seconds"] is not None]
    lost, duplicated = sum(done["lost"] for done in failovers), sum(done["duplicated"] for done in failovers)
    miscounted = sum(abs(done["counted_minus_stored"]) for done in failovers)
    executable = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    overview = cluster.management("GET", "/overview")
    result = {
        "command": shlex.join([executable, *sys.argv]),
        "machine": {"cores": os.cpu_count(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
                    "python": platform.python_version(), "store": store_name(mongo),
                    "rabbitmq": overview["rabbitmq_version"], "erlang": overview["erlang_version"]},
        "single_node": "amqps 5671" if single.startswith("amqps") else "amqp 5672",
        "messages": args.messages, "rounds": args.rounds,
        "drain_per_second": {kind: round(rate) if rate else None for kind, rate in rates.items()},
        "drain_per_second_by_round": {kind: [round(done["per_second"]) for done in runs] for kind, runs in drains.items()},
        "drain_runs": drains,
        "cluster_vs_single": round(ratio, 2) if ratio else None,
        "failovers": args.failovers, "steady_seconds": args.steady_seconds,
        "failover_seconds": {"median": failover_median, "min": failover_min, "max": failover_max,
                             "not_recovered": len(failovers) - len(recovered)},
        "leader_elected_seconds_median": statistics.median(elected) if elected else None,
        "lost": lost, "duplicated": duplicated, "counts_off": miscounted,
        "failover_runs": failovers,
        "seconds": round(time.monotonic() - began),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\ncluster benchmark, {result['machine']}")
    print(f"drain: {args.messages:,} messages, three server.py --processes 1, median of {args.rounds} rounds "
          f"(single node over {result['single_node']})")
    print(f"{'broker':<44}{'msg/s':>10}  each round")
    for kind, label in (("cluster", "(cluster) 3 nodes, one process on each"), ("single", "(single) 1 node, 3 processes")):
        if drains[kind]:
            each_round = " ".join(f"{done['per_second']:,.0f}" for done in drains[kind])
            print(f"{label:<44}{rates[kind]:>10,.0f}  {each_round}")
    if ratio:
        print(f"cluster / single = {ratio:.2f}")
    if failovers:
        print(f"\nfailover: kill -9 of the leader's node under client.py at 100 msg/s, {len(failovers)} runs")
        print(f"{'run':<5}{'node':>5}{'stored again s':>16}{'leader seen s':>15}{'rejoin s':>10}{'confirmed':>11}"
              f"{'lost':>6}{'dup':>5}{'counts':>8}{'nacks':>7}")
        for index, done in enumerate(failovers, 1):
            print(f"{index:<5}{done['node_killed']:>5}{show(done['seconds'], 16)}{show(done['leader_elected_seconds'], 15)}"
                  f"{show(done['rejoin_seconds'], 10, 1)}{done['confirmed']:>11,}{done['lost']:>6}{done['duplicated']:>5}"
                  f"{done['counted_minus_stored']:>+8}{done['nacks']:>7}")
        if recovered:
            print(f"stored again after the kill: median {failover_median:.2f} s, min {failover_min:.2f} s, "
                  f"max {failover_max:.2f} s" + (f"; {len(failovers) - len(recovered)} runs not within "
                                                  f"{args.failover_timeout:.0f} s" if len(recovered) < len(failovers) else ""))
        print(f"lost {lost}, duplicated {duplicated}, counts off by {miscounted} (all must be 0)")
    print(f"took {result['seconds']} s; written to {args.output}")
    return 1 if lost or duplicated or miscounted or len(recovered) < len(failovers) else 0


if __name__ == "__main__":
    sys.exit(main())
