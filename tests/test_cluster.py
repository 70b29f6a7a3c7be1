"""Faults on a three-node RabbitMQ cluster (`scripts/services cluster up`; `make test-cluster`).

Each test ends as tests/test_faults.py's do: lost = 0 and duplicated = 0 against the message ids
the publishers saw confirmed, and the API's counts equal to the raw aggregation. Every program
gets the URLs of all three nodes, in an order chosen so that the node the fault strikes is the
one it is connected to. The queues are quorum queues with a member on each node.
"""

import re
import shutil

import pytest

from cluster import Cluster, ClusterError, Namespaces
from conftest import Pipeline, connect, wait_until
from test_faults import assert_each_stored_once

pytestmark = pytest.mark.cluster

# Short heartbeats: a program cut off from its node by a partition notices it within seconds.
HEARTBEAT = {"RABBITMQ_HEARTBEAT_SECONDS": "5"}


def _cluster_up(cluster):
    try:
        cluster.up()  # also starts a node an earlier test left down
        cluster.wait_complete()
    except ClusterError as error:
        pytest.fail(f"{error} (scripts/services cluster up)")
    return cluster


@pytest.fixture
def cluster():
    return _cluster_up(Cluster())


def _pipeline(cluster, mongo, tmp_path, **settings):
    url = cluster.url("admin")
    return Pipeline(mongo, connect(url), tmp_path, amqp_url=url, management=cluster.management,
                    env=dict(HEARTBEAT, **settings.pop("env", {})), **settings)


@pytest.fixture
def pipeline(cluster, mongo, tmp_path):
    pipeline = _pipeline(cluster, mongo, tmp_path)
    yield pipeline
    pipeline.close()


def start_server(pipeline, cluster, order, name):
    return pipeline.start_server(name=name, env={"RABBITMQ_URL": cluster.url("admin", order)})


def nodes_connected(log, what="RabbitMQ"):
    """The ports of the nodes a program's log says it connected to, in order."""
    return [int(port) for port in re.findall(rf"connected to {what} at [\d.]+:(\d+)", log)]


def order_from(node):
    """The three nodes, `node` first."""
    return tuple((node - 1 + step) % 3 + 1 for step in range(3))


def leader(cluster, queue):
    def known():
        try:
            return cluster.leader(queue)
        except (ClusterError, KeyError, StopIteration):
            return None

    return wait_until(known, 60, f"a leader for {queue}", interval=0.25)


def test_leader_node_killed_while_the_client_publishes_and_two_servers_consume(cluster, pipeline):
    """Fault: kill -9 of the node holding the quorum queue's leader, the client connected to it."""
    servers = [start_server(pipeline, cluster, (1, 2, 3), "server-a"), start_server(pipeline, cluster, (2, 3, 1), "server-b")]
    doomed = leader(cluster, pipeline.queue)
    client = pipeline.start("client.py", "--count", 6000, "--interval", 0.001,
                            env={"RABBITMQ_URL": cluster.url("admin", order_from(doomed))})
    wait_until(lambda: len(pipeline.confirmed_ids(client)) >= 1000, 60, "1,000 confirms")
    cluster.kill(doomed)
    wait_until(lambda: leader(cluster, pipeline.queue) != doomed, 60, "a new leader on another node", interval=0.5)
    assert client.wait(180) == 0, pipeline.log(client)[-3000:]
    ports = nodes_connected(pipeline.log(client))
    assert ports[0] == cluster.amqp_port(doomed) and ports[-1] != cluster.amqp_port(doomed), ports
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert all(server.poll() is None for server in servers)
    _cluster_up(cluster).wait_complete([pipeline.queue])  # restarted, it rejoins: its member is back online


def test_node_of_a_server_killed_when_it_does_not_hold_the_leader(cluster, pipeline):
    """Fault: kill -9 of the node a server is connected to, another node holding the leader."""
    first = start_server(pipeline, cluster, (1, 2, 3), "server-a")
    queue_leader = leader(cluster, pipeline.queue)
    doomed = next(node for node in (1, 2, 3) if node != queue_leader)
    second = start_server(pipeline, cluster, order_from(doomed), "server-b")
    assert nodes_connected(pipeline.log(second)) == [cluster.amqp_port(doomed)]
    client = pipeline.start("client.py", "--count", 6000, "--interval", 0.001,
                            env={"RABBITMQ_URL": cluster.url("admin", order_from(queue_leader))})
    wait_until(lambda: len(pipeline.confirmed_ids(client)) >= 1000, 60, "1,000 confirms")
    cluster.kill(doomed)
    wait_until(lambda: len(nodes_connected(pipeline.log(second))) == 2, 60, "server-b on another node")
    assert nodes_connected(pipeline.log(second))[-1] != cluster.amqp_port(doomed)
    assert client.wait(180) == 0, pipeline.log(client)[-3000:]
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert first.poll() is None and second.poll() is None
    assert leader(cluster, pipeline.queue) == queue_leader
    _cluster_up(cluster).wait_complete([pipeline.queue])


def test_rolling_restart_of_all_three_nodes_while_messages_flow(cluster, pipeline):
    """Fault: each node stopped and started again in turn, the next one only once the queue has
    its three members back."""
    servers = [start_server(pipeline, cluster, (1, 2, 3), "server-a"), start_server(pipeline, cluster, (3, 2, 1), "server-b")]
    client = pipeline.start("client.py", "--count", 12000, "--interval", 0.004,
                            env={"RABBITMQ_URL": cluster.url("admin", (2, 3, 1))})
    wait_until(lambda: len(pipeline.confirmed_ids(client)) >= 500, 60, "500 confirms")
    for node in (1, 2, 3):
        cluster.stop_node(node)
        _cluster_up(cluster).wait_complete([pipeline.queue])
    assert client.wait(240) == 0, pipeline.log(client)[-3000:]
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert all(server.poll() is None for server in servers)
    assert all(len(nodes_connected(pipeline.log(server))) >= 2 for server in servers)  # each lost its node once


def test_mqtt_device_fails_over_when_its_node_dies(cluster, mongo, tmp_path):
    """Fault: kill -9 of the node an MQTT device (QoS 1) is connected to."""
    device = {"MQTT_HOST": cluster.mqtt_hosts((1, 2, 3)), "MQTT_TLS_CA": "", "MQTT_USERNAME": "publisher",
              "MQTT_PASSWORD": cluster.secrets["RABBITMQ_PUBLISHER_PASSWORD"]}
    # The MQTT plugin publishes to status_exchange, where this pipeline's queue is bound to the device topics.
    pipeline = _pipeline(cluster, mongo, tmp_path, exchange="status_exchange", env=device)
    try:
        start_server(pipeline, cluster, (2, 3, 1), "server")
        client = pipeline.start("client.py", "--transport", "mqtt", "--count", 4000, "--interval", 0.003)
        wait_until(lambda: len(pipeline.confirmed_ids(client)) >= 300, 60, "300 PUBACKs")
        cluster.kill(1)
        assert client.wait(180) == 0, pipeline.log(client)[-3000:]
        ports = nodes_connected(pipeline.log(client), "MQTT")
        assert ports[0] == cluster.mqtt_port(1) and ports[-1] != cluster.mqtt_port(1), ports
        assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    finally:
        pipeline.close()
        _cluster_up(cluster)
        # The same messages reached status_queue, bound to the device topics too, with no consumer here.
        cluster.management("DELETE", "/queues/%2F/status_queue/contents")


@pytest.fixture
def partitionable_cluster():
    """A cluster of its own whose nodes run in network namespaces of this test, on their own addresses."""
    with Namespaces() as namespaces:
        cluster = Cluster(Cluster().directory.with_name("cluster-netns"), namespaces.addresses, namespaces.names)
        shutil.rmtree(cluster.directory, ignore_errors=True)
        try:
            yield _cluster_up(cluster), namespaces
        finally:
            try:
                cluster.down()
            finally:
                shutil.rmtree(cluster.directory, ignore_errors=True)


def test_network_partition_pauses_the_minority_and_loses_nothing(partitionable_cluster, mongo, tmp_path):
    """Fault: node 3 cut off from the other two (and from the programs), then reconnected. With
    pause_minority it stops serving; the programs on it move to the majority, and it rejoins."""
    cluster, namespaces = partitionable_cluster
    pipeline = _pipeline(cluster, mongo, tmp_path)
    try:
        servers = [start_server(pipeline, cluster, (1, 2, 3), "server-a"),
                   start_server(pipeline, cluster, (3, 1, 2), "server-b")]
        client = pipeline.start("client.py", "--count", 8000, "--interval", 0.004,
                                env={"RABBITMQ_URL": cluster.url("admin", (3, 1, 2))})
        wait_until(lambda: len(pipeline.confirmed_ids(client)) >= 500, 60, "500 confirms")
        namespaces.cut(3)

        def node_3_down_for_the_majority():
            try:
                nodes = cluster.management("GET", "/nodes", nodes=(1, 2))
            except ClusterError:
                return False
            return not next(node for node in nodes if node["name"] == cluster.node_name(3))["running"]

        wait_until(node_3_down_for_the_majority, 90, "nodes 1 and 2 to see node 3 gone", interval=0.5)
        wait_until(lambda: len(nodes_connected(pipeline.log(client))) >= 2, 90, "the client on the majority")
        namespaces.mend(3)
        cluster.wait_complete([pipeline.queue], timeout=240)
        assert client.wait(240) == 0, pipeline.log(client)[-3000:]
        assert nodes_connected(pipeline.log(client))[-1] != cluster.amqp_port(3)
        assert nodes_connected(pipeline.log(servers[1]))[-1] != cluster.amqp_port(3)
        assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
        assert all(server.poll() is None for server in servers)
    finally:
        pipeline.close()
