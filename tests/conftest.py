"""Fixtures over the real services started by `scripts/services up`.

Every test gets its own exchange, queue and database, so tests never see each
other's messages; MQTT tests get RabbitMQ virtual hosts of this test run's own.
A service that cannot be reached fails the test.
"""

import contextlib
import importlib.util
import json
import os
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import bson
import pika
import pymongo
import pytest

import config

ROOT = Path(__file__).resolve().parents[1]
# Tests make exchanges, queues, vhosts and users of their own: as admin, whose password
# scripts/services generated (config.py reads .data/secrets.env). tests/test_security.py logs in
# as the least-privileged users of rabbitmq/definitions.json.
RABBITMQ_URL = config.rabbitmq_url("admin")
_admin = urllib.parse.urlsplit(RABBITMQ_URL)
_spec = importlib.util.spec_from_file_location("apply_definitions", ROOT / "rabbitmq" / "apply_definitions.py")
apply_definitions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(apply_definitions)
ADMIN_API_USER = _admin.username
ADMIN_API = apply_definitions.ManagementAPI(f"http://{_admin.hostname}:15672", ADMIN_API_USER,
                                            urllib.parse.unquote(_admin.password))
MQTT_VHOST = f"status-pipeline-tests-{uuid.uuid4().hex[:8]}"  # with the broker settings as shipped
MQTT_OPEN_VHOST = f"{MQTT_VHOST}-open"  # the same without topic permissions, as for a user given none
# MQTT tests publish as a user of this run's own, given the rules of `publisher` in those vhosts.
MQTT_USER = f"tests-{MQTT_VHOST[-8:]}-publisher"
MQTT_USERNAME = f"{MQTT_VHOST}:{MQTT_USER}"  # RabbitMQ's way of naming the vhost
MQTT_OPEN_USERNAME = f"{MQTT_OPEN_VHOST}:{MQTT_USER}"
MQTT_PASSWORD = secrets.token_urlsafe(24)
# Where mosquitto_pub reaches the broker as client.py does: over TLS when config.py has a CA for it.
MOSQUITTO_SERVER = ["-h", config.MQTT_HOST, "-p", str(config.MQTT_PORT),
                    *(["--cafile", config.MQTT_TLS_CA] if config.MQTT_TLS_CA else [])]
MONGO_URI = config.MONGO_URI


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout=30.0, what="the condition", interval=0.05):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def management(method, path, body=None):
    """One call to RabbitMQ's management HTTP API as admin; its JSON answer, if any. Deleting what
    is gone already (a broker restarted on other data, say) is no error."""
    try:
        return ADMIN_API.call(method, path, body)
    except urllib.error.HTTPError as error:
        if not (method == "DELETE" and error.code == 404):
            pytest.fail(f"RabbitMQ management API: {method} {path} failed ({error})")
    except OSError as error:
        pytest.fail(f"RabbitMQ management API: {method} {path} failed ({error}); run scripts/services up")


def definitions_in(vhost, users, keys=("permissions", "topic_permissions", "exchanges", "policies", "queues",
                                        "bindings")):
    """The settings rabbitmq/definitions.json gives vhost `/` (those of `keys`), for `vhost`, each
    user renamed as `users` says and the users it does not name left out: the shipped rules, in a
    vhost of a test."""
    definitions = json.loads((ROOT / "rabbitmq" / "definitions.json").read_text())
    settings = {}
    for key in keys:
        assert all(item["vhost"] == "/" for item in definitions[key])
        settings[key] = [dict(item, vhost=vhost, **({"user": users[item["user"]]} if "user" in item else {}))
                         for item in definitions[key] if item.get("user", "") in users or "user" not in item]
    return settings


def quoted(vhost):
    return urllib.parse.quote(vhost, safe="")


@pytest.fixture(scope="session")
def mongo():
    client = pymongo.MongoClient(MONGO_URI, tz_aware=True, serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("ping")
    except pymongo.errors.PyMongoError as error:
        pytest.fail(f"MongoDB-wire server unreachable at {MONGO_URI} ({error}); run scripts/services up")
    yield client
    client.close()


def connect(amqp_url):
    """A connection to the first node of `amqp_url` (several, comma-separated, on a cluster) that answers."""
    try:
        return pika.BlockingConnection(config.amqp_parameters(amqp_url))
    except pika.exceptions.AMQPError as error:
        pytest.fail(f"RabbitMQ unreachable at {amqp_url} ({error!r}); run scripts/services up")


@pytest.fixture
def amqp_connection():
    return connect(RABBITMQ_URL)


class Pipeline:
    """One isolated pipeline: names, processes, and the real services behind them."""

    def __init__(self, mongo, amqp_connection, tmp_path, exchange=None, amqp_url=RABBITMQ_URL, env=None,
                 management=management):
        suffix = uuid.uuid4().hex[:10]
        self.management = management  # the broker's API: a cluster's, for tests/cluster.py
        self.shared_exchange = exchange is not None
        self.amqp_url = amqp_url
        self.env = dict(os.environ, **(env or {}), RABBITMQ_URL=amqp_url, MONGO_URI=MONGO_URI,
                        MONGO_DB=f"test_{suffix}", MONGO_COLLECTION="status",
                        EXCHANGE=exchange or f"test_exchange_{suffix}", QUEUE=f"test_queue_{suffix}",
                        ROUTING_KEY="status_topic", PYTHONUNBUFFERED="1",
                        SERVER_PROCESSES="1",  # one process, whose log tells one story; test_processes.py runs more
                        METRICS_PORT="0")  # servers run side by side; test_metrics.py gives its own a free port
        self.routing_key = self.env["ROUTING_KEY"]
        self.exchange, self.queue = self.env["EXCHANGE"], self.env["QUEUE"]
        self.dead_letter_queue = self.queue + ".dead"
        self.unroutable_queue = self.queue + ".unroutable"
        # The settings rabbitmq/definitions.json gives status_exchange and status_queue, for this
        # pipeline's names: an exchange of its own gets its own alternate exchange.
        self.vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url.split(",")[0]).path[1:]) or "/"
        self.policy = f"test-{suffix}"
        names = [re.escape(self.queue), re.escape(self.unroutable_queue)]
        if not self.shared_exchange:
            names.append(re.escape(self.exchange))
        self.management("PUT", f"/policies/{quoted(self.vhost)}/{self.policy}", {
            "pattern": f"^({'|'.join(names)})$", "apply-to": "all", "priority": 1,
            "definition": {"alternate-exchange": self.exchange + ".unroutable",
                           "dead-letter-routing-key": self.dead_letter_queue}})
        if not self.shared_exchange:  # as rabbitmq/definitions.json declares the shared one, status_exchange
            channel = amqp_connection.channel()
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            channel.close()
        self.database = mongo[self.env["MONGO_DB"]]
        self.collection = self.database["status"]
        self._connection = amqp_connection
        self.tmp_path = tmp_path
        self.processes = []

    # -- processes --------------------------------------------------------------

    def start(self, script, *args, name=None, env=None):
        name = name or f"{script.removesuffix('.py')}-{len(self.processes)}"
        log_path = self.tmp_path / f"{name}.log"
        process = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)],
                                   env=dict(self.env, **(env or {})), cwd=ROOT,
                                   stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
        process.log_path = log_path
        self.processes.append(process)
        return process

    def start_server(self, env=None, name=None):
        server = self.start("server.py", env=env, name=name)
        wait_until(lambda: "consuming" in self.log(server) or server.poll() is not None,
                   timeout=60, what="server.py to start consuming")
        assert server.poll() is None, f"server.py exited early:\n{self.log(server)}"
        return server

    def run_client(self, *args, timeout=120):
        client = self.start("client.py", *args)
        try:
            client.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"client.py {args} still running after {timeout}s:\n{self.log(client)[-3000:]}")
        return client

    @staticmethod
    def log(process):
        return process.log_path.read_text(errors="replace")

    def confirmed_ids(self, client):
        return re.findall(r"confirmed status=\d message_id=(\S+)", self.log(client))

    def confirmed_counts(self, client):
        counts = {str(status): 0 for status in range(7)}
        for status in re.findall(r"confirmed status=(\d) message_id=", self.log(client)):
            counts[status] += 1
        return counts

    @staticmethod
    def stop(process, sig=signal.SIGTERM, timeout=15):
        if process.poll() is None:
            process.send_signal(sig)
        return process.wait(timeout)

    # -- broker and store ---------------------------------------------------------

    @property
    def connection(self):
        """A live connection, opened again after a broker restart."""
        if not self._connection.is_open:
            self._connection = connect(self.amqp_url)
        return self._connection

    def channel(self):
        try:
            return self.connection.channel()
        except pika.exceptions.AMQPError:
            self._connection = connect(self.amqp_url)
            return self._connection.channel()

    def publish(self, body, properties=None, routing_key=None):
        """Publish as a program other than client.py would, with plain pika and confirms."""
        routing_key = self.routing_key if routing_key is None else routing_key
        channel = self.channel()
        channel.confirm_delivery()
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        channel.basic_publish(self.exchange, routing_key, body, properties or pika.BasicProperties(delivery_mode=2),
                              mandatory=True)
        channel.close()

    def stored_count(self):
        return self.collection.count_documents({})

    def wait_stored(self, count, timeout=60):
        wait_until(lambda: self.stored_count() >= count, timeout, f"{count} stored documents")
        assert self.stored_count() == count

    def dead_letters(self, expected, timeout=30):
        """Wait for `expected` dead-lettered messages; return [(properties, body)]."""
        channel = self.channel()
        found = []

        def drain():
            while True:
                method, properties, body = channel.basic_get(self.dead_letter_queue, auto_ack=True)
                if method is None:
                    return len(found) >= expected
                found.append((properties, body))

        wait_until(drain, timeout, f"{expected} dead-lettered messages")
        channel.close()
        return found

    def queue_depth(self, queue=None):
        channel = self.channel()
        depth = channel.queue_declare(queue or self.queue, passive=True).method.message_count
        channel.close()
        return depth

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        with contextlib.suppress(pika.exceptions.AMQPError):
            channel = self.channel()
            for queue in (self.queue, self.dead_letter_queue, self.unroutable_queue):
                channel.queue_delete(queue)
            channel.exchange_delete(self.queue + ".dlx")
            if not self.shared_exchange:
                channel.exchange_delete(self.exchange)
                channel.exchange_delete(self.exchange + ".unroutable")
            self.connection.close()
        self.management("DELETE", f"/policies/{quoted(self.vhost)}/{self.policy}")
        self.database.client.drop_database(self.database.name)


@pytest.fixture
def pipeline(mongo, amqp_connection, tmp_path):
    pipeline = Pipeline(mongo, amqp_connection, tmp_path)
    yield pipeline
    pipeline.close()


def own_vhost(vhost, topic_permissions):
    """Create a virtual host of this test run's own holding the settings of
    rabbitmq/definitions.json, MQTT_USER in the place of `publisher`, with its topic permission
    or without; yield its AMQP URL (as admin), then delete it with everything in it."""
    management("PUT", f"/vhosts/{quoted(vhost)}", {})
    management("PUT", f"/permissions/{quoted(vhost)}/{_admin.username}", {"configure": ".*", "write": ".*", "read": ".*"})
    # Not the shipped queues: status_queue would receive every test message there.
    settings = definitions_in(vhost, {"publisher": MQTT_USER}, ("permissions", "topic_permissions", "exchanges",
                                                                "policies"))
    if not topic_permissions:
        settings["topic_permissions"] = []
    management("POST", "/definitions", settings)
    yield urllib.parse.urlunsplit(_admin._replace(path="/" + quoted(vhost)))
    management("DELETE", f"/vhosts/{quoted(vhost)}")


@pytest.fixture(scope="session")
def mqtt_user():
    """MQTT_USER, for this run (its permissions come with each vhost of own_vhost)."""
    management("PUT", f"/users/{MQTT_USER}", {"password": add_secret(MQTT_PASSWORD), "tags": ""})
    yield MQTT_USER
    management("DELETE", f"/users/{MQTT_USER}")


@pytest.fixture(scope="session")
def mqtt_vhost(mqtt_user):
    """The AMQP URL of a virtual host of this test run's own, set up as the default vhost is.
    The MQTT plugin publishes to one exchange per vhost (rabbitmq/rabbitmq.conf), and every
    status queue is bound to the device topics, so in the default vhost test messages would
    also reach status_queue, and another test run's would reach this one's queues."""
    yield from own_vhost(MQTT_VHOST, topic_permissions=True)


@pytest.fixture(scope="session")
def mqtt_open_vhost(mqtt_user):
    """The same without topic permissions: devices log in as users who were given none."""
    yield from own_vhost(MQTT_OPEN_VHOST, topic_permissions=False)


@pytest.fixture
def mqtt_pipeline(mongo, mqtt_vhost, tmp_path):
    """A pipeline on the exchange RabbitMQ's MQTT plugin publishes to, in the tests' vhost;
    devices log in as `<vhost>:<user>`, RabbitMQ's way of naming the vhost over MQTT."""
    pipeline = Pipeline(mongo, connect(mqtt_vhost), tmp_path, exchange="status_exchange", amqp_url=mqtt_vhost,
                        env={"MQTT_USERNAME": MQTT_USERNAME, "MQTT_PASSWORD": MQTT_PASSWORD})
    yield pipeline
    pipeline.close()


@pytest.fixture
def mqtt_open_pipeline(mongo, mqtt_open_vhost, tmp_path):
    """As mqtt_pipeline, in the vhost without topic permissions."""
    pipeline = Pipeline(mongo, connect(mqtt_open_vhost), tmp_path, exchange="status_exchange",
                        amqp_url=mqtt_open_vhost, env={"MQTT_USERNAME": MQTT_OPEN_USERNAME, "MQTT_PASSWORD": MQTT_PASSWORD})
    yield pipeline
    pipeline.close()


@pytest.fixture
def fresh_app(mongo):
    """make(**settings): create_app() over a database of its own, dropped afterwards (flaskr's
    fresh database per test), with `settings` over the test ones; `app.collection` is its raw collection."""
    from api import create_app

    apps = []

    def make(**settings):
        database = f"test_api_{uuid.uuid4().hex[:10]}"
        app = create_app({"TESTING": True, "MONGO_URI": MONGO_URI, "MONGO_DB": database, "MONGO_COLLECTION": "status",
                          **settings})
        app.collection = mongo[database]["status"]
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["mongo"].close()
        mongo.drop_database(app.config["MONGO_DB"])


@pytest.fixture
def app_for():
    """create_app() over the database of a pipeline."""
    apps = []

    def make(pipeline):
        from api import create_app

        app = create_app({"TESTING": True, "MONGO_URI": MONGO_URI, "MONGO_DB": pipeline.env["MONGO_DB"],
                          "MONGO_COLLECTION": pipeline.env["MONGO_COLLECTION"]})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["mongo"].close()


class StoreProxy:
    """A TCP proxy in front of the MongoDB-wire server that can stop answering while every
    connection stays open, as a wedged store does (after the proxy of pika's own tests).

    forward() passes everything; hang() stops passing anything either way, and new
    connections are still accepted; hang_writes() holds each connection at its first
    insert, update or delete, so the store answers ping (on other connections) but no write.
    What was held is passed on at the next forward(), late, as a wedged store that comes
    back would run it."""

    WRITES = {"insert", "update", "delete", "findAndModify"}
    OP_MSG = 2013

    def __init__(self, target):
        """`target`: the store's URI; the proxy reaches its plain-text listener (27017 with
        scripts/services), since hang_writes() reads the wire protocol, and `uri` logs in as `target` does."""
        parts = urllib.parse.urlsplit(target)
        self._target = (parts.hostname, 27017)
        self._listener = socket.create_server(("127.0.0.1", 0))
        userinfo, at, _ = parts.netloc.rpartition("@")
        query = "&".join(option for option in parts.query.split("&")
                         if option and not option.lower().startswith(("tls", "ssl")))
        self.uri = f"mongodb://{userinfo}{at}127.0.0.1:{self._listener.getsockname()[1]}/" + (f"?{query}" if query else "")
        self._mode = "forward"
        self._changed = threading.Condition()
        self._closed = False
        self._sockets = []
        threading.Thread(target=self._accept, name="store-proxy", daemon=True).start()

    def forward(self):
        self._set("forward")

    def hang(self):
        self._set("hang")

    def hang_writes(self):
        self._set("hang_writes")

    def _set(self, mode):
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def _wait_while(self, held):
        with self._changed:
            self._changed.wait_for(lambda: self._closed or not held(self._mode))
        return not self._closed

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._target)
            except OSError:
                return
            self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    def _requests(self, client, upstream):
        """Message by message, so that a write can be told from a ping."""
        try:
            while self._wait_while(lambda mode: mode == "hang"):
                header = self._read(client, 16)
                length, _, _, opcode = struct.unpack("<iiii", header)
                message = header + self._read(client, length - 16)
                command = None
                if opcode == self.OP_MSG and message[20] == 0:  # flag bits, then a body section
                    command = next(iter(bson.decode(message[21:21 + struct.unpack("<i", message[21:25])[0]])))
                write = command in self.WRITES
                if not self._wait_while(lambda mode: mode == "hang" or (write and mode == "hang_writes")):
                    return
                upstream.sendall(message)
        except (OSError, EOFError):
            pass
        finally:
            self._close(client, upstream)

    def _replies(self, upstream, client):
        try:
            while self._wait_while(lambda mode: mode == "hang"):
                if not select.select([upstream], [], [], 0.1)[0]:
                    continue
                data = upstream.recv(65536)
                if not data:
                    return
                client.sendall(data)
        except (OSError, ValueError):  # ValueError: the other pump closed the socket
            pass
        finally:
            self._close(client, upstream)

    @staticmethod
    def _read(sock, size):
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    @staticmethod
    def _close(*sockets):
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._listener.close()
        self._close(*self._sockets)


@pytest.fixture
def store_proxy(mongo):
    proxy = StoreProxy(MONGO_URI)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory):
    """After the whole run: no log of it holds a password of .data/secrets.env (the generated ones,
    which every test's URLs carry), nor one that add_secret() was told of. The logs are every
    process's under this run's temporary directory, the broker's and the store's."""
    yield
    secrets = set(SECRETS)
    generated = ROOT / ".data" / "secrets.env"
    for line in generated.read_text().splitlines() if generated.exists() else []:
        name, _, value = line.partition("=")
        if name.endswith("_PASSWORD") and value:
            secrets |= {value, urllib.parse.quote(value, safe="")}
    logs = [path for path in tmp_path_factory.getbasetemp().rglob("*") if path.is_file()]
    logs += [path for path in (ROOT / ".data").glob("rabbitmq/log/*") if path.is_file()]
    logs += [path for path in (ROOT / ".data").glob("mongo/server.log")]
    leaks = [f"{path}: {secret[:4]}…" for path in logs for secret in secrets
             if secret.encode() in path.read_bytes()]
    assert not leaks, f"a secret in a log: {leaks}"


SECRETS = set()


def add_secret(secret):
    """A password a test made: no_secret_in_any_log looks for it too."""
    SECRETS.add(secret)
    return secret
