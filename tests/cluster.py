"""A RabbitMQ cluster of `scripts/services cluster`, as the cluster tests and bench/cluster.py drive it:
its nodes' URLs, its management API (through whichever node answers), and faults (kill -9 of a
node, a clean stop, a network partition between network namespaces)."""

import contextlib
import importlib.util
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "scripts" / "services"
SIZE = 3
_spec = importlib.util.spec_from_file_location("apply_definitions", ROOT / "rabbitmq" / "apply_definitions.py")
apply_definitions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(apply_definitions)


class ClusterError(Exception):
    pass


def _wait(condition, timeout, what, interval=0.25):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """The three nodes of `scripts/services cluster`. `netns` and `addresses` (three each) run
    them inside those network namespaces, on those addresses, with their data in `directory`."""

    def __init__(self, directory=ROOT / ".data" / "cluster", addresses=("127.0.0.1",) * SIZE, netns=()):
        self.directory = Path(directory)
        self.addresses = list(addresses)
        self.netns = list(netns)
        self.env = dict(os.environ, CLUSTER_DIR=str(self.directory), CLUSTER_ADDRESSES=" ".join(self.addresses),
                        CLUSTER_NETNS=" ".join(self.netns))
        self.secrets = dict(line.split("=", 1) for line in (ROOT / ".data" / "secrets.env").read_text().split()
                            if "=" in line)

    # -- the script ---------------------------------------------------------------------

    def services(self, *args, timeout=300):
        result = subprocess.run([str(SERVICES), "cluster", *map(str, args)], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode:
            raise ClusterError(f"scripts/services cluster {' '.join(map(str, args))}: {result.stdout}{result.stderr}")
        return result.stdout

    def up(self):
        """Starts every node that is not running; returns once all run as one cluster."""
        return self.services("up")

    def down(self):
        return self.services("down")

    # -- addresses --------------------------------------------------------------------------

    def amqp_port(self, node):
        return 5680 + node

    def mqtt_port(self, node):
        return 1890 + node

    def url(self, user, order=(1, 2, 3)):
        """RABBITMQ_URL for `user` of rabbitmq/definitions.json: the nodes in `order`, comma-separated."""
        password = urllib.parse.quote(self.secrets[f"RABBITMQ_{user.upper()}_PASSWORD"], safe="")
        return ",".join(f"amqp://{user}:{password}@{self.addresses[node - 1]}:{self.amqp_port(node)}/%2F"
                        for node in order)

    def mqtt_hosts(self, order=(1, 2, 3)):
        return ",".join(f"{self.addresses[node - 1]}:{self.mqtt_port(node)}" for node in order)

    def node_name(self, node):
        return f"status-cluster-{node}@{self.addresses[node - 1]}"

    def node_of(self, name):
        return next(node for node in range(1, SIZE + 1) if self.node_name(node) == name)

    # -- the management API ---------------------------------------------------------------

    def management(self, method, path, body=None, nodes=None):
        """One call as admin to the first of `nodes` (all by default) that answers; its JSON answer.
        Deleting what is gone already is no error."""
        errors = []
        for node in nodes or range(1, SIZE + 1):
            api = apply_definitions.ManagementAPI(f"http://{self.addresses[node - 1]}:{15680 + node}", "admin",
                                                  self.secrets["RABBITMQ_ADMIN_PASSWORD"], timeout=10)
            try:
                return api.call(method, path, body)
            except urllib.error.HTTPError as error:
                if method == "DELETE" and error.code == 404:
                    return None
                if error.code < 500:
                    raise
                errors.append(f"node {node}: {error}")
            except OSError as error:
                errors.append(f"node {node}: {error}")
        raise ClusterError(f"management API: {method} {path}: no node answered ({'; '.join(errors)})")

    def queue(self, name, vhost="/"):
        return self.management("GET", f"/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name, safe='')}")

    def leader(self, queue):
        """The node (1..3) that holds the quorum queue's leader."""
        return self.node_of(self.queue(queue)["leader"])

    def complete(self, queues=()):
        """Every node runs in one cluster, without a partition, and each quorum queue of `queues`
        has its three members online."""
        try:
            nodes = self.management("GET", "/nodes")
            if len(nodes) != SIZE or not all(node["running"] and not node.get("partitions") for node in nodes):
                return False
            return all(len(self.queue(queue).get("online", [])) == SIZE for queue in queues)
        except (ClusterError, urllib.error.HTTPError):
            return False

    def wait_complete(self, queues=(), timeout=180):
        _wait(lambda: self.complete(queues), timeout, f"the cluster complete, {', '.join(queues) or 'its nodes'} "
                                                      f"on all three")

    # -- faults -------------------------------------------------------------------------

    def pid(self, node):
        return int((self.directory / str(node) / "rabbitmq.pid").read_text())

    def kill(self, node):
        """kill -9 of the node's Erlang VM; returns once it is gone."""
        pid = self.pid(node)
        os.kill(pid, signal.SIGKILL)

        def gone():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{pid}/status").read_text().count("State:\tZ") > 0

        _wait(gone, 30, f"node {node} to die")

    def stop_node(self, node):
        return self.services("stop-node", node)


class Namespaces:
    """Three network namespaces of this run's own, each with one address on a bridge in this
    one: the nodes of a Cluster on their own addresses, whose links can be cut (a partition).
    The addresses are in a range of the bridge's only; nothing leaves this machine."""

    def __init__(self, subnet="10.213.77"):
        tag = uuid.uuid4().hex[:6]
        self.names = [f"sp{tag}-{node}" for node in range(1, SIZE + 1)]
        self.bridge = f"spbr{tag}"
        self.links = [f"sp{tag}v{node}" for node in range(1, SIZE + 1)]
        self.addresses = [f"{subnet}.{node}" for node in range(1, SIZE + 1)]
        self._subnet = subnet

    def __enter__(self):
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._ip("addr", "add", f"{self._subnet}.254/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for name, link, address in zip(self.names, self.links, self.addresses):
                self._ip("netns", "add", name)
                self._ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
                self._ip("link", "set", link, "master", self.bridge, "up")
                self._ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
                self._ip("-n", name, "link", "set", "eth0", "up")
                self._ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_):
        for name in self.names:
            # What runs there is the test's own (a node's epmd outlives the node): it would keep the namespace.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def cut(self, node):
        """Node `node` loses its link: it and the others, and this namespace, no longer see each other."""
        self._ip("link", "set", self.links[node - 1], "down")

    def mend(self, node):
        self._ip("link", "set", self.links[node - 1], "up")

    @staticmethod
    def _ip(*args):
        result = subprocess.run(["ip", *args], capture_output=True, text=True)
        if result.returncode:
            raise ClusterError(f"ip {' '.join(args)}: {result.stderr.strip()}")
